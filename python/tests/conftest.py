"""Shared pieces of the tests of the Python package (run by ctest: python_test_*)."""
import os
import sys

import pytest
import torch

import grape

B, H, D, C = 2, 2, 16, 32  # small shapes: the whole suite stays well under a minute on 2 cores
NAMES = [e["name"] for e in grape.encodings()]


def make(name, dtype=torch.float32, seed=0, perturb=True, **options):
    """An encoding with its parameters moved off their init by a seeded N(0, 0.3^2) step (as grape check
    does), so that no gradient or law holds only at the init."""
    torch.manual_seed(seed)
    enc = grape.PositionEncoding(name, n_head=H, head_dim=D, model_dim=C, **options)
    if perturb:
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.3 * torch.randn(p.shape, dtype=torch.float64).to(p.dtype))
    return enc.to(dtype)


def inputs(T, dtype=torch.float32, seed=1, batch=B):
    """q, k, v [B,T,H,D] and x [B,T,C], drawn in float64 then cast (the fp32 and fp64 paths see the same
    numbers)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, T, H, D, dtype=torch.float64, generator=g).to(dtype) for _ in range(3))
    x = torch.randn(batch, T, C, dtype=torch.float64, generator=g).to(dtype)
    return q, k, v, x


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def cli():
    path = os.environ.get("GRAPE_CLI", "")
    if not path or not os.path.exists(path):
        pytest.skip("GRAPE_CLI (the grape binary) is not set: run through ctest")
    return path
