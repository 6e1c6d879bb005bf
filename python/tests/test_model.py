"""grape.nn.CausalSelfAttention in a nanoGPT-style model written here in plain PyTorch: trained on the Bible
with torch.optim.AdamW, step for step equal to `grape train`; grape.load_run and generate."""
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

import grape
from conftest import rel_err

# A small byte-level model: the same config for the PyTorch loop and for `grape train`.
CONFIG = dict(n_layer=2, n_head=4, n_embd=64, context=64)
TRAIN = dict(steps=100, lr=6e-3, min_lr=1e-4, warmup=10)
SHORT = dict(TRAIN, steps=5, warmup=2)  # the run compared step for step with `grape train`
BATCH, SEED, CLIP, WD = 16, 7, 1.0, 0.1
LOSS_AFTER_100 = 2.70  # mean of the last 10 steps; measured 2.57 (rope); an untrained byte model: ln 257 = 5.55


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(torch.nn.Module):
    def __init__(self, C, n_head, pe, kv_shift):
        super().__init__()
        hidden = 8 * C // 3
        self.norm1 = RMSNorm(C)
        self.attn = grape.nn.CausalSelfAttention(C, n_head, pe=pe, kv_shift=kv_shift)  # the one grape line
        self.norm2 = RMSNorm(C)
        self.w1 = torch.nn.Linear(C, hidden, bias=False)
        self.w2 = torch.nn.Linear(C, hidden, bias=False)
        self.w_out = torch.nn.Linear(hidden, C, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.w_out(F.silu(self.w1(h)) * self.w2(h))


class GPT(torch.nn.Module):
    def __init__(self, vocab, n_layer, n_head, n_embd, pe="rope", kv_shift=False):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, n_embd)
        self.blocks = torch.nn.ModuleList(Block(n_embd, n_head, pe, kv_shift) for _ in range(n_layer))
        self.norm_f = RMSNorm(n_embd)

    def forward(self, idx, targets=None):
        h = self.wte(idx)
        for b in self.blocks:
            h = b(h)
        logits = self.norm_f(h) @ self.wte.weight.t()  # tied head
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


ATTN = ("wq", "wk", "wv", "wo", "q_norm", "k_norm", "kv_shift", "pe")


def from_grape_names(state):
    """grape's checkpoint names -> this model's: the attention's tensors live under blocks.N.attn."""
    out = {}
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] in ATTN:
            key = ".".join(parts[:2] + ["attn"] + parts[2:])
        out[key] = t
    return out


def build(pe="rope", kv_shift=False):
    """The GPT above, initialised exactly as `grape train --seed SEED` initialises its model."""
    torch.manual_seed(SEED)
    reference = grape.Transformer(pe=pe, kv_shift=kv_shift, **CONFIG)
    model = GPT(257, CONFIG["n_layer"], CONFIG["n_head"], CONFIG["n_embd"], pe=pe, kv_shift=kv_shift)
    model.load_state_dict(from_grape_names(reference.state_dict()))
    return model


def train(model, schedule, data):
    """grape train's step: AdamW with decay on matrices, clipping at 1, warmup + cosine schedule."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=TRAIN["lr"], betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(schedule["steps"]):
        x, y = data.train_batch(BATCH, CONFIG["context"], SEED, step)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        for g in opt.param_groups:
            g["lr"] = grape.lr_at(step, **schedule)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def bible():
    return grape.open_data("bible", "byte", 0.1)


def test_nanogpt_with_grape_attention_learns_the_bible(bible):
    model = build("rope")
    losses = train(model, TRAIN, bible)
    assert losses[0] > 5.0
    assert sum(losses[-10:]) / 10 < LOSS_AFTER_100, losses[-10:]


@pytest.mark.parametrize("pe,kv_shift", [("rope", False), ("fox", True)])
def test_pytorch_loop_equals_grape_train_step_for_step(bible, cli, tmp_path, pe, kv_shift):
    steps = SHORT["steps"]
    model = build(pe, kv_shift)
    losses = train(model, SHORT, bible)
    run = tmp_path / "run"
    cmd = [cli, "--threads", str(torch.get_num_threads()), "train", "--quiet", "--out", str(run), "--pe", pe,
           "--steps", str(steps), "--lr", str(SHORT["lr"]), "--min-lr", str(SHORT["min_lr"]),
           "--warmup", str(SHORT["warmup"]), "--batch", str(BATCH), "--seed", str(SEED),
           "--context", str(CONFIG["context"]), "--set", f"n_layer={CONFIG['n_layer']}",
           "--set", f"n_head={CONFIG['n_head']}", "--set", f"n_embd={CONFIG['n_embd']}", "--eval-every", "0"]
    if kv_shift:
        cmd.append("--kv-shift")
    subprocess.run(cmd, check=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    theirs = [m["loss"] for m in metrics if "loss" in m]
    assert len(theirs) == steps
    for mine, ref in zip(losses, theirs):
        assert abs(mine - ref) <= 1e-4, (losses, theirs)
    # the run's weights, loaded back, give the logits of the PyTorch model after the same steps
    loaded = grape.load_run(run)
    x, _ = bible.train_batch(2, CONFIG["context"], SEED, 1000)
    with torch.no_grad():
        assert rel_err(model(x), loaded(x)) < 1e-3


def test_load_run_forward_and_generate(cli, tmp_path):
    run = tmp_path / "run"
    subprocess.run([cli, "--threads", "1", "train", "--quiet", "--out", str(run), "--pe", "alibi", "--steps", "2",
                    "--batch", "2", "--context", "32", "--set", "n_layer=1", "--set", "n_embd=32",
                    "--eval-every", "0"], check=True)
    model = grape.load_run(run)
    assert model.config["pe"] == "alibi" and model.config["n_layer"] == 1 and not model.training
    assert any(k.startswith("blocks.0.wq.") for k in model.state_dict())
    prompt = "In the beginning"
    text = model.generate(prompt, max_tokens=12, temperature=0)
    # greedy decoding with the KV cache equals the argmax of full forward passes, token by token
    ids = list(prompt.encode())
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).argmax(-1)[0, -1]))
    expected = ids[len(prompt):]
    if 256 in expected:  # generation stops at the end-of-text token
        expected = expected[:expected.index(256)]
    out = model.generate(list(prompt.encode()), max_tokens=12, temperature=0)
    assert out == expected
    assert text == model.tokenizer.decode(out)
    with pytest.raises(Exception, match="run.json|no such|not found|missing"):
        grape.load_run(tmp_path / "nothing")


@pytest.mark.parametrize("pe,kv_shift", [("grape-m-ctx", True), ("fox", False), ("grape-ap", True)])
def test_causal_self_attention_streams_like_the_full_pass(pe, kv_shift):
    torch.manual_seed(0)
    attn = grape.nn.CausalSelfAttention(32, 4, pe=pe, kv_shift=kv_shift)
    x = torch.randn(2, 9, 32)
    full = attn(x)
    cache = grape.AttentionCache()
    with torch.no_grad():
        parts = [attn(x[:, :4], cache), attn(x[:, 4:5], cache), attn(x[:, 5:], cache)]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5
    names = {k.split(".")[0] for k in attn.state_dict()}
    assert names == {"wq", "wk", "wv", "wo", "q_norm", "k_norm", "pe"} | ({"kv_shift"} if kv_shift else set())
