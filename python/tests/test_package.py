"""The package: import, the encoding registry, encodings as torch.nn.Modules, bad input."""
import pickle

import pytest
import torch

import grape
from conftest import B, C, D, H, NAMES, inputs, make


def test_import_next_to_torch_and_list_encodings():
    listed = {e["name"]: e for e in grape.encodings()}
    for name in ("rope", "alibi", "fox", "grape-m", "grape-ap", "grape-m-ctx", "t5", "tape", "nope"):
        assert name in listed
    assert len(listed) >= 25
    rope = listed["rope"]
    assert rope["family"] == "multiplicative"
    assert rope["options"]["base"]["default"] == "10000"
    assert rope["options"]["pairing"]["default"] == "half"
    assert "help" in rope["options"]["base"] and rope["options"]["base"]["help"]
    assert any(line.startswith("lambda") for line in listed["grape-m"]["parameters"])


@pytest.mark.parametrize("name", NAMES)
def test_every_encoding_is_a_module_with_checkpoint_names(name):
    enc = grape.PositionEncoding(name, n_head=H, head_dim=D, model_dim=C)
    assert enc.name == name and enc.n_head == H and enc.head_dim == D and enc.model_dim == C
    # the names of a grape checkpoint: "blocks.0.pe.NAME" (layer 0: TAPE's last layer has no update weights)
    model = grape.Transformer(n_layer=2, n_head=H, n_embd=H * D, pe=name, context=16)
    ckpt = {k[len("blocks.0.pe."):] for k in model.state_dict() if k.startswith("blocks.0.pe.")}
    if enc.properties["embeds"]:
        ckpt = {k[len("pe."):] for k in model.state_dict() if k.startswith("pe.")}
    assert set(enc.state_dict().keys()) == ckpt
    # .double() converts in place the very tensors C++ computes with
    enc.double()
    for p in enc.parameters():
        assert p.dtype == torch.float64
    q, k, v, x = inputs(5, torch.float64)
    y = grape.attention(q, k, v, enc, x=x, layout="bthd")
    assert y.dtype == torch.float64 and y.shape == q.shape


@pytest.mark.parametrize("name", NAMES)
def test_double_then_float_gives_back_the_same_encoding(name):
    enc = make(name)
    q, k, v, x = inputs(40)
    before = grape.attention(q, k, v, enc, x=x, layout="bthd")
    enc.double()
    enc.float()  # parameters and buffers convert in place, and float32 -> float64 -> float32 is exact
    assert torch.equal(grape.attention(q, k, v, enc, x=x, layout="bthd"), before)


def test_parameters_reach_the_optimizer_and_the_cpp_module():
    enc = grape.PositionEncoding("grape-m", n_head=H, head_dim=D, model_dim=C)
    (lam,) = list(enc.parameters())
    q, k, v, _ = inputs(9)
    y0 = grape.attention(q, k, v, enc, layout="bthd")
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    (y0 * torch.randn_like(y0)).sum().backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    before = lam.detach().clone()
    opt.step()
    assert (lam - before).abs().max() > 0
    y1 = grape.attention(q, k, v, enc, layout="bthd")  # the C++ encoding computes with the updated lambda
    assert (y1 - y0).abs().max() > 1e-4
    # load_state_dict copies into the same tensors: the output is back to y0
    enc.load_state_dict({"lambda": before})
    assert torch.equal(grape.attention(q, k, v, enc, layout="bthd"), y0)


def test_options_and_bad_construction_raise_clear_errors():
    enc = grape.PositionEncoding("rope", n_head=H, head_dim=D, base=500000, pairing="interleaved")
    assert enc.options == {"base": 500000, "pairing": "interleaved"}
    with pytest.raises(ValueError, match="nosuch"):
        grape.PositionEncoding("nosuch", n_head=H, head_dim=D)
    with pytest.raises(ValueError, match="bogus"):
        grape.PositionEncoding("rope", n_head=H, head_dim=D, bogus=1)
    with pytest.raises(ValueError, match="base"):
        grape.PositionEncoding("rope", n_head=H, head_dim=D, base="ten")
    with pytest.raises(ValueError, match="head_dim"):
        grape.PositionEncoding("rope", n_head=H, head_dim=7)  # a rotation needs pairs
    with pytest.raises(ValueError, match="n_head"):
        grape.PositionEncoding("rope", n_head=0, head_dim=D)


def test_bad_attention_inputs_raise_clear_errors():
    enc = make("fox")
    q, k, v, x = inputs(6)
    bhtd = lambda t: t.transpose(1, 2)  # noqa: E731
    q4, k4, v4 = bhtd(q), bhtd(k), bhtd(v)
    cases = [
        (TypeError, "dtype torch.float16", dict(q=q4.half())),
        (TypeError, "dtype torch.int64", dict(v=v4.long())),
        (TypeError, "k has dtype torch.float64 but q has torch.float32", dict(k=k4.double())),
        (ValueError, r"q must be \[B,H,T,D\]", dict(q=q4[0], k=k4[0], v=v4[0])),
        (ValueError, "k has shape", dict(k=k4[:, :, :3])),
        (ValueError, "q has 2 heads of dim 8", dict(q=q4[..., :8], k=k4[..., :8], v=v4[..., :8])),
        (ValueError, "reads the layer input", dict(x=None)),
        (ValueError, r"x must be \[B,T,C\]", dict(x=x[:, :, :5])),
        (ValueError, "layout must be one of", dict(layout="btdh")),
        (ValueError, "impl must be one of", dict(impl="cuda")),
        (TypeError, "must be a torch.Tensor", dict(q=[1.0])),
        (TypeError, "cache must be a grape.AttentionCache", dict(cache={})),
        (ValueError, "not finite|non-finite|NaN", dict(q=q4.clone().fill_(float("nan")))),
    ]
    for exc, message, change in cases:
        args = dict(q=q4, k=k4, v=v4, x=x)
        args.update(change)
        kw = {key: args.pop(key) for key in ("layout", "impl", "cache") if key in args}
        with pytest.raises(exc, match=message):
            grape.attention(args["q"], args["k"], args["v"], enc, x=args["x"], **kw)
    with pytest.raises(TypeError, match="must be a grape.PositionEncoding"):
        grape.attention(q4, k4, v4, "fox", x=x)
    with pytest.raises(TypeError, match="parameter w_f|parameter .* is torch.float64"):
        grape.attention(q4, k4, v4, make("fox").double(), x=x)
    # a tensor on another device (the meta device exists in every build of torch, CUDA or not)
    with pytest.raises(ValueError, match="q is on meta; grape computes on the CPU"):
        grape.attention(torch.empty(q4.shape, device="meta"), k4, v4, enc, x=x)
    # non-contiguous inputs are accepted: the same numbers as contiguous ones
    qn = torch.randn(B, 6, H, 2 * D)[..., ::2]
    assert not qn.is_contiguous()
    y1 = grape.attention(qn, k, v, enc, x=x, layout="bthd")
    y2 = grape.attention(qn.contiguous(), k, v, enc, x=x, layout="bthd")
    assert torch.equal(y1, y2)


def test_cache_misuse_raises():
    enc, other = make("rope"), make("rope")
    q, k, v, _ = inputs(4)
    cache = grape.AttentionCache()
    grape.attention(q, k, v, enc, layout="bthd", cache=cache)
    assert cache.length == 4 and cache.batch == B
    with pytest.raises(ValueError, match="another rope encoding"):
        grape.attention(q, k, v, other, layout="bthd", cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences, the input has 1"):
        grape.attention(q[:1], k[:1], v[:1], enc, layout="bthd", cache=cache)
    assert cache.length == 4  # a refused chunk leaves the cache as it was


def test_deepcopy_and_pickle_are_refused_clearly():
    import copy

    enc = make("rope")
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(enc)
    with pytest.raises(Exception):
        pickle.dumps(enc)
