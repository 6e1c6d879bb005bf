"""qk_norm="after_rotation" in grape.nn.CausalSelfAttention and the Transformer: the encoded q~, k~ are
RMS-normalised (the GRAPE authors' order), streaming still equals the full pass, gradients are right, and the
encodings where it is ill-defined are refused."""
import subprocess

import pytest
import torch

import grape
from conftest import rel_err

C, H = 32, 4


def sublayer(pe, qk_norm, kv_shift=False, dtype=torch.float32, seed=0, **pe_options):
    """A CausalSelfAttention with its QK-norm gains and encoding parameters moved off their init."""
    torch.manual_seed(seed)
    attn = grape.nn.CausalSelfAttention(C, H, pe=pe, kv_shift=kv_shift, qk_norm=qk_norm, pe_options=pe_options)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.startswith(("q_norm", "k_norm", "pe.", "kv_shift.")):
                p.add_(0.3 * torch.randn(p.shape))
    return attn.to(dtype)


@pytest.mark.parametrize("pe", ["alibi", "fox", "nope", "grape-ap"])
def test_after_rotation_equals_before_exactly_for_additive_encodings(pe):
    before = sublayer(pe, "before_rotation", kv_shift=True)
    after = sublayer(pe, "after_rotation", kv_shift=True, seed=1)
    after.load_state_dict(before.state_dict())
    x = torch.randn(2, 11, C)
    assert torch.equal(before(x), after(x))


def test_after_rotation_normalises_the_rotated_queries_and_keys():
    attn = sublayer("rope", "after_rotation", dtype=torch.float64, orientation="grape")
    before = sublayer("rope", "before_rotation", dtype=torch.float64, orientation="grape")
    before.load_state_dict(attn.state_dict())
    x = torch.randn(2, 10, C, dtype=torch.float64)
    B, T, D = 2, 10, C // H
    q = attn.wq(x).view(B, T, H, D)
    k = attn.wk(x).view(B, T, H, D)
    v = attn.wv(x).view(B, T, H, D)
    # the authors' clockwise half rotation, written here; then RMSNorm with the per-dimension gains
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)[None, :, None, :]
    def turn(z):
        a, b = z[..., :D // 2], z[..., D // 2:]
        return torch.cat([a * ang.cos() + b * ang.sin(), -a * ang.sin() + b * ang.cos()], -1)
    def rms(z, g):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    q = rms(turn(q), attn.q_norm.weight).transpose(1, 2)
    k = rms(turn(k), attn.k_norm.weight).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / D ** 0.5
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(logits, -1) @ v.transpose(1, 2)
    expected = attn.wo(y.transpose(1, 2).reshape(B, T, C))
    assert rel_err(attn(x), expected) < 1e-12
    assert rel_err(before(x), expected) > 1e-3  # the per-dimension gains make the two orders differ


@pytest.mark.parametrize("pe,kv_shift", [("rope", True), ("grape-m-ctx", True), ("grape-m", False), ("fox", True)])
def test_after_rotation_streams_like_the_full_pass(pe, kv_shift):
    attn = sublayer(pe, "after_rotation", kv_shift=kv_shift)
    x = torch.randn(2, 9, C)
    full = attn(x)
    cache = grape.AttentionCache()
    with torch.no_grad():
        parts = [attn(x[:, :4], cache), attn(x[:, 4:5], cache), attn(x[:, 5:], cache)]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_after_rotation_gradients_by_gradcheck():
    attn = sublayer("grape-m", "after_rotation", dtype=torch.float64)
    x = torch.randn(1, 5, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attn(x), (x,))
    # the gains get their gradient too: a central difference along a random direction
    g = attn.k_norm.weight
    d = torch.randn_like(g)
    attn(x).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        g.add_(eps * d)
        plus = attn(x).sum().item()
        g.sub_(2 * eps * d)
        minus = attn(x).sum().item()
        g.add_(eps * d)
    assert abs((plus - minus) / (2 * eps) - (g.grad * d).sum().item()) < 1e-6


@pytest.mark.parametrize("pe,options", [("xpos", {}), ("grape-a-qk", {}), ("tape", {}),
                                        ("rope", {"extend": "dynamic-ntk"})])
def test_after_rotation_refuses_encodings_where_it_is_ill_defined(pe, options):
    with pytest.raises(ValueError, match=f"qk_norm='after_rotation' is not defined for the '{pe}' encoding"):
        grape.nn.CausalSelfAttention(C, H, pe=pe, qk_norm="after_rotation", pe_options=options)
    with pytest.raises(ValueError, match="qk_norm=after_rotation is not defined"):
        grape.Transformer(preset="tiny", n_layer=1, pe=pe, qk_norm="after_rotation",
                          **{f"pe.{k}": v for k, v in options.items()})
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        grape.nn.CausalSelfAttention(C, H, qk_norm="sideways")


def test_a_trained_after_rotation_run_is_the_python_sublayer(cli, tmp_path):
    run = tmp_path / "run"
    subprocess.run([cli, "--threads", "1", "train", "--quiet", "--out", str(run), "--pe", "rope", "--steps", "2",
                    "--batch", "2", "--context", "16", "--set", "n_layer=1", "--set", f"n_embd={C}",
                    "--set", f"n_head={H}", "--set", "qk_norm=after_rotation", "--eval-every", "0"], check=True)
    model = grape.load_run(run)
    assert model.config["qk_norm"] == "after_rotation"
    weights = {k[len("blocks.0."):]: v for k, v in model.state_dict().items() if k.startswith("blocks.0.")}
    attn = grape.nn.CausalSelfAttention(C, H, pe="rope", qk_norm="after_rotation")
    attn.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("norm", "w1", "w2", "w_out"))})
    # the block: h = x + attn(norm1(x)); the logits of token ids through wte, the block and the head
    ids = torch.randint(0, 257, (1, 12))
    h = model.state_dict()["wte.weight"][ids]
    n1 = grape.nn.RMSNorm(C)
    n1.weight.data.copy_(weights["norm1.weight"])
    with torch.no_grad():
        y = attn(n1(h))
        # the whole model minus the attention sublayer written here: MLP and head
        h = h + y
        n2 = grape.nn.RMSNorm(C)
        n2.weight.data.copy_(weights["norm2.weight"])
        hn = n2(h)
        h = h + torch.nn.functional.silu(hn @ weights["w1.weight"].t()) * (hn @ weights["w2.weight"].t()) @ \
            weights["w_out.weight"].t()
        nf = grape.nn.RMSNorm(C)
        nf.weight.data.copy_(model.state_dict()["norm_f.weight"])
        logits = nf(h) @ model.state_dict()["wte.weight"].t()
        assert rel_err(model(ids), logits) < 1e-5
