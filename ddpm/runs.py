"""What every training run shares, and the one training loop.

A model's trainer (:mod:`ddpm.train` for the U-Net, :mod:`ddpm.train_autoencoder` for the
autoencoder, and those to come) sets up its state and data, then hands :func:`train_loop` its
step function and its hooks (:class:`Hooks`: a checkpoint, a preview, what the result adds). The
loop is written once: the progress bar, the metrics window and log, the non-finite guard that
skips a step and stops a run that keeps diverging (:class:`Diverged`), the time limit, SIGINT /
SIGTERM (:class:`StopFlag`, :class:`Interrupted`), previews and checkpoints on schedule, and the
run's :class:`TrainResult` and ``summary.json``.

Also here: the run directory (:func:`open_run`, refusing to clobber a run), the resumed
configuration, the metrics log, the processes of a DDP run, the random state saved in
checkpoints, and the EMA of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm import checkpoints
from ddpm.config import SectionedConfig
from ddpm.errors import UserError
from ddpm.runtime import resolve_device

C = TypeVar("C", bound=SectionedConfig)


class Interrupted(UserError):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint (exit code 128 + signal)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {name}{where}; continue with --resume")
        self.exit_code = 128 + signum
        self.label = "stopped"


class Diverged(UserError):
    """Too many non-finite steps in a row; the last good state was saved."""


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Processes:
    """This process's place in a (maybe single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensors: list[Tensor]) -> list[Tensor]:
        """Each tensor concatenated over the ranks (itself on one process)."""
        if self.world_size == 1:
            return tensors
        out = []
        for tensor in tensors:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            out.append(torch.cat(parts))
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """Whether any process raised ``flag`` (all processes must stop at the same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def init_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank), device


# ---------------------------------------------------------------------------- the run directory


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


@dataclass
class RunSpec:
    """How a kind of run is resumed: the files it owns and the fields a resume may change."""

    run_files: tuple[str, ...]
    resumable: set[str]


def open_run(out_dir: Path, config: C, spec: RunSpec, *, resume: bool, overwrite: bool, explicit: set[str] | None,
             procs: Processes, say: Callable[[str], None]
             ) -> tuple[C, tuple[Path, checkpoints.TrainingCheckpoint] | None]:
    """Check (and with ``overwrite`` clear) the run directory; with ``resume``, the saved
    configuration with the allowed ``explicit`` overrides, and the newest readable checkpoint."""
    if procs.is_main:
        prepare_run_dir(out_dir, resume, overwrite, spec.run_files)
    if not resume:
        return config, None
    saved = type(config).from_dict(checkpoints.load_json(out_dir / "config.json"))
    config = resume_config(saved, config, explicit or set(), spec.resumable)
    found = checkpoints.latest_training_checkpoint(out_dir / "checkpoints", warn=lambda m: say(f"warning: {m}"))
    if found is None:
        say(f"no checkpoint in {out_dir / 'checkpoints'} yet: starting from step 0")
    return config, found


def nothing_to_do(out_dir: Path, found: tuple[Path, checkpoints.TrainingCheckpoint] | None, steps: int,
                  say: Callable[[str], None]) -> TrainResult | None:
    """The result of a resumed run already at or past ``steps`` (left untouched), else None."""
    if found is None or found[1].meta["step"] < steps:
        return None
    path, ckpt = found
    step = ckpt.meta["step"]
    say(f"nothing to do: {out_dir} is at step {step} and train.steps is {steps}; "
        f"pass --train.steps N with N > {step} to train longer")
    return TrainResult(run_dir=out_dir, step=step, checkpoint=path, sample_grid=None, seconds=0.0,
                       images_per_second=0.0, last_loss=None, skipped_steps=ckpt.meta.get("skipped_steps", 0),
                       nothing_to_do=True)


def record_config(out_dir: Path, config: SectionedConfig, procs: Processes, say: Callable[[str], None]) -> None:
    """Write ``config.json`` (rank 0) and print the resolved configuration."""
    if procs.is_main:
        checkpoints.save_json(checkpoints.make_dir(out_dir) / "config.json", config.to_dict())
    say(f"config:\n{config.to_json()}")


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
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
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


# ---------------------------------------------------------------------------- the EMA


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at step n: min(decay, (1 + n) / (10 + n)) with warm-up (as TF's ExponentialMovingAverage)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, for every parameter; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


# ---------------------------------------------------------------------------- one step and its log


@dataclass
class StepOutcome:
    """What one step did: its loss terms (batch means), gradient norm, and whether it was applied."""

    terms: dict[str, float]
    grad_norm: float
    applied: bool
    loss: float | None = None  # the (importance-weighted) loss that was minimised


def clipped_grad_norm(parameters: Any, max_norm: float) -> float:
    """The global gradient norm, after clipping it to ``max_norm`` (0: measured, not clipped)."""
    return float(nn.utils.clip_grad_norm_(parameters, max_norm or math.inf))


class MetricsWindow:
    """The averages of the applied steps' losses and gradient norms since the last log line; a term
    only some steps have (the autoencoder's GAN terms from ``disc_start``) over those steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.start = time.perf_counter()

    def add(self, outcome: StepOutcome, images: int) -> None:
        self.images += images
        if outcome.applied:
            for key, value in {**outcome.terms, "grad_norm": outcome.grad_norm}.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def record(self, **extra: Any) -> dict[str, Any]:
        """The averages, the images per second since the last record, and ``extra``; then reset."""
        elapsed = time.perf_counter() - self.start
        averages = {k: v / self.counts[k] for k, v in self.sums.items()}
        record = {**averages, "img_per_s": self.images / elapsed, **extra}
        self.reset()
        return record


# ---------------------------------------------------------------------------- the loop


class LoopConfig(Protocol):
    """The fields of a run's ``train`` section that the loop reads (every trainer's config has them)."""

    steps: int
    batch_size: int
    lr: float
    log_every: int
    sample_every: int
    ckpt_every: int
    time_limit: float
    max_bad_steps: int


class LoopState(Protocol):
    """A trainer's state as the loop sees it: the step count and the skipped steps."""

    step: int
    skipped: int


@dataclass
class Hooks:
    """What a model brings to :func:`train_loop`.

    Attributes:
        step: one optimisation step on a batch; a step whose loss or gradient is not finite must
            change nothing and report ``applied=False``.
        checkpoint: write ``checkpoints/step_N/`` for step N; None on ranks that do not write.
        preview: a picture of the model now (``samples/step_N.png``); None if none is made.
        finish: after the last step, on every rank: what the result and ``summary.json`` add.
        log_extra: values added to every metrics line (the learning rate).
        shown: the metrics term the progress bar shows.
    """

    step: Callable[[Any], StepOutcome]
    checkpoint: Callable[[int], Path | None]
    preview: Callable[[int], Path | None]
    finish: Callable[[], dict[str, Any]] = dict
    log_extra: Callable[[], dict[str, Any]] = dict
    shown: str = "loss"


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind; ``extra`` holds what its model adds
    (the autoencoder's ``scaling_factor`` and folder, DDP's ``ranks_max_param_diff``)."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    sample_grid: Path | None
    seconds: float
    images_per_second: float
    last_loss: float | None
    skipped_steps: int
    nothing_to_do: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready ``summary.json``: every field, ``extra`` flattened into it."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {k: str(v) if isinstance(v, Path) else v for k, v in {**values, **self.extra}.items()}


def divergence_message(bad: int, step: int, checkpoint: Path | None, cfg: Any) -> str:
    causes = f"a learning rate too high (train.lr={cfg.lr})"
    if getattr(cfg, "bf16", False):
        causes += ", or a bfloat16 overflow (try --train.bf16 false)"
    return (f"{bad} steps in a row had a non-finite loss or gradient (step {step}); the last good state is saved "
            f"in {checkpoint}. Likely causes: {causes}")


def train_loop(state: LoopState, batches: Iterator[Any], hooks: Hooks, cfg: LoopConfig, out_dir: Path, *,
               procs: Processes, metrics: MetricsLog | None, command_start: float, progress: bool, desc: str,
               say: Callable[[str], None]) -> TrainResult:
    """Take steps until ``cfg.steps``, the time limit (counted from ``command_start``) or a signal;
    log, preview and checkpoint on schedule; return the result (``summary.json`` on rank 0)."""
    start_step = state.step
    last_ckpt, last_grid, last_loss, bad_in_a_row, out_of_time = None, None, None, 0, False
    window = MetricsWindow()
    run_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not (progress and procs.is_main), file=sys.stderr)
    stop = StopFlag()
    try:
        with stop:
            while state.step < cfg.steps:
                outcome = hooks.step(next(batches))
                state.step += 1
                window.add(outcome, cfg.batch_size)
                bar.update(1)
                if outcome.applied:
                    bad_in_a_row, last_loss = 0, outcome.loss
                else:
                    state.skipped += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= cfg.max_bad_steps:
                        # The weights are still those of the last good step: save them.
                        last_ckpt = hooks.checkpoint(state.step - bad_in_a_row)
                        raise Diverged(divergence_message(bad_in_a_row, state.step, last_ckpt, cfg))

                # --- bookkeeping ---
                step = state.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {"step": step, **window.record(**hooks.log_extra(), skipped_steps=state.skipped,
                                                            time=time.perf_counter() - run_start)}
                    if metrics is not None:
                        metrics.write(record)
                    bar.set_postfix({hooks.shown: f"{record.get(hooks.shown, float('nan')):.4g}",
                                     "img_s": f"{record['img_per_s']:.0f}"})
                out_of_time = bool(cfg.time_limit) and time.perf_counter() - command_start > cfg.time_limit * 60
                stopping = procs.any(stop.signum is not None or out_of_time)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    last_grid = hooks.preview(step) or last_grid
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                    last_ckpt = hooks.checkpoint(step) or last_ckpt
                if stopping:
                    break
        bar.close()
        if stop.signum is not None:
            raise Interrupted(stop.signum, last_ckpt)
        if out_of_time:
            say(f"time limit of {cfg.time_limit:g} min reached at step {state.step}")
        last_grid = hooks.preview(state.step) or last_grid
        seconds = time.perf_counter() - run_start
        extra = hooks.finish()
        result = TrainResult(
            run_dir=out_dir, step=state.step, checkpoint=last_ckpt, sample_grid=last_grid, seconds=seconds,
            images_per_second=(state.step - start_step) * cfg.batch_size / max(seconds, 1e-9), last_loss=last_loss,
            skipped_steps=state.skipped, extra=extra)
        if procs.is_main:
            checkpoints.save_json(out_dir / "summary.json", result.summary())
        return result
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
