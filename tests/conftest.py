"""Shared settings and fixtures: one thread, a fixed seed for every test, weights away from DDPM's zero
initialisation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

# The tests use small tensors, for which OpenMP's thread wake-ups on a 2-core machine cost more
# than they save (measured: a 40k-element multiply takes 10 µs on one thread, 0.4 ms on two).
torch.set_num_threads(1)

# bfloat16 "auto" on the CPU depends on the machine (ddpm.runtime.default_bf16); the suite compares
# float32 results against oracles, so it pins auto to float32 (test_runtime.py tests the rule itself).
os.environ["DDPM_CPU_BF16"] = "off"


def _jitter(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    # DDPM zero-initialises the last layer of every residual branch and the output layer, and
    # diffusers sets GroupNorm to (1, 0): both hide wiring mistakes. Add fan-in-scaled noise to
    # every parameter so that each one matters to the output.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.add_(noise, alpha=scale / math.sqrt(fan_in))
    return module


def write_bars_npz(path, n: int, n_test: int):
    """``n`` grey 8x8 images in 4 classes with a little structure (bars at the class's row on a noisy
    background), the first ``n_test`` of them again as the test split; returns ``path``."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.integers(0, 60, size=(n, 8, 8)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, 2 * label : 2 * label + 2] = 230
    np.savez(path, x_train=x, y_train=y, x_test=x[:n_test], y_test=y[:n_test])
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def jitter() -> Callable[..., nn.Module]:
    """``jitter(module, seed=0)`` perturbs all parameters in place and returns the module."""
    return _jitter
