"""Where and how a network runs: the device, bfloat16 autocast, seeds and parameter counts.

Training, sampling, evaluation and the pictures all import this module; none of it imports
training, so ``ddpm sample`` starts without loading the training loop.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ddpm.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this process's GPU) if available, else MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} was asked for, but PyTorch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def default_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on ``device`` at equal quality, as measured (bench/RESULTS.md).

    On CUDA it does. On the CPUs measured so far it did not: where oneDNN lacks bfloat16
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False), bf16 convolutions fall back to
    ``aten::_slow_conv2d_forward`` and autocast was several times slower at equal sample quality
    (``python -m bench.cpu_bf16``, bench/RESULTS.md). So training and sampling default to float32 on
    the CPU (and on MPS, which never autocasts).
    """
    return device.type == "cuda"


def resolve_bf16(bf16: bool | None, device: torch.device) -> bool:
    """``bf16`` as asked, or :func:`default_bf16` when it is ``None`` (auto). MPS never autocasts."""
    if device.type not in ("cuda", "cpu"):
        return False
    return default_bf16(device) if bf16 is None else bf16


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA or the CPU when ``bf16``; otherwise nothing (float32)."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from several integers (a run seed, a rank, a purpose), well mixed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def num_parameters(module: nn.Module) -> int:
    """The number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
