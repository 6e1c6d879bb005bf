"""grape.compat: the attention sublayers of the GRAPE authors' code (github.com/model-architectures/GRAPE,
model/llama-mha-*.py and model/fox.py) as grape.nn.CausalSelfAttention, weights included.

    attn = grape.compat.causal_self_attention("grape-m", their_attn.state_dict(), n_head=8)
    y = attn(x)      # == their_attn(x), x [B,T,C] the block's normalised input (their ln_1(x))

Their conventions, and what grape sets to follow them (docs/python.md, "The GRAPE authors' models"):
- rotations turn clockwise (their apply_rotary_emb): orientation="grape" on every rotary encoding and on
  GRAPE-AP's key probe; planes (i, i + D/2): pairing "half" (grape's default);
- QK-RMSNorm with a per-dimension gain comes *after* the rotation: qk_norm="after_rotation" (for the variants
  that do not rotate q and k the two orders are the same computation);
- KV-shift is a ShiftLinear in place of c_k and c_v (linear.weight, shift_proj.weight [H,C]): grape's KVShift
  with w_k, w_v = their shift_proj weights; k_t = a k_{t-1} + (1 - a) k_t, a = sigmoid(w . x_t).
The sdpa scale 1/sqrt(head_dim), ALiBi slopes, GRAPE-A's softplus(omega) * slope and L2-normalised gate
directions, FoX's inclusive cumulative log-forget gate, GRAPE-M's exp(log_freq / 16) and GRAPE-M-ctx's
sigmoid((w.x + b)/16) are grape's own definitions of these encodings. Configurations grape cannot express
(see GAPS) are refused with a ValueError naming the key or option, never approximated.
"""
import torch

from .nn import CausalSelfAttention

# The authors' variant -> grape's encoding; the first name is the one this module takes.
VARIANTS = {
    "rope": "rope",                 # model/llama-mha-rope.py
    "grape-m": "grape-m",           # model/llama-mha-grape-m-nonctx.py (MSGRAPECommuting)
    "grape-m-ctx": "grape-m-ctx",   # model/llama-mha-grape-m-ctx.py (MSGRAPEContextType1)
    "alibi": "alibi",               # model/llama-mha-alibi.py
    "grape-a-q": "grape-a-q",       # model/llama-mha-grape-a-querygated.py
    "grape-a-k": "grape-a-k",       # model/llama-mha-grape-a-keygated.py
    "grape-a-qk": "grape-a-qk",     # model/llama-mha-grape-a-querykeygated.py
    "fox": "fox",                   # model/llama-mha-fox.py + model/fox.py (ForgettingAttentionLayer)
    "grape-ap": "grape-ap",         # model/llama-mha-grape-ap-v1.py
}

# What of theirs has no counterpart in grape (refused when its weights are present).
GAPS = {
    "subln.weight": "using_groupnorm (an RMSNorm on each head's output): grape's sublayer has none",
    "output_norm.weight": "use_output_norm (FoX's per-head output RMSNorm): grape's sublayer has none",
    "ogate_proj.weight": "use_output_gate (FoX's output gate): grape's sublayer has none",
    "shift_proj.bias": "shift_bias=True in ShiftLinear: grape's KV-shift gate has no bias",
    "fgate_bias": "fgate_type 'bias_only'/'fixed' (a data-independent forget gate): grape's fox has only the "
                  "data-dependent gate (fgate_type='full')",
}

# GRAPE-A's parameters by variant: their module name and grape's names of (omega, v, u).
_GRAPE_A = {"grape-a-q": "querygated_bias", "grape-a-k": "keygated_bias", "grape-a-qk": "querykeygated_bias"}


def _take(sd, key, used, where):
    if key not in sd:
        raise ValueError(f"grape.compat ({where}): the state_dict has no '{key}'")
    used.add(key)
    return sd[key]


def convert_state_dict(variant, state_dict, n_head, *, prefix="", rope_base=10000.0, log_freq_scale=16.0,
                       ctx_omega_scale=16.0, probe_eps=None):
    """(kwargs of grape.nn.CausalSelfAttention, its state_dict) for the authors' attention module `variant`
    with weights `state_dict` (the keys of their CausalSelfAttention: c_q.weight, q_rms.weight, grape.log_freq,
    core.q_proj.weight, ...; `prefix` is stripped first, e.g. "transformer.h.0.attn.").

    rope_base: their config.rope_base (rope). log_freq_scale: grape_log_freq_scale (grape-m, 16).
    ctx_omega_scale: grape_ctx_omega_scale (grape-m-ctx, 16). probe_eps: the eps of GRAPE-AP's key-probe
    RMSNorm; their F.rms_norm(p, ...) uses torch.finfo(p.dtype).eps, so the default is float32's (1.19e-7),
    what a float32 run of theirs computed.
    """
    if variant not in VARIANTS:
        raise ValueError(f"grape.compat: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    where = variant
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"grape.compat ({where}): no key of the state_dict starts with prefix {prefix!r}")
    for key in sd:
        for gap, why in GAPS.items():
            if key.endswith(gap):
                raise ValueError(f"grape.compat ({where}): '{key}' has no counterpart in grape: {why}")
    used, out = set(), {}
    fox = variant == "fox"
    base = "core." if fox else ""
    names = dict(q="q_proj", k="k_proj", v="v_proj", o="c_proj", qn="q_norm", kn="k_norm") if fox else \
        dict(q="c_q", k="c_k", v="c_v", o="c_proj", qn="q_rms", kn="k_rms")
    out["wq.weight"] = _take(sd, base + names["q"] + ".weight", used, where)
    shifted = {}
    for z in ("k", "v"):
        plain, linear = base + names[z] + ".weight", base + names[z] + ".linear.weight"
        shifted[z] = linear in sd
        out[f"w{z}.weight"] = _take(sd, linear if shifted[z] else plain, used, where)
        if shifted[z]:
            out[f"kv_shift.w_{z}"] = _take(sd, base + names[z] + ".shift_proj.weight", used, where)
    if shifted["k"] != shifted["v"]:
        raise ValueError(f"grape.compat ({where}): only the {'key' if shifted['k'] else 'value'} projection is a "
                         "ShiftLinear (use_k_shift != use_v_shift); grape's KV-shift shifts both")
    out["wo.weight"] = _take(sd, base + names["o"] + ".weight", used, where)
    HD, C = out["wq.weight"].shape
    if HD % n_head != 0:
        raise ValueError(f"grape.compat ({where}): c_q.weight has {HD} rows, not a multiple of n_head={n_head}")
    D = HD // n_head
    if HD != C or tuple(out["wo.weight"].shape) != (C, HD):
        raise ValueError(f"grape.compat ({where}): n_head * head_dim = {HD} must equal n_embd = {C} (grape's "
                         "sublayer projects C -> C)")
    norm = (base + names["qn"] + ".weight") in sd
    if norm:
        out["q_norm.weight"] = _take(sd, base + names["qn"] + ".weight", used, where)
        out["k_norm.weight"] = _take(sd, base + names["kn"] + ".weight", used, where)
        if tuple(out["q_norm.weight"].shape) != (D,):
            raise ValueError(f"grape.compat ({where}): {names['qn']}.weight has shape "
                             f"{list(out['q_norm.weight'].shape)}; grape's QK-norm has one gain over head_dim "
                             f"= {D} shared by the heads (qk_norm_share_param_across_head=True)")
    rotates = variant in ("rope", "grape-m", "grape-m-ctx")
    options = {}
    if variant == "rope":
        options = dict(base=float(rope_base), orientation="grape")
    elif variant == "grape-m":
        lf = _take(sd, "grape.log_freq", used, where)
        options = dict(orientation="grape", log_freq_scale=float(log_freq_scale), per_head=lf.dim() == 2)
        out["pe.lambda"] = lf if lf.dim() == 2 else lf.unsqueeze(0)
    elif variant == "grape-m-ctx":
        lf = _take(sd, "grape.log_freq", used, where)
        if lf.dim() != 1:
            raise ValueError(f"grape.compat ({where}): grape.log_freq has shape {list(lf.shape)}: per-head "
                             "frequencies (grape_share_across_heads=False) have no counterpart in grape's "
                             "grape-m-ctx, whose frequencies are shared by the heads")
        w = _take(sd, "omega_proj.weight", used, where)
        out["pe.lambda"] = lf
        out["pe.w_omega"] = w
        out["pe.b_omega"] = _take(sd, "omega_proj.bias", used, where)
        options = dict(orientation="grape", gate_scale=float(ctx_omega_scale), per_head=w.shape[0] != 1)
    elif variant in _GRAPE_A:
        m = _GRAPE_A[variant]
        out["pe.rho"] = _take(sd, f"{m}.omega", used, where)
        if variant in ("grape-a-q", "grape-a-qk"):
            out["pe.v"] = _take(sd, f"{m}.v", used, where)
        if variant in ("grape-a-k", "grape-a-qk"):
            out["pe.u"] = _take(sd, f"{m}.u", used, where)
    elif fox:
        out["pe.w_f"] = _take(sd, "core.fgate_proj.weight", used, where)
        out["pe.b_f"] = _take(sd, "core.fgate_proj.bias", used, where)
    elif variant == "grape-ap":
        w = _take(sd, "c_p.weight", used, where)
        if w.shape[0] % n_head != 0:
            raise ValueError(f"grape.compat ({where}): c_p.weight has {w.shape[0]} rows, not n_head * p_head_dim")
        eps = torch.finfo(torch.float32).eps if probe_eps is None else float(probe_eps)
        out["pe.w_p"] = w
        options = dict(probe_dim=w.shape[0] // n_head, orientation="grape", eps=eps)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"grape.compat ({where}): keys with no counterpart in grape's sublayer: {', '.join(left)} "
                         "(p_tie_mode other than 'none' and FoX's use_rope are not supported)")
    kwargs = dict(d_model=C, n_head=n_head, pe=VARIANTS[variant], pe_options=options, kv_shift=shifted["k"],
                  qk_norm=("after_rotation" if rotates else "before_rotation") if norm else "off")
    return kwargs, out


def causal_self_attention(variant, state_dict, n_head, *, impl="fused", **conventions):
    """A grape.nn.CausalSelfAttention equal to the authors' attention module `variant` with weights
    `state_dict` (see convert_state_dict for the keyword arguments), in the dtype of their c_q weight."""
    kwargs, weights = convert_state_dict(variant, state_dict, n_head, **conventions)
    dtype = weights["wq.weight"].dtype
    attn = CausalSelfAttention(**kwargs, impl=impl).to(dtype)
    missing, unexpected = attn.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    if missing or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"grape.compat ({variant}): missing {missing}, unexpected {unexpected}")
    return attn
