"""Where and how a network runs: the device, bfloat16 autocast, seeds and parameter counts.

Training, sampling, evaluation and the pictures all import this module; none of it imports
training, so ``ddpm sample`` starts without loading the training loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

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


#: How ``auto`` decides bfloat16 on the CPU: ``auto`` (by capability and a short measurement),
#: ``on`` or ``off``; from the environment variable of this name.
CPU_BF16_ENV = "DDPM_CPU_BF16"
#: The least measured speed-up for which ``auto`` turns bfloat16 on on the CPU.
BF16_MIN_SPEEDUP = 1.1


def default_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on ``device`` at equal quality (what ``auto`` means).

    On CUDA it does. On the CPU it depends on the machine: where this PyTorch's oneDNN has no
    native bfloat16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False), bf16 convolutions fall
    back to ``aten::_slow_conv2d_forward`` and autocast was 5-21x slower; where it has (Intel AMX,
    AVX-512 BF16) it was measured up to 1.8x faster (bench/RESULTS.md, ``python -m bench.cpu_bf16``).
    So on the CPU ``auto`` is on only where oneDNN reports bfloat16 and :func:`cpu_bf16_speedup`
    measures it at least :data:`BF16_MIN_SPEEDUP` times faster. The measurement is taken once per
    machine and kept (:func:`measured_cpu_bf16_speedup`), so that a seed gives the same images in
    every process; ``DDPM_CPU_BF16=on|off`` decides instead. MPS never autocasts.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    choice = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if choice not in ("auto", "on", "off"):
        raise UserError(f"{CPU_BF16_ENV} must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return cpu_has_bf16() and measured_cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def cpu_has_bf16() -> bool:
    """Whether this PyTorch's oneDNN runs bfloat16 natively on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def measured_cpu_bf16_speedup() -> float:
    """:func:`cpu_bf16_speedup` of this machine: read from ``$DDPM_CACHE_DIR`` (default
    ``~/.cache/ddpm``) if it was measured before with this CPU and PyTorch, else measured and kept
    there (where the cache cannot be written, for this process only)."""
    key = f"{platform.processor() or platform.machine()}|{_cpu_model()}|torch {torch.__version__}"
    path = Path(os.environ.get("DDPM_CACHE_DIR") or "~/.cache/ddpm").expanduser() / "cpu_bf16.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text(encoding="utf-8"))
        if known.get("key") == key:
            return float(known["speedup"])
    speedup = cpu_bf16_speedup()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "speedup": speedup}), encoding="utf-8")
    return speedup


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_bf16_speedup(rounds: int = 7) -> float:
    """float32 time / bfloat16-autocast time of a forward pass through three 3x3 convolutions at 64
    channels, 32x32, batch 8 (the bulk of a U-Net's work), the median over paired rounds (about a
    tenth of a second). On this project's AMD EPYC with oneDNN bf16 it measured 1.8-2.1 on a quiet
    machine, where the `mnist` and `cifar10` training steps ran 1.27x and 1.72x faster in bf16
    (bench/RESULTS.md)."""
    convs = nn.Sequential(*(nn.Conv2d(64, 64, 3, padding=1) for _ in range(3))).eval()
    x = torch.randn(8, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for bf16 in (False, True):
                start = time.perf_counter()
                with autocast(torch.device("cpu"), bf16):
                    convs(x)
                if round_:  # the first round warms both paths up
                    times[bf16].append(time.perf_counter() - start)
    return statistics.median(f / b for f, b in zip(times[False], times[True]))


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
