"""grape.compat against the GRAPE authors' attention variants, each transcribed here in plain PyTorch (float64)
from the paper (docs/GRAPE.pdf of github.com/model-architectures/GRAPE) and a reading of their files:
model/llama-mha-rope.py, llama-mha-grape-m-nonctx.py, llama-mha-grape-m-ctx.py, llama-mha-alibi.py,
llama-mha-grape-a-querygated.py, llama-mha-grape-a-keygated.py, llama-mha-grape-a-querykeygated.py,
llama-mha-fox.py with fox.py (ForgettingAttentionLayer), llama-mha-grape-ap-v1.py, kv_shift_torch.py
(ShiftLinear) and rmsnorm.py. The math below is written from that reading, with their parameter names and
shapes; no code of theirs is copied. Every variant with and without KV-shift must agree to 1e-6."""
import math

import pytest
import torch
import torch.nn.functional as F

import grape
from conftest import rel_err

B, T, C, H = 2, 12, 32, 4
D = C // H
P = 4  # GRAPE-AP's p_head_dim
F32_EPS = torch.finfo(torch.float32).eps  # their F.rms_norm(p) of a float32 probe
GATED = {"grape-a-q": "querygated_bias", "grape-a-k": "keygated_bias", "grape-a-qk": "querykeygated_bias"}


def slopes(n):
    """ALiBi's head slopes: 2^(-8/n) to the powers 1..n for n a power of two (H = 4 here)."""
    assert n & (n - 1) == 0
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n) for i in range(n)], dtype=torch.float64)


def rms(z, gain=None, eps=1e-5):
    y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return y if gain is None else y * gain


def turn_clockwise(z, angles):
    """Their rotation of the planes (i, i + d/2): (a, b) -> (a cos + b sin, -a sin + b cos)."""
    h = z.shape[-1] // 2
    a, b = z[..., :h], z[..., h:]
    return torch.cat([a * angles.cos() + b * angles.sin(), b * angles.cos() - a * angles.sin()], -1)


def their_weights(variant, kv_shift, seed=0):
    """Random float64 weights under the authors' names (keys of their CausalSelfAttention's state_dict)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s
    fox = variant == "fox"
    pre = "core." if fox else ""
    names = ("q_proj", "k_proj", "v_proj", "c_proj") if fox else ("c_q", "c_k", "c_v", "c_proj")
    w = {pre + names[0] + ".weight": r(C, C, s=C ** -0.5), pre + names[3] + ".weight": r(C, C, s=C ** -0.5)}
    for name in names[1:3]:
        if kv_shift:
            w[pre + name + ".linear.weight"] = r(C, C, s=C ** -0.5)
            w[pre + name + ".shift_proj.weight"] = r(H, C, s=C ** -0.5)
        else:
            w[pre + name + ".weight"] = r(C, C, s=C ** -0.5)
    norms = ("q_norm", "k_norm") if fox else ("q_rms", "k_rms")
    for name in norms:  # per-dimension gains away from 1: the place of the norm matters
        w[pre + name + ".weight"] = 1.0 + r(D, s=0.5)
    if variant == "grape-m":
        inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        w["grape.log_freq"] = 16.0 * inv.log() + r(D // 2, s=0.5)
    elif variant == "grape-m-ctx":
        inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        w["grape.log_freq"] = inv.log() + r(D // 2, s=0.3)
        w["omega_proj.weight"] = r(1, C)
        w["omega_proj.bias"] = r(1)
    elif variant in ("grape-a-q", "grape-a-k", "grape-a-qk"):
        m = GATED[variant]
        w[f"{m}.omega"] = r(H)
        if variant != "grape-a-k":
            w[f"{m}.v"] = r(H, D)
        if variant != "grape-a-q":
            w[f"{m}.u"] = r(H, D)
    elif fox:
        w["core.fgate_proj.weight"] = r(H, C, s=C ** -0.5)
        w["core.fgate_proj.bias"] = r(H) + 2.0
    elif variant == "grape-ap":
        w["c_p.weight"] = r(H * P, C, s=C ** -0.5)
    return w


def their_attention(variant, w, x):
    """The authors' attention sublayer, x [B,T,C] (their ln_1 output) -> [B,T,C], from the reading above."""
    fox = variant == "fox"
    pre = "core." if fox else ""
    names = ("q_proj", "k_proj", "v_proj", "c_proj") if fox else ("c_q", "c_k", "c_v", "c_proj")

    def project(name):
        if pre + name + ".weight" in w:
            return (x @ w[pre + name + ".weight"].t()).view(B, T, H, D)
        z = (x @ w[pre + name + ".linear.weight"].t()).view(B, T, H, D)  # ShiftLinear: a mix with the previous
        a = torch.sigmoid(x @ w[pre + name + ".shift_proj.weight"].t()).unsqueeze(-1)  # token, zero before t=0
        before = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1)
        return a * before + (1 - a) * z

    q, k, v = project(names[0]), project(names[1]), project(names[2])
    qn, kn = (w["core.q_norm.weight"], w["core.k_norm.weight"]) if fox else (w["q_rms.weight"], w["k_rms.weight"])
    t = torch.arange(T, dtype=torch.float64)
    i, j = t.view(T, 1), t.view(1, T)
    bias = torch.zeros(B, H, T, T, dtype=torch.float64)
    if variant in ("rope", "grape-m", "grape-m-ctx"):  # rotate first, then the QK-RMSNorm with its gains
        if variant == "rope":
            ang = torch.outer(t, 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))[None, :, None, :]
        elif variant == "grape-m":
            ang = torch.outer(t, torch.exp(w["grape.log_freq"] / 16.0))[None, :, None, :]
        else:  # phase: exclusive cumulative sum of sigmoid(omega_proj(x) / 16)
            om = torch.sigmoid((x @ w["omega_proj.weight"].t() + w["omega_proj.bias"]) / 16.0)  # [B,T,1]
            phi = om.cumsum(1) - om
            ang = (phi.unsqueeze(-1) * torch.exp(w["grape.log_freq"]))  # [B,T,1,D/2]
        q, k = rms(turn_clockwise(q, ang), qn), rms(turn_clockwise(k, ang), kn)
    else:
        q, k = rms(q, qn), rms(k, kn)
    m = slopes(H).view(1, H, 1, 1)
    if variant == "alibi":
        bias = -m * (i - j).clamp_min(0)
    elif variant.startswith("grape-a-"):
        mod = GATED[variant]
        rate = torch.zeros(B, H, T, T, dtype=torch.float64)
        if variant != "grape-a-k":
            vh = F.normalize(w[f"{mod}.v"], dim=-1, eps=1e-6)
            rate = rate + F.softplus((q * vh).sum(-1) / math.sqrt(D)).transpose(1, 2).unsqueeze(-1)
        if variant != "grape-a-q":
            uh = F.normalize(w[f"{mod}.u"], dim=-1, eps=1e-6)
            rate = rate + F.softplus((k * uh).sum(-1) / math.sqrt(D)).transpose(1, 2).unsqueeze(-2)
        bias = -(i - j).clamp_min(0) * F.softplus(w[f"{mod}.omega"]).view(1, H, 1, 1) * m * rate
    elif fox:  # log-forget gates summed inclusively: bias(i, j) = sum over l in (j, i] of log f_l
        logf = F.logsigmoid(x @ w["core.fgate_proj.weight"].t() + w["core.fgate_proj.bias"])  # [B,T,H]
        c = logf.cumsum(1).transpose(1, 2)  # [B,H,T]
        bias = c.unsqueeze(-1) - c.unsqueeze(-2)
    elif variant == "grape-ap":
        p = (x @ w["c_p.weight"].t()).view(B, T, H, P)
        unit = torch.outer(t, torch.ones(P // 2, dtype=torch.float64))[None, :, None, :]  # every frequency 1
        r = turn_clockwise(rms(p, eps=F32_EPS), unit)
        psi = m * F.logsigmoid(torch.einsum("bthp,blhp->bhtl", p, r) / P)  # [B,H,t,l]
        psi = psi.masked_fill(j > i, 0.0)
        bias = psi.sum(-1, keepdim=True) - psi.cumsum(-1)  # sum over l in (j, t]
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D) + bias
    logits = logits.masked_fill(j > i, float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", torch.softmax(logits, -1), v)
    return y.reshape(B, T, C) @ w[pre + names[3] + ".weight"].t()


@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("variant", list(grape.compat.VARIANTS))
def test_compat_equals_the_authors_attention(variant, kv_shift):
    w = their_weights(variant, kv_shift)
    x = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = their_attention(variant, w, x)
    attn = grape.compat.causal_self_attention(variant, w, n_head=H)
    assert attn.pe.options.get("orientation", "grape") == "grape"
    assert (attn.kv_shift is not None) == kv_shift
    with torch.no_grad():
        got = attn(x)
    assert (got - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item())
    # streaming the converted module gives the same outputs
    cache = grape.AttentionCache()
    with torch.no_grad():
        parts = [attn(x[:, :5], cache)] + [attn(x[:, s:s + 1], cache) for s in range(5, T)]
    assert rel_err(torch.cat(parts, 1), expected) <= 1e-6


def test_the_orientation_and_the_order_matter():
    """The transcription is not trivially satisfied: grape's own defaults (standard turn, QK-norm before the
    rotation) give another output on the same weights."""
    w = their_weights("rope", False)
    x = torch.randn(B, T, C, dtype=torch.float64)
    expected = their_attention("rope", w, x)
    kwargs, ours = grape.compat.convert_state_dict("rope", w, n_head=H)
    for change in (dict(pe_options={}), dict(qk_norm="before_rotation")):
        attn = grape.nn.CausalSelfAttention(**dict(kwargs, **change)).double()
        attn.load_state_dict(ours)
        with torch.no_grad():
            assert rel_err(attn(x), expected) > 1e-3


def test_a_prefix_selects_one_layer_of_a_whole_model():
    w = {"transformer.h.3.attn." + k: v for k, v in their_weights("grape-m", True).items()}
    w["transformer.wte.weight"] = torch.zeros(3, C, dtype=torch.float64)
    attn = grape.compat.causal_self_attention("grape-m", w, n_head=H, prefix="transformer.h.3.attn.")
    assert attn.pe.name == "grape-m" and attn.kv_shift is not None


@pytest.mark.parametrize("variant,edit,message", [
    ("rope", lambda w: w.update({"subln.weight": torch.ones(D)}), "subln.weight.*using_groupnorm"),
    ("rope", lambda w: w.update({"c_k.shift_proj.bias": torch.ones(H)}), "shift_bias"),
    ("rope", lambda w: w.pop("c_proj.weight"), "no 'c_proj.weight'"),
    ("alibi", lambda w: w.update({"extra.weight": torch.ones(1)}), "no counterpart.*extra.weight"),
    ("grape-m-ctx", lambda w: w.update({"grape.log_freq": torch.zeros(H, D // 2)}), "grape_share_across_heads"),
    ("fox", lambda w: w.update({"core.fgate_bias": torch.zeros(H)}), "fgate_type"),
    ("grape-ap", lambda w: w.update({"c_q.weight": torch.zeros(2 * C, C)}), "n_head \\* head_dim = 64"),
])
def test_what_grape_cannot_express_is_refused_by_name(variant, edit, message):
    w = their_weights(variant, True)
    edit(w)
    with pytest.raises(ValueError, match=message):
        grape.compat.causal_self_attention(variant, w, n_head=H)


def test_one_sided_kv_shift_and_unknown_variants_are_refused():
    w = their_weights("rope", False)
    w["c_k.linear.weight"] = w.pop("c_k.weight")
    w["c_k.shift_proj.weight"] = torch.zeros(H, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="use_k_shift != use_v_shift"):
        grape.compat.causal_self_attention("rope", w, n_head=H)
    with pytest.raises(ValueError, match="unknown variant 'grape-x'.*grape-ap"):
        grape.compat.causal_self_attention("grape-x", w, n_head=H)
