"""The eager PyTorch model of grape.bench_model is grape's model: with grape's weights (moved off their init) it
gives grape's logits, loss gradients and, decoding a ragged batch with its KV cache, grape's full-pass logits;
so the benchmark compares the same computation."""
import pytest
import torch

import grape
from conftest import rel_err
from grape import bench_model

SMALL = dict(n_layer=2, n_head=2, n_embd=32, context=40)


def twins(pe, seed=0):
    g, e = bench_model.eager_like_grape("tiny", pe, seed=seed, **SMALL)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # off the init: gains != 1, FoX's b_f != 0
        for p in g.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    e.load_state_dict(g.state_dict(), strict=False)
    return g, e


@pytest.mark.parametrize("pe", bench_model.ENCODINGS)
def test_logits_and_gradients_equal_grapes(pe):
    g, e = twins(pe)
    torch.manual_seed(5)
    x = torch.randint(257, (3, 40))
    y = x.roll(-1, 1)
    with torch.no_grad():
        assert rel_err(e(x), g(x)) <= 1e-5
    g.loss(x, y).backward()
    e.loss(x, y).backward()
    grads = dict(g.named_parameters())
    for name, p in e.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-4, name


@pytest.mark.parametrize("pe", bench_model.ENCODINGS)
def test_ragged_cached_decode_equals_grapes_full_pass(pe):
    g, e = twins(pe, seed=2)
    lengths = bench_model.bench_prompt_lengths(4, 6, True)
    prompts = [[(7 * b + 3 * i) % 257 for i in range(n)] for b, n in enumerate(lengths)]
    steps, _ = e.greedy_decode(prompts, 5)
    assert steps.shape == (4, 5, 257)
    for b, p in enumerate(prompts):
        first = int(e(torch.tensor([p]))[0, -1].argmax())
        seq = p + [first] + steps[b, :-1].argmax(-1).tolist()
        with torch.no_grad():
            full = g(torch.tensor([seq]))[0, len(p):]
        assert rel_err(steps[b], full) <= 1e-4, f"row {b}"


def test_bench_prompt_lengths_are_grapes():
    assert bench_model.bench_prompt_lengths(16, 16, True) == list(range(16, 32))
    assert bench_model.bench_prompt_lengths(3, 16, False) == [16, 16, 16]


def test_alibi_slopes_are_grapes():  # GRAPE-AP's fixed slopes; 6 heads is not a power of two
    for heads in (4, 6):
        enc = grape.PositionEncoding("alibi", n_head=heads, head_dim=8)
        q = torch.zeros(1, 3, heads, 8)
        v = torch.zeros(1, 3, heads, 8)
        for j in range(3):
            v[0, j, :, j] = 1.0  # y's first 3 coordinates are then the attention weights
        y = grape.attention(q, q, v, enc, layout="bthd", impl="reference")
        s = bench_model.alibi_slopes(heads)
        # q = k = 0: the logits of query 2 are the bias alone, -slope * (2 - j).
        w = torch.softmax(-s.view(heads, 1) * torch.tensor([2.0, 1.0, 0.0]), dim=-1)
        assert rel_err(y[0, 2, :, :3], w) <= 1e-6


def test_step_gemms_are_the_linear_layers_and_the_tied_head_each_three_times():
    _, e = bench_model.eager_like_grape("tiny", "rope", **SMALL)
    C, L, V = SMALL["n_embd"], SMALL["n_layer"], 257
    hidden = 8 * C // 3
    gemms = bench_model.step_gemms(e, 5)
    assert len(gemms) == 3 * (7 * L + 1)
    # forward + two backward products: 3 x 2 x rows x (every matrix weight, the head once) = the 6N of a step.
    matrix_weights = L * (4 * C * C + 3 * C * hidden) + V * C
    assert sum(2 * M * K * N for M, K, N, _, _ in gemms) == 6 * 5 * matrix_weights
    floor = bench_model.gemm_floor_tokens_per_s(e, 2, 8, 1)
    assert 0 < floor < float("inf")
