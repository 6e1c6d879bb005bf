"""grape.attention: causal attention with a grape position encoding, differentiable in every input."""
import torch

from . import _C

AttentionCache = _C.AttentionCache
AttentionCache.__doc__ = """The streaming state of one attention layer: pass the same cache to successive
grape.attention calls (chunks of any length, e.g. a prompt then one token at a time) and the outputs equal
one call on the whole sequence. One cache per layer and batch; .length is the number of tokens seen."""

_LAYOUTS = ("bhtd", "bthd")
_IMPLS = ("fused", "reference")


def _check_tensor(name, t, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"grape.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"grape.attention: {name} is on {t.device}; grape computes on the CPU (move it with "
                         ".cpu())")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grape.attention: {name} has dtype {t.dtype}; grape takes torch.float32 (fused "
                        "kernels) or torch.float64 (reference)")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"grape.attention: {name} has dtype {t.dtype} but q has {dtype}")


def _encoded_norm(pair, encoding, dtype):
    """The C++ form of encoded_norm=(q_norm, k_norm), checked."""
    from .nn import RMSNorm

    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(n, RMSNorm) for n in pair)):
        raise TypeError("grape.attention: encoded_norm must be a pair (q_norm, k_norm) of grape.nn.RMSNorm")
    if not encoding.properties["qk_norm_after_encode"]:
        raise ValueError(f"grape.attention: encoded_norm (qk_norm='after_rotation') is not defined for the "
                         f"{encoding.name!r} encoding: its encode scales q and k, reads them for its bias, or "
                         "rotates inside attention; normalise q and k before it (qk_norm='before_rotation')")
    for name, n in zip(("q_norm", "k_norm"), pair):
        if tuple(n.weight.shape) != (encoding.head_dim,) or n.weight.dtype != dtype:
            raise ValueError(f"grape.attention: encoded_norm's {name} has weight {list(n.weight.shape)} "
                             f"{n.weight.dtype}; q~ needs [{encoding.head_dim}] {dtype}")
    if pair[0].eps != pair[1].eps:
        raise ValueError("grape.attention: encoded_norm's q_norm and k_norm must have the same eps")
    return _C.EncodedNorm(pair[0].weight, pair[1].weight, float(pair[0].eps))


def attention(q, k, v, encoding, x=None, *, layout="bhtd", cache=None, impl="fused", encoded_norm=None):
    """softmax(q~ . k~ / sqrt(D) + bias, causal) v with the grape encoding `encoding` (a PositionEncoding).

    q, k, v: [B,H,T,D] (layout="bhtd", the layout of torch.nn.functional.scaled_dot_product_attention and
    of nanoGPT after its transpose) or [B,T,H,D] (layout="bthd", grape's own; no copy is made in either
    case when the tensors come from a [B,T,H*D] projection). Returns y in the same layout.
    x: [B,T,C] the layer input, required by contextual encodings (grape-m-ctx, fox, grape-ap, ...).
    cache: an AttentionCache to continue (streaming decode); None attends from position 0.
    impl: "fused" runs the fused CPU kernels in float32 where the encoding allows (others, and float64, take
    the reference); "reference" always composes LibTorch ops. Gradients reach q, k, v, x and the encoding's
    parameters. Runs without the GIL on torch.get_num_threads() threads.
    encoded_norm: None, or a pair (q_norm, k_norm) of grape.nn.RMSNorm(head_dim) applied to the encoded q~ and
    k~ before the dot product and the cache: QK-norm after the rotation (the GRAPE authors' order), for
    encodings with properties["qk_norm_after_encode"].
    """
    from ._modules import PositionEncoding

    if not isinstance(encoding, PositionEncoding):
        raise TypeError("grape.attention: encoding must be a grape.PositionEncoding, got "
                        f"{type(encoding).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"grape.attention: layout must be one of {_LAYOUTS}, got {layout!r}")
    if impl not in _IMPLS:
        raise ValueError(f"grape.attention: impl must be one of {_IMPLS}, got {impl!r}")
    if cache is not None and not isinstance(cache, AttentionCache):
        raise TypeError(f"grape.attention: cache must be a grape.AttentionCache, got {type(cache).__name__}")
    _check_tensor("q", q)
    _check_tensor("k", k, q.dtype)
    _check_tensor("v", v, q.dtype)
    dims = "[B,H,T,D]" if layout == "bhtd" else "[B,T,H,D]"
    if q.dim() != 4:
        raise ValueError(f"grape.attention: q must be {dims} (layout={layout!r}), got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"grape.attention: {name} has shape {list(t.shape)}, q has {list(q.shape)}")
    if layout == "bhtd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, T, H, D = q.shape
    if B < 1 or T < 1:
        raise ValueError(f"grape.attention: empty input {dims} = {[B, H, T, D] if layout == 'bhtd' else [B, T, H, D]}")
    if H != encoding.n_head or D != encoding.head_dim:
        raise ValueError(f"grape.attention: q has {H} heads of dim {D}, the {encoding.name!r} encoding was built "
                         f"for n_head={encoding.n_head}, head_dim={encoding.head_dim}")
    for name, p in encoding.named_parameters():
        if p.is_floating_point() and p.dtype != q.dtype:
            raise TypeError(f"grape.attention: the encoding's parameter {name} is {p.dtype} but q is {q.dtype}: "
                            "convert one of them (encoding.double() or .float())")
    if x is None:
        if encoding.properties["contextual"]:
            raise ValueError(f"grape.attention: the {encoding.name!r} encoding reads the layer input: pass x "
                             f"[B,T,C] with C={encoding.model_dim}")
    else:
        _check_tensor("x", x, q.dtype)
        if tuple(x.shape) != (B, T, encoding.model_dim):
            raise ValueError(f"grape.attention: x must be [B,T,C] = {[B, T, encoding.model_dim]}, got "
                             f"{list(x.shape)}")
        x = x.contiguous()
    norm = None
    if encoded_norm is not None:
        norm = _encoded_norm(encoded_norm, encoding, q.dtype)
    y = _C.attention(encoding._cpp, q.contiguous(), k.contiguous(), v.contiguous(), x, cache, impl, norm)
    return y.transpose(1, 2) if layout == "bhtd" else y
