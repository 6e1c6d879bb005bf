"""python3 -m grape.bench_model: grape's language model against the same model in plain PyTorch eager, side by
side in one run: training tokens/s, model FLOP/s against sgemm, decode tokens/s (batch 1 and a ragged batch)
against the memory bound (docs/performance.md, "The whole model against PyTorch eager").

The eager model below is grape's architecture written plainly in PyTorch: tied embedding, pre-RMSNorm blocks,
QK-RMSNorm (one gain over head_dim) before the encoding, SwiGLU, final RMSNorm, attention composed of
matmul, mask, softmax, matmul; RoPE, FoX and GRAPE-AP from their definitions (docs/encodings.md). It loads
grape's own initial weights (grape.Transformer, seed 0), and python/tests/test_bench_model.py checks that it
gives grape's logits and gradients. grape is measured through `grape bench train|decode --json` (the CLI's
Trainer: forward, backward, clipping, AdamW; its default row shards, which the threads run in parallel), with
the same preset, batch, context and threads.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ENCODINGS = ("rope", "fox", "grape-ap")
BATCH = {"tiny": 16, "small": 8}  # training batch per preset (the shapes)
PROMPT = 16  # decode prompt length, as `grape bench decode`


# ---- the eager model -----------------------------------------------------------------------------------


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x, cos, sin):
    """Planes (i, i + n/2) of the last dim turned by the angles of cos/sin (standard orientation)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def angle_tables(positions, freqs):
    """cos, sin [max_pos, len(freqs)] of position x frequency, formed in float64 and reduced mod 2 pi."""
    ang = torch.arange(positions, dtype=torch.float64).unsqueeze(1) * freqs.unsqueeze(0)
    ang = torch.remainder(ang, 2 * math.pi)
    return ang.cos().float(), ang.sin().float()


def alibi_slopes(heads):
    """ALiBi's slopes 2^(-8h/n) (interleaved from the 2n schedule when heads is not a power of two)."""
    p = 2 ** int(math.floor(math.log2(heads)))
    s = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    extra = [2.0 ** (-8.0 * h / (2 * p)) for h in range(1, 2 * p + 1)]
    s += extra[0::2][: heads - p]
    return torch.tensor(s, dtype=torch.float32)


class Rope(torch.nn.Module):
    """q, k rotated by position x base^(-2i/D) on the half-split planes; no bias."""

    def __init__(self, H, D, C, max_pos, base=10000.0):
        super().__init__()
        freqs = base ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
        self.cos, self.sin = angle_tables(max_pos, freqs)

    def encode(self, q, k, x, pos):  # pos [B,T] absolute positions
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)
        return rotate_half(q, cos, sin), rotate_half(k, cos, sin), None, None

    def bias(self, qterm, kterm, future):
        return None


class Fox(torch.nn.Module):
    """FoX: log f = logsigmoid(w_f x + b_f) per head, c = running sum, bias(i, j) = c_i - c_j."""

    def __init__(self, H, D, C, max_pos):
        super().__init__()
        self.w_f = torch.nn.Parameter(torch.zeros(H, C))
        self.b_f = torch.nn.Parameter(torch.zeros(H))

    def encode(self, q, k, x, pos, c0=None):  # c0 [B,H]: the running sum before this chunk
        c = torch.cumsum(F.logsigmoid(x @ self.w_f.t() + self.b_f), dim=1)  # [B,T,H]
        if c0 is not None:
            c = c + c0.unsqueeze(1)
        return q, k, c, c

    def bias(self, cq, ck, future):  # [B,Tq,H], [B,Tk,H] -> [B,H,Tq,Tk]
        return cq.transpose(1, 2).unsqueeze(-1) - ck.transpose(1, 2).unsqueeze(-2)


class GrapeAP(torch.nn.Module):
    """GRAPE-AP: bias(t, j) = sum_{l=j+1..t} m_h logsigmoid(p_t . Rot(p_hat_l; l) / P)."""

    def __init__(self, H, D, C, max_pos, probe_dim=8, eps=1e-6):
        super().__init__()
        self.H, self.P, self.eps = H, probe_dim, eps
        self.w_p = torch.nn.Parameter(torch.zeros(H * probe_dim, C))
        self.slopes = alibi_slopes(H).view(1, H, 1, 1)
        self.cos, self.sin = angle_tables(max_pos, torch.ones(probe_dim // 2, dtype=torch.float64))

    def encode(self, q, k, x, pos):
        B, T = x.shape[:2]
        p = (x @ self.w_p.t()).view(B, T, self.H, self.P)
        p_hat = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + self.eps)
        r = rotate_half(p_hat, self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2))
        return q, k, p, r

    def bias(self, p, r, future):  # future [B,1,Tq,Tk]: keys after the query
        psi = self.slopes * F.logsigmoid(torch.einsum("bihp,bjhp->bhij", p, r) / self.P)
        psi = psi.masked_fill(future, 0.0)  # not on any path
        return psi.sum(-1, keepdim=True) - psi.cumsum(-1)  # sum over l in (j, t]


ENCODING_CLASSES = {"rope": Rope, "fox": Fox, "grape-ap": GrapeAP}


class Block(torch.nn.Module):
    def __init__(self, cfg, max_pos):
        super().__init__()
        C, H, hidden, eps = cfg["n_embd"], cfg["n_head"], cfg["mlp_hidden"] or 8 * cfg["n_embd"] // 3, cfg["norm_eps"]
        self.H, self.D = H, C // H
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.norm1, self.norm2 = RMSNorm(C, eps), RMSNorm(C, eps)
        self.wq, self.wk, self.wv, self.wo = lin(C, C), lin(C, C), lin(C, C), lin(C, C)
        self.q_norm, self.k_norm = RMSNorm(self.D, eps), RMSNorm(self.D, eps)
        self.pe = ENCODING_CLASSES[cfg["pe"]](H, self.D, C, max_pos)
        self.w1, self.w2, self.w_out = lin(C, hidden), lin(C, hidden), lin(hidden, C)

    def forward(self, x, pos, cache=None, rows=None):
        """x [B,T,C] at positions pos [B,T] (or [1,T] for all rows). With a cache (dict of [rows,H,Tmax,...] buffers), the chunk's keys
        are written at their positions into rows `rows` and the queries attend to everything cached there."""
        B, T, C = x.shape
        xh = self.norm1(x)
        q = self.q_norm(self.wq(xh).view(B, T, self.H, self.D))
        k = self.k_norm(self.wk(xh).view(B, T, self.H, self.D))
        v = self.wv(xh).view(B, T, self.H, self.D)
        c0 = None
        if cache is not None and isinstance(self.pe, Fox):  # the running sum before this chunk's first token
            first = pos[:, 0]
            c0 = cache["kterm"][rows, (first - 1).clamp(min=0)] * (first > 0).unsqueeze(1)
        q, k, qterm, kterm = self.pe.encode(q, k, xh, pos, c0) if c0 is not None else self.pe.encode(q, k, xh, pos)
        kpos = pos
        if cache is not None:
            r = rows.unsqueeze(1)
            cache["k"][r, pos], cache["v"][r, pos] = k, v
            if kterm is not None:
                cache["kterm"][r, pos] = kterm
            n = int(pos.max()) + 1  # only the filled part of the buffers
            k, v = cache["k"][rows, :n], cache["v"][rows, :n]
            kterm = cache["kterm"][rows, :n] if kterm is not None else None
            kpos = torch.arange(n).unsqueeze(0).expand(B, n)
        future = (kpos.unsqueeze(1) > pos.unsqueeze(2)).unsqueeze(1)  # [B or 1,1,Tq,Tk]
        att = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.D)
        bias = self.pe.bias(qterm, kterm, future)
        if bias is not None:
            att = att + bias
        att = att.masked_fill(future, float("-inf"))
        y = torch.einsum("bhij,bjhd->bihd", torch.softmax(att, dim=-1), v).reshape(B, T, C)
        h = x + self.wo(y)
        hn = self.norm2(h)
        return h + self.w_out(F.silu(self.w1(hn)) * self.w2(hn))


class EagerLM(torch.nn.Module):
    """grape's decoder LM in plain PyTorch; parameter names are grape's checkpoint names."""

    def __init__(self, cfg, max_pos=4096):
        super().__init__()
        self.cfg, self.max_pos = cfg, max_pos
        self.wte = torch.nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.blocks = torch.nn.ModuleList(Block(cfg, max_pos) for _ in range(cfg["n_layer"]))
        self.norm_f = RMSNorm(cfg["n_embd"], cfg["norm_eps"])

    def forward(self, idx, pos=None, caches=None, rows=None):
        B, T = idx.shape
        if pos is None:  # every row from position 0: one [1,T] row of positions broadcasts
            pos = torch.arange(T).unsqueeze(0)
        h = self.wte(idx)
        for l, b in enumerate(self.blocks):
            h = b(h, pos, caches[l] if caches is not None else None, rows)
        return self.norm_f(h) @ self.wte.weight.t()  # tied head

    def loss(self, idx, targets):
        logits = self.forward(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def new_caches(self, rows, length):
        """Preallocated KV buffers per layer for `rows` sequences of up to `length` tokens."""
        cfg, H = self.cfg, self.cfg["n_head"]
        D = cfg["n_embd"] // H
        kterm = {"rope": None, "fox": (H,), "grape-ap": (H, 8)}[cfg["pe"]]
        out = []
        for _ in self.blocks:
            c = {"k": torch.zeros(rows, length, H, D), "v": torch.zeros(rows, length, H, D)}
            if kterm is not None:
                c["kterm"] = torch.zeros(rows, length, *kterm)
            out.append(c)
        return out

    @torch.no_grad()
    def greedy_decode(self, prompts, tokens):
        """Each prompt prefilled alone into its row, then `tokens` batched greedy steps (each row at its own
        position). Returns the logits [rows, tokens, V] of the steps and their seconds."""
        B = len(prompts)
        caches = self.new_caches(B, max(len(p) for p in prompts) + tokens)
        nxt = []
        for b, p in enumerate(prompts):
            logits = self.forward(torch.tensor([p]), caches=caches, rows=torch.tensor([b]))
            nxt.append(int(logits[0, -1].argmax()))
        nxt = torch.tensor(nxt).unsqueeze(1)
        pos = torch.tensor([len(p) for p in prompts]).unsqueeze(1)
        rows, out = torch.arange(B), []
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = self.forward(nxt, pos=pos, caches=caches, rows=rows)[:, 0]
            out.append(logits)
            nxt, pos = logits.argmax(-1, keepdim=True), pos + 1
        seconds = time.perf_counter() - t0
        return torch.stack(out, 1) if out else torch.empty(B, 0, self.cfg["vocab_size"]), seconds


def grape_config(preset, pe):
    """grape's model config (its presets, as JSON) for preset and encoding."""
    import grape

    return grape.Transformer(preset=preset, pe=pe).config


def eager_like_grape(preset, pe, seed=0, **settings):
    """(grape.Transformer, EagerLM) holding the same weights: grape's initialisation from torch.manual_seed."""
    import grape

    torch.manual_seed(seed)
    g = grape.Transformer(preset=preset, pe=pe, **settings)
    cfg = g.config
    e = EagerLM(cfg, max_pos=max(4096, cfg["context"] + 256))
    missing, unexpected = e.load_state_dict(g.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"bench_model: the eager model's names differ from grape's: missing {missing}, "
                           f"unexpected {unexpected}")
    return g, e


def bench_prompt_lengths(batch, prompt_len, ragged):
    """As grape::train::bench_prompt_lengths: prompt_len + floor(b * prompt_len / batch) with ragged."""
    return [prompt_len + (b * prompt_len // batch if ragged else 0) for b in range(batch)]


# ---- measurements --------------------------------------------------------------------------------------


def sgemm_flops(n, repeat):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def copy_bandwidth(floats, repeat):
    """Bytes moved per second by a tensor copy (read + write, as STREAM counts it)."""
    src, dst = torch.randn(floats), torch.empty(floats)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * 4 * floats / best


def step_gemms(model, tokens):
    """The matrix products of one training step of `model` over `tokens` = batch x context rows: for every matrix
    weight W [N, K] (the linear layers and the tied head, which the embedding gather does not multiply) the
    forward y = x W^T and the backward dX = dY W and dW = dY^T X, as (M, K, N, transpose_a, transpose_b)."""
    out = []
    for p in model.parameters():
        if p.dim() == 2 and p.size(0) * p.size(1) > 0:
            N, K = p.shape
            out += [(tokens, K, N, False, True), (tokens, N, K, False, False), (N, tokens, K, True, False)]
    return out


def gemm_floor_tokens_per_s(model, batch, context, repeat):
    """Tokens/s of a training step that did nothing but its matrix products (step_gemms), each timed alone at the
    step's shapes through the same sgemm (best of `repeat`): no implementation built on that sgemm trains faster,
    so floor / eager bounds the training ratio an fp32 model can reach against eager (docs/performance.md)."""
    total = 0.0
    for M, K, N, ta, tb in step_gemms(model, batch * context):
        a = torch.randn(K, M).t() if ta else torch.randn(M, K)
        b = torch.randn(N, K).t() if tb else torch.randn(K, N)
        c = torch.empty(M, N)
        torch.mm(a, b, out=c)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
        total += best
    return batch * context / total


def eager_train_tokens_per_s(model, batch, context, steps):
    """Forward, backward, clip_grad_norm_(1.0), AdamW (grape's settings: decay on matrices only)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(100)
    x = torch.randint(model.cfg["vocab_size"], (batch, context))
    y = x.roll(-1, 1)

    def step():
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * context * steps / (time.perf_counter() - t0)


def eager_decode_tokens_per_s(model, batch, tokens, ragged):
    V = model.cfg["vocab_size"]
    prompts = [[i % V for i in range(n)] for n in bench_prompt_lengths(batch, PROMPT, ragged)]
    _, seconds = model.greedy_decode(prompts, tokens)
    return batch * tokens / max(seconds, 1e-9)


def run_grape(cli, threads, args):
    """`grape --threads N bench ARGS --json FILE`: its JSON rows."""
    with tempfile.TemporaryDirectory(prefix="grape-bench-model-") as d:
        out = os.path.join(d, "rows.json")
        cmd = [cli, "--threads", str(threads), "bench"] + args + ["--json", out]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"bench_model: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}")
        with open(out) as f:
            return json.load(f)


def find_cli(given):
    for c in (given, os.environ.get("GRAPE_CLI"),
              os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "grape"), shutil.which("grape")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise SystemExit("bench_model: no grape executable: pass --grape PATH or set GRAPE_CLI (build/grape)")


def write_json_atomic(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench_model-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def measure_case(a, cli, preset, pe):
    g, model = eager_like_grape(preset, pe)
    cfg = model.cfg
    N = g.num_parameters()
    del g
    C, L, H = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    batch = a.batch or BATCH[preset]
    context = a.context or cfg["context"]
    common = ["--preset", preset, "--pe", pe]
    row = {"preset": preset, "pe": pe, "parameters": N, "batch": batch, "context": context}
    # Training: eager and grape alternated `rounds` times, the best of each kept.
    et = gt = 0.0
    for _ in range(a.rounds):
        et = max(et, eager_train_tokens_per_s(model, batch, context, a.steps))
        grow = run_grape(cli, a.threads, ["train"] + common + ["--batch", str(batch), "--context", str(context),
                                                               "--steps", str(a.steps)])[0]
        if grow["tokens_per_s"] > gt:
            gt, gemm_s, clocked_s = grow["tokens_per_s"], grow["gemm_seconds_per_step"], grow["clocked_step_seconds"]
    flops_per_token = 6.0 * N + 6.0 * L * C * context  # 6N + causal attention (half of 12 L C T)
    row.update(train_eager=et, train_grape=gt, train_ratio=gt / et, flops_per_token=flops_per_token,
               train_eager_of_sgemm=et * flops_per_token / a.sgemm, train_grape_of_sgemm=gt * flops_per_token / a.sgemm)
    floor = gemm_floor_tokens_per_s(model, batch, context, 2 if a.quick else 5)
    row.update(train_gemm_floor=floor, train_ratio_ceiling=floor / et, train_grape_of_floor=gt / floor)
    # The same products as grape's step runs them (caches as the step leaves them): even if everything else
    # in a step took no time, grape could not beat eager by more than eager's step time over these seconds.
    row.update(train_grape_gemm_s=gemm_s, train_grape_gemm_share=gemm_s / clocked_s,
               train_ratio_ceiling_in_step=batch * context / et / gemm_s)
    # Decode, batch 1 and the ragged batch.
    _, model = eager_like_grape(preset, pe)  # fresh weights: the training above moved them
    model.eval()
    for batch_d, ragged, key in ((1, False, "decode1"), (a.decode_batch, True, "decode_ragged")):
        ed = gd = 0.0
        for _ in range(a.rounds):
            ed = max(ed, eager_decode_tokens_per_s(model, batch_d, a.tokens, ragged))
            gargs = ["decode"] + common + ["--batch", str(batch_d), "--tokens", str(a.tokens)]
            gd = max(gd, run_grape(cli, a.threads, gargs + (["--ragged"] if ragged else []))[0]["tokens_per_s"])
        row.update({f"{key}_eager": ed, f"{key}_grape": gd, f"{key}_ratio": gd / ed})
    # Bytes one batch-1 decode step reads: every weight (fp32) and the KV cache at its mean length in the
    # timed steps, plus the encoding's cached per-key terms (FoX: c, float64 per head; GRAPE-AP: P floats).
    mean_len = PROMPT + (a.tokens + 1) / 2
    per_key = L * (2 * C * 4 + {"rope": 0, "fox": 8 * H, "grape-ap": 4 * H * 8}[pe])
    row["decode_bytes_per_token"] = 4.0 * N + per_key * mean_len
    row["decode_bound_tokens_per_s"] = a.copy_bw / row["decode_bytes_per_token"]
    row["decode1_grape_of_bound"] = row["decode1_grape"] / row["decode_bound_tokens_per_s"]
    row["decode_ragged_over_1_grape"] = row["decode_ragged_grape"] / row["decode1_grape"]
    row["decode_ragged_over_1_eager"] = row["decode_ragged_eager"] / row["decode1_eager"]
    return row


def table(rows, a):
    out = [f"threads {a.threads} (both sides); sgemm {a.sgemm / 1e9:.1f} GFLOP/s (n={a.sgemm_n}); copy "
           f"{a.copy_bw / 1e9:.2f} GB/s (read+write); train steps {a.steps}, decode tokens {a.tokens}, best of "
           f"{a.rounds}", "",
           "| preset | pe | train tok/s eager | grape | ratio | eager % sgemm | grape % sgemm | GEMM-only tok/s | "
           "ratio ceiling | GEMM share of grape step | ceiling in step | decode b1 eager | "
           f"grape | ratio | MB/token | grape % bound | b{a.decode_batch} ragged eager | grape | grape b{a.decode_batch}/b1 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['preset']} | {r['pe']} | {r['train_eager']:.0f} | {r['train_grape']:.0f} | "
            f"{r['train_ratio']:.2f}x | {100 * r['train_eager_of_sgemm']:.0f}% | {100 * r['train_grape_of_sgemm']:.0f}% "
            f"| {r['train_gemm_floor']:.0f} | {r['train_ratio_ceiling']:.2f}x | {100 * r['train_grape_gemm_share']:.0f}% | "
            f"{r['train_ratio_ceiling_in_step']:.2f}x | {r['decode1_eager']:.0f} | {r['decode1_grape']:.0f} | {r['decode1_ratio']:.2f}x | "
            f"{r['decode_bytes_per_token'] / 1e6:.2f} | {100 * r['decode1_grape_of_bound']:.0f}% | "
            f"{r['decode_ragged_eager']:.0f} | {r['decode_ragged_grape']:.0f} | {r['decode_ragged_over_1_grape']:.2f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m grape.bench_model", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny,small")
    ap.add_argument("--pe", default=",".join(ENCODINGS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="both sides (default: every core)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=0, help="training batch (default: tiny 16, small 8)")
    ap.add_argument("--context", type=int, default=0, help="training context (default: the preset's)")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per sequence")
    ap.add_argument("--decode-batch", type=int, default=16, help="sequences of the ragged decode")
    ap.add_argument("--rounds", type=int, default=2, help="alternated measurements per figure (best kept)")
    ap.add_argument("--grape", default="", help="the grape executable (default: $GRAPE_CLI, build/grape)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here (atomically)")
    ap.add_argument("--quick", action="store_true", help="a smoke run of seconds: tiny, context 32, batch 2")
    a = ap.parse_args(argv)
    if argv is None and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        # As `grape` does at start-up (docs/performance.md, "Threads on a busy machine"): both sides then spin
        # alike between parallel regions. libgomp reads it when loaded, so the process starts again.
        os.environ["GOMP_SPINCOUNT"] = "100000"
        os.execv(sys.executable, [sys.executable, "-m", "grape.bench_model"] + sys.argv[1:])
    if a.quick:
        a.preset, a.context, a.batch, a.steps, a.tokens, a.decode_batch, a.rounds = "tiny", 32, 2, 1, 3, 3, 1
    for pe in a.pe.split(","):
        if pe not in ENCODINGS:
            ap.error(f"--pe: the eager model has {', '.join(ENCODINGS)}, not {pe!r}")
    for p in a.preset.split(","):
        if p not in BATCH:
            ap.error(f"--preset: one of {', '.join(BATCH)}, not {p!r}")
    if a.threads < 1:
        ap.error("--threads must be >= 1")
    cli = find_cli(a.grape)
    torch.set_num_threads(a.threads)
    a.sgemm_n = 256 if a.quick else 1024
    a.sgemm = sgemm_flops(a.sgemm_n, 3 if a.quick else 10)
    a.copy_bw = copy_bandwidth(1 << 20 if a.quick else 1 << 25, 3 if a.quick else 10)
    rows = []
    for preset in a.preset.split(","):
        for pe in a.pe.split(","):
            rows.append(measure_case(a, cli, preset, pe))
            print(f"{preset} {pe}: train {rows[-1]['train_ratio']:.2f}x, decode {rows[-1]['decode1_ratio']:.2f}x",
                  file=sys.stderr, flush=True)
    print(table(rows, a))
    if a.json:
        write_json_atomic(a.json, {"threads": a.threads, "sgemm_flops": a.sgemm, "sgemm_n": a.sgemm_n,
                                   "copy_bytes_per_s": a.copy_bw, "steps": a.steps, "tokens": a.tokens,
                                   "rounds": a.rounds, "command": " ".join(["python3 -m grape.bench_model"] + sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
