"""What every training run shares: its directory, its resumed configuration, its metrics log,
its random state, and stopping cleanly on SIGINT / SIGTERM.

:mod:`ddpm.train` (the U-Net) and :mod:`ddpm.train_autoencoder` (the autoencoder) both use it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ddpm import checkpoints
from ddpm.config import SectionedConfig
from ddpm.errors import UserError

C = TypeVar("C", bound=SectionedConfig)


class Interrupted(UserError):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint (exit code 128 + signal)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {name}{where}; continue with --resume")
        self.exit_code = 128 + signum
        self.label = "stopped"


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool, run_files: Sequence[str]) -> None:
    """Refuse to clobber an existing run unless told to; with ``overwrite`` remove only ``run_files``."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if resume:
        if not (out_dir / "config.json").is_file():
            raise UserError(f"{out_dir} holds no run to resume (no config.json); drop --resume to start one")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    existing = [name for name in run_files if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    for name in existing:
        path = out_dir / name
        # A link is removed, never followed: --overwrite deletes nothing outside the run directory.
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def resume_config(saved: C, requested: C, explicit: set[str], resumable: set[str]) -> C:
    """The saved configuration with the explicitly given overrides that a resume allows.

    Any explicit override that differs from the saved value and is not in ``resumable``
    (``section.field`` names) is an incompatible change, reported by name.
    """
    saved_values, requested_values = saved.to_dict(), requested.to_dict()
    bad, changes = [], {}
    for key in sorted(explicit):
        section, _, name = key.partition(".")
        old, new = saved_values[section][name], requested_values[section][name]
        if old == new:
            continue
        if key in resumable:
            changes[key] = new
        else:
            bad.append(f"{key} ({old!r} in the run, {new!r} asked)")
    if bad:
        raise UserError(f"cannot resume with a different {'; '.join(bad)}: start a new run instead")
    for key, value in changes.items():
        section, _, name = key.partition(".")
        saved_values[section][name] = value
    return type(saved).from_dict(saved_values)


class MetricsLog:
    """Append-only JSON lines, one per logging step, flushed as they are written.

    A resumed run starts from its checkpoint's step, so lines logged after that step by the
    stopped run are dropped (``keep_until``): they will be logged again, identically.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, keep_until: int | None = None) -> None:
        self.path = path
        if keep_until is not None and path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= keep_until]
            checkpoints.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("--train.tensorboard needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop stops after the current step and saves a checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Tensor]:
    """The global torch state, each named generator's, and the CUDA state of a CUDA generator's device."""
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    cuda = next((g.device for g in generators.values() if g.device.type == "cuda"), None)
    if cuda is not None:
        state["cuda"] = torch.cuda.get_rng_state(cuda)
    return state


def set_rng_state(state: dict[str, Tensor], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
        if g.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], g.device)
