"""grape for PyTorch: every position encoding of grape as a torch.nn.Module, its fused causal attention as
an autograd function, the attention sublayer and the language model of grape runs (docs/python.md).

    import torch, grape
    enc = grape.PositionEncoding("grape-ap", n_head=8, head_dim=64, model_dim=512)
    y = grape.attention(q, k, v, enc, x=x)       # q, k, v [B,H,T,D] like F.scaled_dot_product_attention
"""
import torch  # noqa: F401  (loads LibTorch before the extension, which links the same library)

from . import _C
from ._modules import KVShift, PositionEncoding, Transformer, encodings, load_run
from .functional import AttentionCache, attention
from .data import lr_at, make_tokenizer, open_data
from . import nn
from . import compat

__all__ = [
    "AttentionCache",
    "KVShift",
    "PositionEncoding",
    "Transformer",
    "attention",
    "compat",
    "encodings",
    "load_run",
    "lr_at",
    "make_tokenizer",
    "nn",
    "open_data",
]
