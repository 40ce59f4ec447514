"""What every benchmark shares: the machine and code a number came from, timed runs, RESULTS.md entries.

A benchmark entry must let a reader repeat it: :func:`append_entry` writes the date, the machine
(:func:`machine`), the library versions (:func:`versions`), the exact command and the commit it
ran at (:func:`commit`) above the script's own table. Timings come from :func:`time_alternating`:
the contenders run in turn, in an order that flips every round, so that a slow spell of a shared
machine hits all of them alike, and medians are compared. :func:`paired_ratio` turns the runs of two
contenders into a ratio with a confidence interval: on a shared machine the spread between rounds
is often larger than the difference being measured, and a ratio without its interval hides that.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")
#: The environment variable that names the MNIST .npz when a script's --data is not given.
MNIST_ENV = "DDPM_MNIST"
#: The peers whose versions an entry names (when installed).
PEERS = ("diffusers", "denoising-diffusion-pytorch")


def mnist_path(option: str | None) -> Path:
    """The MNIST .npz (x_train, y_train, x_test, y_test) from ``--data`` or ``$DDPM_MNIST``.

    Exits with one line when neither names an existing file: the benchmarks carry no machine's path.
    """
    given = option or os.environ.get(MNIST_ENV)
    if not given:
        raise SystemExit(f"error: pass --data PATH/mnist.npz or set {MNIST_ENV} (this project's machines have it "
                         "in ../shared/data/mnist.npz)")
    path = Path(given)
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (MNIST .npz with x_train, y_train, x_test, y_test)")
    return path


def say(message: str) -> None:
    """Progress on stdout, flushed at once (long runs are watched through a log file)."""
    print(message, flush=True)


# ---------------------------------------------------------------------------- where a number came from


def machine(device: str | torch.device = "cpu") -> str:
    """``AMD EPYC 7B13, 2 logical CPUs, Linux`` (plus the GPU's name for a CUDA device)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def versions() -> str:
    """``torch 2.13.0+cpu, diffusers 0.42.1, Python 3.11.7``: the libraries whose code was timed."""
    parts = [f"torch {torch.__version__}"]
    for name in PEERS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(parts + [f"Python {platform.python_version()}"])


def commit() -> str:
    """The checked-out commit (``commit 1a2b3c4``), so that an entry says which code it measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=RESULTS.parent).stdout.strip()
        # RESULTS.md itself left out: an entry appended minutes earlier is not a change to the code.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(top,exclude)bench/{RESULTS.name}"], capture_output=True,
                               text=True, check=True, cwd=RESULTS.parent.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run: ``python -m bench.x --opt value``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *args])


def append_entry(title: str, module: str, argv: Sequence[str] | None, facts: Sequence[str], body: str,
                 device: str | torch.device = "cpu", path: Path = RESULTS) -> None:
    """Append a dated entry to RESULTS.md: machine, versions, command and commit, ``facts``, then ``body``."""
    if not path.exists():
        path.write_text("# Benchmarks\n")
    lines = [
        f"\n## {datetime.date.today().isoformat()}: {title}\n",
        f"- machine: {machine(device)}",
        f"- {versions()}",
        f"- command: `{command(module, argv)}` at {commit()}",
        *(f"- {fact}" for fact in facts),
        "",
        body.rstrip(),
        "",
    ]
    with path.open("a") as f:
        f.write("\n".join(lines))
    say(f"appended to {path}")


# ---------------------------------------------------------------------------- running things fairly


def set_threads(threads: int) -> int:
    """Use ``threads`` CPU threads (0: PyTorch's default); returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_alternating(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
                     label: str = "") -> dict[str, list[float]]:
    """Time every function ``warmup + repeats`` times, in turns; returns the timed runs (seconds) by name.

    Round r runs the functions in the given order when r is even and in reverse when it is odd, so
    that neither side always runs first (after the other has warmed the caches, or during a slow
    spell of a shared machine). The first ``warmup`` rounds are not kept.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            elapsed = time_call(fns[name], device)
            if r >= warmup:
                times[name].append(elapsed)
            if label:
                kind = "warm-up" if r < warmup else f"run {r - warmup + 1}/{repeats}"
                say(f"  {label} {name}: {kind} {elapsed:.3f} s")
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each list of timings."""
    return {name: statistics.median(values) for name, values in times.items()}


class Ratio(NamedTuple):
    """The median of per-round ratios, a distribution-free confidence interval for it, and its coverage."""

    median: float
    low: float
    high: float
    coverage: float
    rounds: int

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (the data tell the two apart)."""
        return not self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def interval_cell(self) -> str:
        """The interval and its coverage for a results table: ``0.939–0.958 (96%)``."""
        return f"{self.low:.3f}–{self.high:.3f} ({100 * self.coverage:.0f}%)"


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], level: float = 0.95) -> Ratio:
    """Median of ``numerator[i] / denominator[i]`` with an order-statistic interval for the true median.

    The pairs are the runs of one round of :func:`time_alternating`, adjacent in time, so that a
    slow spell of the machine divides out. For the median m of a continuous distribution, the
    number of ratios below m is Binomial(n, 1/2); the interval from the k-th smallest to the k-th
    largest ratio misses m with probability 2 P(Bin(n, 1/2) <= k - 1). k is the largest with
    coverage at least ``level``; with too few rounds for that (n < 6 at 95%) it is the full range
    and ``coverage`` says how much less it is.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need equally many runs, at least one: got {len(numerator)} and {len(denominator)}")
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n = len(ratios)

    def coverage(k: int) -> float:
        tail = sum(math.comb(n, j) for j in range(k)) / 2**n
        return 1.0 - 2.0 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return Ratio(statistics.median(ratios), ratios[k - 1], ratios[n - k], coverage(k), n)


# ---------------------------------------------------------------------------- models and tables


def perturb(module: nn.Module, scale: float = 1e-2, seed: int = 0) -> nn.Module:
    """Move every parameter off DDPM's zero initialisation (in place), so that outputs differ from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p), alpha=scale)
    return module


def diffusers_example_adamw(params: Iterable[nn.Parameter]) -> torch.optim.AdamW:
    """The optimizer of diffusers' ``train_unconditional.py`` with its defaults (lr 1e-4, betas
    (0.95, 0.999), weight decay 1e-6, eps 1e-8)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)


def diffusers_twin(model: nn.Module) -> nn.Module:
    """diffusers' ``UNet2DModel`` in our U-Net's layout, holding its weights (same parameter count, same outputs)."""
    from diffusers import UNet2DModel

    from ddpm.models.diffusers_io import UNET2D

    twin = UNet2DModel.from_config(UNET2D.config_to(model.config))
    twin.load_state_dict(UNET2D.state_to(model.state_dict(), model.config))
    return twin.to(next(model.parameters()).device)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub table; the first column left-aligned, the others right-aligned (they hold numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

