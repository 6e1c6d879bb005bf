"""Drop-in layers: grape.nn.CausalSelfAttention replaces nanoGPT's attention in one line."""
import torch

from ._modules import KVShift, PositionEncoding
from .functional import attention

QK_NORMS = ("before_rotation", "after_rotation", "off")


class RMSNorm(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; fp16/bf16 computed in fp32 (as grape's)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class CausalSelfAttention(torch.nn.Module):
    """Causal multi-head self-attention with a grape position encoding: x [B,T,C] -> [B,T,C].

    The attention sublayer of grape's Transformer block, with its parameter names (wq, wk, wv, wo: bias-free
    linears; q_norm, k_norm: RMSNorm over head_dim shared by the heads; kv_shift; pe), so a grape
    checkpoint's "blocks.N.wq.weight" is this module's "wq.weight". x is the (normalised) layer input, which
    contextual encodings and KV-shift read. qk_norm: "before_rotation" (True; grape's order: normalise q, k,
    then encode), "after_rotation" (the GRAPE authors' order: normalise the encoded q~, k~; encodings with
    .properties["qk_norm_after_encode"]) or "off" (False). pe_options are the encoding's options. With a
    cache (grape.AttentionCache), continues it.
    """

    def __init__(self, d_model, n_head, pe="rope", pe_options=None, kv_shift=False, qk_norm="before_rotation",
                 norm_eps=1e-5, impl="fused"):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"grape.nn.CausalSelfAttention: d_model={d_model} is not divisible by "
                             f"n_head={n_head}")
        if qk_norm is True:
            qk_norm = "before_rotation"
        elif qk_norm is False:
            qk_norm = "off"
        if qk_norm not in QK_NORMS:
            raise ValueError(f"grape.nn.CausalSelfAttention: qk_norm must be one of {QK_NORMS} (or a bool), "
                             f"got {qk_norm!r}")
        self.n_head, self.head_dim, self.qk_norm, self.impl = n_head, d_model // n_head, qk_norm, impl
        self.wq = torch.nn.Linear(d_model, d_model, bias=False)
        self.wk = torch.nn.Linear(d_model, d_model, bias=False)
        self.wv = torch.nn.Linear(d_model, d_model, bias=False)
        self.wo = torch.nn.Linear(d_model, d_model, bias=False)
        if qk_norm != "off":
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.kv_shift = KVShift(n_head, self.head_dim, d_model) if kv_shift else None
        self.pe = PositionEncoding(pe, n_head=n_head, head_dim=self.head_dim, model_dim=d_model,
                                   **(pe_options or {}))
        if qk_norm == "after_rotation" and not self.pe.properties["qk_norm_after_encode"]:
            raise ValueError(f"grape.nn.CausalSelfAttention: qk_norm='after_rotation' is not defined for the "
                             f"{self.pe.name!r} encoding (it scales q and k, reads them for its bias, or rotates "
                             "inside attention); use qk_norm='before_rotation'")

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_head, self.head_dim)
        if self.kv_shift is not None:  # on the raw projections, before the normalisation
            k, v = self.kv_shift(k, v, x, cache)
        if self.qk_norm == "before_rotation":
            q, k = self.q_norm(q), self.k_norm(k)
        after = (self.q_norm, self.k_norm) if self.qk_norm == "after_rotation" else None
        y = attention(q, k, v, self.pe, x=x, layout="bthd", cache=cache, impl=self.impl, encoded_norm=after)
        return self.wo(y.reshape(B, T, C))
