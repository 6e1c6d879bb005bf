"""python3 -m grape.bench: grape.attention (fused CPU kernels) against the same attention composed in plain
PyTorch, forward and forward+backward, one run per figure (docs/python.md has the measured ratios).

The composed attention takes the encoding's q~, k~ and bias from its definition (grape._C.encoded, which is
also what the fused kernels start from) and forms logits, the causal mask, softmax and the weighted sum of v
with PyTorch ops: what a PyTorch user writes without grape's kernels.
"""
import argparse
import math
import time

import torch

import grape


def composed(enc, q, k, v, x):
    qt, kt, bias = grape._C.encoded(enc._cpp, q, k, x if enc.properties["contextual"] else None)
    logits = torch.einsum("bihd,bjhd->bhij", qt, kt) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def fused(enc, q, k, v, x):
    return grape.attention(q, k, v, enc, x=x if enc.properties["contextual"] else None, layout="bthd")


def seconds(fn, backward, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        y = fn()
        if backward:
            y.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m grape.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--pe", default="rope,alibi,fox,grape-ap")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (the best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    C = args.H * args.D
    print(f"B={args.B} T={args.T} H={args.H} D={args.D}, float32, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}")
    print("| encoding | fwd composed (s) | fwd grape (s) | ratio | fwd+bwd composed (s) | fwd+bwd grape (s) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.pe.split(","):
        torch.manual_seed(0)
        enc = grape.PositionEncoding(name, n_head=args.H, head_dim=args.D, model_dim=C)
        shape = (args.B, args.T, args.H, args.D)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        x = torch.randn(args.B, args.T, C, requires_grad=True)
        fused(enc, q, k, v, x).sum().backward()  # warm-up: first-touch of the kernels' buffers, not timed
        composed(enc, q, k, v, x).sum().backward()
        row = [name]
        for backward in (False, True):
            with torch.set_grad_enabled(backward):
                tc = seconds(lambda: composed(enc, q, k, v, x), backward, args.repeat)
                tf = seconds(lambda: fused(enc, q, k, v, x), backward, args.repeat)
            row += [f"{tc:.3f}", f"{tf:.3f}", f"{tc / tf:.1f}x"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
