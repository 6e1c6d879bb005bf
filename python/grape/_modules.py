"""torch.nn.Module faces of grape's C++ modules: encodings, KV-shift and the Transformer of grape runs.

The C++ module keeps its tensors; the Python module registers those very tensors as its Parameters (no
copy), so torch.optim updates what the C++ code computes with, state_dict() keys are the names of grape's
checkpoints, and .double()/.float() convert them in place.
"""
import json

import torch

from . import _C


def _option_text(value):
    """An option value as grape's `--set key=value` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _settings(options):
    return {str(k): _option_text(v) for k, v in options.items()}


def _adopt(cpp, module, buffers):
    """Registers the parameters of the C++ module `cpp` (and of its children, as plain submodules) in
    `module`; collects the C++ buffers in `buffers` (they stay private to C++, as in grape's checkpoints)."""
    for name, t in cpp.own_parameters():
        t.__class__ = torch.nn.Parameter  # the C++ tensor itself becomes the Parameter: one tensor, two faces
        module.register_parameter(name, t)
    buffers.extend(b for _, b in cpp.own_buffers())
    for name, child in cpp.children():
        sub = torch.nn.Module()
        _adopt(child, sub, buffers)
        module.add_module(name, sub)


class _CppModule(torch.nn.Module):
    """A torch.nn.Module whose parameters are those of a grape C++ module (self._cpp)."""

    def __init__(self, cpp):
        super().__init__()
        self._cpp = cpp
        self._cpp_buffers = []
        _adopt(cpp, self, self._cpp_buffers)

    def _apply(self, fn):
        before = {name: p for name, p in self.named_parameters()}
        super()._apply(fn)  # converts each Parameter in place (param.data = fn(param)): C++ sees the result
        for name, p in self.named_parameters():
            if p is not before[name]:
                raise RuntimeError(f"grape: {type(self).__name__}.{name} was replaced by a new tensor, which "
                                   "would detach it from the C++ module; torch.__future__."
                                   "set_overwrite_module_params_on_conversion(True) is not supported")
        with torch.no_grad():
            for b in self._cpp_buffers:
                b.data = fn(b)  # as LibTorch's Module::to converts buffers
        return self

    def train(self, mode=True):
        super().train(mode)
        self._cpp.train(mode)
        return self

    def __deepcopy__(self, memo):
        raise TypeError(f"grape: a {type(self).__name__} cannot be deep-copied (its tensors live in C++); "
                        "build a new one and load_state_dict() into it")


def encodings():
    """Every registered encoding: a list of dicts with name, family, summary, options
    ({key: {"default": text, "help": text}}) and parameters (lines "name  shape  init")."""
    out = []
    for e in _C.encodings():
        options = {k: {"default": d, "help": h} for k, (d, h) in e["options"].items()}
        out.append(dict(e, options=options))
    return out


class PositionEncoding(_CppModule):
    """A grape position encoding by name, with its options as keyword arguments:

        grape.PositionEncoding("grape-ap", n_head=8, head_dim=64, model_dim=512)
        grape.PositionEncoding("rope", n_head=8, head_dim=64, base=500000, pairing="interleaved")

    model_dim (the width C of the layer input x, read by contextual encodings) defaults to n_head *
    head_dim. Unknown names and options raise ValueError listing the known ones (grape.encodings()).
    state_dict() keys are grape's checkpoint names after "blocks.N.pe.". Calling it runs grape.attention.
    """

    def __init__(self, name, n_head=8, head_dim=64, model_dim=None, **options):
        if model_dim is None:
            model_dim = n_head * head_dim
        for what, value in (("n_head", n_head), ("head_dim", head_dim), ("model_dim", model_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"grape.PositionEncoding: {what} must be a positive integer, got {value!r}")
        super().__init__(_C.make_encoding(str(name), n_head, head_dim, model_dim, _settings(options)))
        self.options = dict(options)

    name = property(lambda self: self._cpp.name)
    n_head = property(lambda self: self._cpp.heads)
    head_dim = property(lambda self: self._cpp.head_dim)
    model_dim = property(lambda self: self._cpp.model_dim)
    properties = property(lambda self: self._cpp.properties, doc="which hooks apply (grape::Properties)")
    fused = property(lambda self: self._cpp.fused, doc="whether the fused kernels compute it (in fp32)")

    def forward(self, q, k, v, x=None, **kwargs):
        from .functional import attention

        return attention(q, k, v, self, x=x, **kwargs)

    def embed(self, h, offset=0):
        """h [B,T,C] token embeddings of positions offset.. -> h + PE (sinusoidal, learned; else h)."""
        return self._cpp.embed(h, int(offset))

    def extra_repr(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.name!r}, n_head={self.n_head}, head_dim={self.head_dim}, model_dim={self.model_dim}{opts}"


class KVShift(_CppModule):
    """KV-shift: k_t = a k_{t-1} + (1 - a) k_t (and v), a = sigmoid(w . x_t) per head; parameters w_k, w_v."""

    def __init__(self, n_head, head_dim, model_dim):
        super().__init__(_C.KVShift(n_head, head_dim, model_dim))

    def forward(self, k, v, x, cache=None):
        """k, v [B,T,H,D] raw projections, x [B,T,C]; with a cache, continues its sequences."""
        return self._cpp.forward(k, v, x, cache)


class Transformer(_CppModule):
    """grape's decoder language model (docs/training.md); state_dict() keys are its checkpoint names.

    Transformer(preset="tiny", pe="fox", n_layer=2, ...) takes the keys of `grape train --set` (and pe
    options as "pe.KEY"); it is initialised as `grape train` initialises it from torch's global generator
    (torch.manual_seed(seed) first reproduces a run's initial weights).
    """

    def __init__(self, _cpp=None, tokenizer=None, **settings):
        super().__init__(_cpp if _cpp is not None else _C.Transformer(_settings(settings)))
        self.tokenizer = tokenizer

    @property
    def config(self):
        return json.loads(self._cpp.config_json)

    def num_parameters(self):
        return self._cpp.num_parameters()

    def forward(self, tokens):
        """tokens [B,T] int64 -> logits [B,T,V] float32."""
        return self._cpp.forward(tokens)

    def loss(self, tokens, targets):
        return self._cpp.loss(tokens, targets)

    def generate(self, prompt, max_tokens=256, temperature=0.8, top_k=0, top_p=1.0, seed=0):
        """Samples a continuation with the KV cache. prompt: text (needs the run's tokenizer; returns text)
        or a list of token ids (returns ids). temperature 0 is greedy."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("grape: this model has no tokenizer (load it with grape.load_run): pass ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("grape: generate needs a non-empty prompt")
        eot = self.tokenizer.eot if self.tokenizer is not None else -1
        with torch.no_grad():
            out = _C.generate(self._cpp, [ids], float(temperature), int(top_k), float(top_p), int(max_tokens),
                              int(seed), eot)[0]
        return self.tokenizer.decode(out) if isinstance(prompt, str) else out


def load_run(run_dir, checkpoint=""):
    """The trained Transformer of a run directory (`grape train --out DIR`), latest checkpoint by default,
    with its tokenizer (model.tokenizer), in eval mode."""
    cpp, tokenizer = _C.load_run(str(run_dir), str(checkpoint))
    return Transformer(_cpp=cpp, tokenizer=tokenizer).eval()
