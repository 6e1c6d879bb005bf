"""`grape attn forward` (the CLI's attention sublayer, for checks without Python) against
grape.nn.CausalSelfAttention with the same weights, and its errors for bad input."""
import json
import struct
import subprocess

import numpy as np
import pytest
import torch

import grape
from conftest import rel_err

C, H, T = 32, 4, 10


def write_safetensors(path, tensors):
    """A .safetensors file (8-byte header length, JSON header, raw little-endian data), written here."""
    header, blobs, offset = {}, [], 0
    for name, t in sorted(tensors.items()):
        data = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def sublayer(pe, kv_shift, qk_norm, **pe_options):
    torch.manual_seed(0)
    attn = grape.nn.CausalSelfAttention(C, H, pe=pe, kv_shift=kv_shift, qk_norm=qk_norm, pe_options=pe_options)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    return attn


def run(cli, *args):
    return subprocess.run([cli, "--threads", "1", "attn", "forward", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("pe,kv_shift,qk_norm,options", [
    ("rope", False, "before_rotation", {}),
    ("rope", True, "after_rotation", {"orientation": "grape"}),
    ("grape-m-ctx", True, "after_rotation", {}),
    ("fox", True, "off", {}),
    ("grape-ap", False, "before_rotation", {"probe_dim": 4}),
    ("alibi", False, "off", {}),
])
def test_cli_equals_the_python_sublayer(cli, tmp_path, pe, kv_shift, qk_norm, options):
    attn = sublayer(pe, kv_shift, qk_norm, **options)
    write_safetensors(tmp_path / "w.safetensors", attn.state_dict())
    x = torch.randn(2, T, C)
    np.save(tmp_path / "x.npy", x.numpy())
    sets = [a for k, v in options.items() for a in ("--pe-set", f"{k}={v}")]
    r = run(cli, "--x", tmp_path / "x.npy", "--weights", tmp_path / "w.safetensors", "--n-head", H, "--pe", pe,
            *sets, *(["--kv-shift"] if kv_shift else []), "--qk-norm", qk_norm, "--out", tmp_path / "y.npy",
            "--logits", tmp_path / "l.npy")
    assert r.returncode == 0, r.stdout + r.stderr
    y, logits = torch.from_numpy(np.load(tmp_path / "y.npy")), torch.from_numpy(np.load(tmp_path / "l.npy"))
    with torch.no_grad():
        expected = attn(x)
        assert rel_err(y, expected) <= 1e-5
        assert logits.shape == (2, H, T, T)
        above = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert torch.isinf(logits[..., above]).all() and (logits[..., above] < 0).all()
        assert torch.isfinite(logits[..., ~above]).all()
        if not kv_shift:  # the logits are the ones the output was computed with
            v = attn.wv(x).view(2, T, H, C // H).transpose(1, 2)
            y2 = attn.wo((torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, T, C))
            assert rel_err(y2, expected) <= 1e-5


def test_cli_logits_of_alibi_are_the_formula(cli, tmp_path):
    attn = sublayer("alibi", False, "off")
    write_safetensors(tmp_path / "w.safetensors", attn.state_dict())
    x = torch.randn(T, C)
    np.save(tmp_path / "x.npy", x.numpy())
    r = run(cli, "--x", tmp_path / "x.npy", "--weights", tmp_path / "w.safetensors", "--n-head", H, "--pe", "alibi",
            "--qk-norm", "off", "--out", tmp_path / "y.npy", "--logits", tmp_path / "l.npy")
    assert r.returncode == 0, r.stdout + r.stderr
    logits = torch.from_numpy(np.load(tmp_path / "l.npy"))
    assert logits.shape == (H, T, T) and np.load(tmp_path / "y.npy").shape == (T, C)
    with torch.no_grad():
        q = attn.wq(x).view(T, H, C // H).transpose(0, 1)
        k = attn.wk(x).view(T, H, C // H).transpose(0, 1)
    m = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]).view(H, 1, 1)
    dist = (torch.arange(T).view(T, 1) - torch.arange(T).view(1, T)).float()
    expected = (q @ k.transpose(-1, -2)) / (C // H) ** 0.5 - m * dist
    low = dist >= 0
    assert (logits[:, low] - expected[:, low]).abs().max() <= 1e-5


def test_cli_bad_inputs_name_the_tensor_or_flag(cli, tmp_path):
    attn = sublayer("rope", True, "before_rotation")
    sd = attn.state_dict()
    np.save(tmp_path / "x.npy", torch.randn(1, T, C).numpy())
    base = ["--x", tmp_path / "x.npy", "--kv-shift", "--out", tmp_path / "y.npy"]

    def fails(tensors, *extra, n_head=H):
        write_safetensors(tmp_path / "w.safetensors", tensors)
        r = run(cli, *base, "--n-head", n_head, "--weights", tmp_path / "w.safetensors", *extra)
        assert r.returncode != 0
        assert not (tmp_path / "y.npy").exists()
        return r.stdout + r.stderr

    assert "missing weight kv_shift.w_v" in fails({k: v for k, v in sd.items() if k != "kv_shift.w_v"})
    assert "tensor 'pe.lambda' is not a weight of the sublayer" in fails(dict(sd, **{"pe.lambda": torch.ones(4)}))
    out = fails(dict(sd, **{"wq.weight": torch.ones(C, C + 1)}))
    assert "tensor 'wq.weight' has shape [32,33]" in out and "expects [32,32]" in out
    assert "missing weights q_norm.weight, k_norm.weight" in fails({k: v for k, v in sd.items() if "norm" not in k})
    assert "qk_norm=after_rotation is not defined for the encoding 'xpos'" in fails(sd, "--pe", "xpos", "--qk-norm",
                                                                                      "after_rotation")
    assert "n_embd=32 is not divisible by n_head=5" in fails(sd, n_head=5)
    np.save(tmp_path / "x.npy", torch.randn(2, 1, T, C).numpy())
    assert "x must be [B,T,C] or [T,C]" in fails(sd)
