"""Training: Algorithm 1 of Ho et al. (2020) with the paper's recipe, exact resume and DDP.

:func:`train` reads as nanoGPT's loop does: the setup in a few named pieces (the run directory
and configuration, the data, the :class:`TrainState`, resuming it), then one visible loop whose
body is :func:`train_step` (draw t and ε, compute the loss, clip the gradient, step Adam, update
the EMA) followed by the bookkeeping (a metrics line, a preview grid, a checkpoint).

Everything random is drawn from generators seeded by (seed, rank): the data order and flips
(:meth:`ddpm.data.ImageData.batches`), t and label dropout (a CPU generator), ε (a generator on
the device) and dropout (the global generator). A checkpoint saves all their states together with
the weights, the EMA and Adam's moments, so that a resumed run takes exactly the steps the
uninterrupted one would have. Under ``torchrun`` each process trains on its own shard of every
batch, DDP averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm import checkpoints
from ddpm.config import RunConfig
from ddpm.data import ImageData, load_images
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate, grid_image
from ddpm.images import save_image
from ddpm.models.unet import UNet
from ddpm.runtime import autocast, derive_seed, num_parameters, resolve_bf16, resolve_device
from ddpm.timestep_sampling import UniformSampler, make_timestep_sampler

#: Run-directory entries that ``--overwrite`` may delete (nothing else is ever removed).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples", "tensorboard", "summary.json")

#: Fields that may change when a run is resumed; any other difference is an incompatible config.
RESUMABLE_FIELDS = {
    "data.source", "data.root",
    "train.steps", "train.time_limit", "train.log_every", "train.sample_every", "train.sample_count",
    "train.sample_sampler", "train.sample_steps", "train.ckpt_every", "train.keep_last", "train.device",
    "train.threads", "train.tensorboard", "train.compile", "train.max_bad_steps", "train.check_sync",
}


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


# ---------------------------------------------------------------------------- the recipe


def learning_rate(step: int, lr: float, warmup_steps: int) -> float:
    """The paper's linear warm-up: lr · min(1, (step + 1) / warmup)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


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


# ---------------------------------------------------------------------------- the run directory


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless told to; with ``overwrite`` remove only run files."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if resume:
        if not (out_dir / "config.json").is_file():
            raise UserError(f"{out_dir} holds no run to resume (no config.json); drop --resume to start one")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    for name in existing:
        path = out_dir / name
        # A link is removed, never followed: --overwrite deletes nothing outside the run directory.
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def resume_config(saved: RunConfig, requested: RunConfig, explicit: set[str]) -> RunConfig:
    """The saved configuration with the explicitly given overrides that a resume allows.

    Any explicit override that differs from the saved value and is not in
    :data:`RESUMABLE_FIELDS` is an incompatible change, reported by name.
    """
    saved_values, requested_values = saved.to_dict(), requested.to_dict()
    bad, changes = [], {}
    for key in sorted(explicit):
        section, _, name = key.partition(".")
        old, new = saved_values[section][name], requested_values[section][name]
        if old == new:
            continue
        if key in RESUMABLE_FIELDS:
            changes[key] = new
        else:
            bad.append(f"{key} ({old!r} in the run, {new!r} asked)")
    if bad:
        raise UserError(f"cannot resume with a different {'; '.join(bad)}: start a new run instead")
    for key, value in changes.items():
        section, _, name = key.partition(".")
        saved_values[section][name] = value
    return RunConfig.from_dict(saved_values)


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


# ---------------------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a checkpoint holds: the network, its EMA, Adam, the t-sampler, the generators."""

    model: UNet
    ema: UNet
    optimizer: torch.optim.Optimizer
    timestep_sampler: UniformSampler
    gen_t: torch.Generator  # t and label dropout (CPU)
    gen_noise: torch.Generator  # ε (on the device)
    step: int = 0
    skipped: int = 0

    def rng_state(self) -> dict[str, Tensor]:
        state = {"torch": torch.get_rng_state(), "gen_t": self.gen_t.get_state(),
                 "gen_noise": self.gen_noise.get_state()}
        if self.gen_noise.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.gen_noise.device)
        return state

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        self.gen_t.set_state(state["gen_t"])
        self.gen_noise.set_state(state["gen_noise"])
        if self.gen_noise.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.gen_noise.device)


def build_state(config: RunConfig, device: torch.device, procs: Processes) -> TrainState:
    """A fresh model (DDPM's initialisation, seeded per rank), its EMA, Adam and the generators."""
    cfg = config.train
    torch.manual_seed(derive_seed(cfg.seed, procs.rank, 0))
    model = UNet(config.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    return TrainState(
        model, ema, optimizer, make_timestep_sampler(cfg.timestep_sampler, config.diffusion.timesteps),
        gen_t=torch.Generator().manual_seed(derive_seed(cfg.seed, procs.rank, 1)),
        gen_noise=torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, procs.rank, 2)),
    )


def restore(state: TrainState, path: Path, ckpt: checkpoints.TrainingCheckpoint, config: RunConfig,
            procs: Processes, say: Callable[[str], None]) -> None:
    """Load a checkpoint into ``state``; its random draws too when the process count matches."""
    state.model.load_weights(ckpt.group("model"), source=path / "model.safetensors")
    state.ema.load_weights(ckpt.group("ema"), source=path / "ema.safetensors")
    state.optimizer.load_state_dict(checkpoints.optimizer_state_from_flat(ckpt.group("optimizer"),
                                                                          ckpt.meta["optimizer"]))
    state.timestep_sampler.load_state_dict(ckpt.group("sampler"))
    state.step, state.skipped = ckpt.meta["step"], ckpt.meta.get("skipped_steps", 0)
    rng = checkpoints.rank_rng_state(ckpt.group("rng"), procs.rank)
    if ckpt.meta.get("world_size") == procs.world_size and rng:
        state.set_rng_state(rng)
    else:
        say(f"warning: {path} was written by {ckpt.meta.get('world_size')} process(es), this run has "
            f"{procs.world_size}: random draws are reseeded, so the run will not repeat exactly")
        torch.manual_seed(derive_seed(config.train.seed, procs.rank, 0, state.step))
    say(f"resumed from {path} at step {state.step}")


def save_checkpoint(state: TrainState, step: int, out_dir: Path, config: RunConfig, procs: Processes) -> Path | None:
    """Write ``checkpoints/step_<step>/`` (rank 0; every rank's random state gathered into it)."""
    rng = procs.gather_objects(state.rng_state())
    if not procs.is_main:
        return None
    tensors, optimizer_meta = checkpoints.optimizer_state_to_flat(state.optimizer.state_dict())
    return checkpoints.save_training_checkpoint(
        out_dir / "checkpoints", step,
        tensors={"model": state.model.state_dict(), "ema": state.ema.state_dict(), "optimizer": tensors,
                 "sampler": state.timestep_sampler.state_dict(), "rng": checkpoints.rng_states_to_flat(rng)},
        meta={"step": step, "skipped_steps": state.skipped, "world_size": procs.world_size,
              "optimizer": optimizer_meta, "config": config.to_dict()},
        keep_last=config.train.keep_last,
    )


# ---------------------------------------------------------------------------- one step and its log


@dataclass
class StepOutcome:
    """What one step did: its loss terms (batch means), gradient norm, and whether it was applied."""

    terms: dict[str, float]
    grad_norm: float
    applied: bool
    loss: float | None = None  # the importance-weighted loss that was minimised


def train_step(state: TrainState, train_model: nn.Module, diffusion: GaussianDiffusion, x: Tensor, y: Tensor,
               config: RunConfig, device: torch.device, procs: Processes, bf16: bool) -> StepOutcome:
    """One step of Algorithm 1: t and ε drawn, the loss, its gradient clipped, Adam, the EMA.

    A step whose gradient is not finite changes nothing (the weights, Adam's moments, the EMA
    and the loss-aware sampler's history stay as they were) and is reported as not applied.
    """
    cfg = config.train
    batch = x.shape[0]
    t, weights = state.timestep_sampler.sample(batch, device, generator=state.gen_t)
    model_kwargs = {}
    if cfg.class_cond:
        drop = torch.rand(batch, generator=state.gen_t) < cfg.label_dropout
        model_kwargs["y"] = torch.where(drop, torch.full_like(y, -1), y).to(device)
    noise = torch.randn(x.shape, generator=state.gen_noise, device=device, dtype=x.dtype)
    with autocast(device, bf16):
        terms = diffusion.training_losses(train_model, x, t, cfg.loss_type, noise=noise, model_kwargs=model_kwargs)
    loss = (terms["loss"].float() * weights).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The norm is the same on every rank (DDP averaged the gradients), so all ranks agree on
    # skipping a step.
    grad_norm = float(nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or math.inf))
    if not math.isfinite(grad_norm):
        state.optimizer.zero_grad(set_to_none=True)
        return StepOutcome({}, grad_norm, applied=False)
    if cfg.timestep_sampler != "uniform":
        all_t, all_losses = procs.gather([t, terms["loss"].detach().float()])
        state.timestep_sampler.update(all_t, all_losses)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(state.step, cfg.lr, cfg.warmup_steps)
    state.optimizer.step()
    update_ema(state.ema, state.model, ema_decay(state.step, cfg.ema_decay, cfg.ema_warmup))
    means = {key: terms[key].detach().float().mean().item() for key in ("loss", "mse", "vb") if key in terms}
    return StepOutcome(means, grad_norm, applied=True, loss=loss.item())


class MetricsWindow:
    """The averages of the applied steps' losses and gradient norms since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.applied = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, outcome: StepOutcome, images: int) -> None:
        self.images += images
        if outcome.applied:
            self.applied += 1
            for key, value in {**outcome.terms, "grad_norm": outcome.grad_norm}.items():
                self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, **extra: Any) -> dict[str, Any]:
        """The averages, the images per second since the last record, and ``extra``; then reset."""
        elapsed = time.perf_counter() - self.start
        n = max(self.applied, 1)
        record = {**{k: v / n for k, v in self.sums.items()}, "img_per_s": self.images / elapsed, **extra}
        self.reset()
        return record


def preview(ema: nn.Module, diffusion: GaussianDiffusion, config: RunConfig, device: torch.device, bf16: bool,
            path: Path) -> Path:
    """A fixed-seed grid of EMA samples (class-conditional: the classes in turn, one per column)."""
    cfg = config.train
    samples = generate(ema, diffusion, cfg.sample_count, SamplerSettings(cfg.sample_sampler, cfg.sample_steps),
                       seed=cfg.seed, batch_size=cfg.sample_count, device=device, bf16=bf16, progress=False)
    return save_image(grid_image(samples.uint8(), nrow=config.model.num_classes or None), path)


# ---------------------------------------------------------------------------- signals


class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop stops after the current step and saves a checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


# ---------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    sample_grid: Path | None
    seconds: float
    images_per_second: float
    last_loss: float | None
    skipped_steps: int
    ranks_max_param_diff: float | None = None
    steps_taken: int = 0
    nothing_to_do: bool = False


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    explicit: set[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: ImageData | None = None,
) -> TrainResult:
    """Train a U-Net on ``config.data.source`` and write the run to ``out_dir``.

    Args:
        config: the resolved configuration (with ``resume``, the one asked for: the run's saved
            configuration wins, except for ``explicit`` overrides listed in :data:`RESUMABLE_FIELDS`).
        out_dir: the run directory: ``config.json``, ``metrics.jsonl``, ``samples/step_N.png``,
            ``checkpoints/step_N/``.
        resume: continue the run in ``out_dir`` from its latest checkpoint. A run already at or
            past ``train.steps`` is left untouched (``steps_taken`` is 0).
        overwrite: start over in a directory that already holds a run.
        explicit: the ``section.field`` names the user set explicitly (for ``resume``).
        data: preloaded data (tests); by default loaded from ``config.data``.
    """
    # --- setup: processes, run directory, configuration ---
    out_dir = Path(out_dir)
    procs, device = init_processes(config.train.device)
    say = log if procs.is_main else (lambda message: None)
    if procs.is_main:
        prepare_run_dir(out_dir, resume, overwrite)
    found = None
    if resume:
        config = resume_config(RunConfig.from_dict(checkpoints.load_json(out_dir / "config.json")), config,
                               explicit or set())
        found = checkpoints.latest_training_checkpoint(out_dir / "checkpoints", warn=lambda m: say(f"warning: {m}"))
        if found is not None and found[1].meta["step"] >= config.train.steps:
            return _nothing_to_do(out_dir, found, config, say)
    config = _resolve_bf16(config, device)
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % procs.world_size:
        raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by the {procs.world_size} processes")
    local_batch = cfg.batch_size // procs.world_size

    # --- data, model, optimizer, diffusion ---
    data, config = _training_data(config, data, progress and procs.is_main)
    say(f"data: {data.describe()}")
    state = build_state(config, device, procs)
    diffusion = config.diffusion.build()
    if resume and found is None:
        say(f"no checkpoint in {out_dir / 'checkpoints'} yet: starting from step 0")
    elif found is not None:
        restore(state, *found, config, procs, say)
    start_step = state.step
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.save_json(out_dir / "config.json", config.to_dict())
    say(f"config:\n{config.to_json()}")
    say(f"model: {num_parameters(state.model):,} parameters; device {device}, "
        f"{'bfloat16 autocast' if cfg.bf16 else 'float32'}; {procs.world_size} process(es), "
        f"{local_batch} images each per step")
    train_model: nn.Module = torch.compile(state.model) if cfg.compile else state.model
    if procs.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.tensorboard else None,
                         keep_until=start_step if resume else None) if procs.is_main else None
    batches: Iterator[tuple[Tensor, Tensor]] = data.batches(
        local_batch, cfg.seed, flip=config.data.flip, rank=procs.rank, world_size=procs.world_size,
        start_step=start_step)

    def checkpoint(step: int) -> Path | None:
        return save_checkpoint(state, step, out_dir, config, procs)

    def grid(step: int) -> Path | None:
        if not procs.is_main:
            return None
        return preview(state.ema, diffusion, config, device, cfg.bf16, out_dir / "samples" / f"step_{step:08d}.png")

    # --- the loop ---
    last_ckpt, last_grid, last_loss, bad_in_a_row, out_of_time = None, None, None, 0, False
    window = MetricsWindow()
    run_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and procs.is_main), file=sys.stderr)
    stop = _StopFlag()
    try:
        with stop:
            state.model.train()
            while state.step < cfg.steps:
                x, y = next(batches)
                x = x.to(device, non_blocking=True)
                if device.type == "cuda" and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                outcome = train_step(state, train_model, diffusion, x, y, config, device, procs, cfg.bf16)
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
                        last_ckpt = checkpoint(state.step - bad_in_a_row)
                        raise Diverged(_divergence_message(bad_in_a_row, state.step, last_ckpt, cfg))

                # --- bookkeeping ---
                step = state.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {"step": step, **window.record(lr=state.optimizer.param_groups[0]["lr"],
                                                            skipped_steps=state.skipped,
                                                            time=time.perf_counter() - run_start)}
                    if metrics is not None:
                        metrics.write(record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{record['img_per_s']:.0f}")
                out_of_time = bool(cfg.time_limit) and time.perf_counter() - run_start > cfg.time_limit * 60
                stopping = procs.any(stop.signum is not None or out_of_time)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    last_grid = grid(step) or last_grid
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                    last_ckpt = checkpoint(step) or last_ckpt
                if stopping:
                    break
        bar.close()
        if stop.signum is not None:
            raise Interrupted(stop.signum, last_ckpt)
        if out_of_time:
            say(f"time limit of {cfg.time_limit:g} min reached at step {state.step}")
        last_grid = grid(state.step) or last_grid
        seconds = time.perf_counter() - run_start
        result = TrainResult(
            run_dir=out_dir, step=state.step, checkpoint=last_ckpt, sample_grid=last_grid, seconds=seconds,
            images_per_second=(state.step - start_step) * cfg.batch_size / max(seconds, 1e-9), last_loss=last_loss,
            skipped_steps=state.skipped, steps_taken=state.step - start_step,
            ranks_max_param_diff=_ranks_max_param_diff(state.model, procs) if cfg.check_sync else None,
        )
        if procs.is_main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
            checkpoints.save_json(out_dir / "summary.json", summary)
        return result
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


def _nothing_to_do(out_dir: Path, found: tuple[Path, checkpoints.TrainingCheckpoint], config: RunConfig,
                   say: Callable[[str], None]) -> TrainResult:
    path, ckpt = found
    step = ckpt.meta["step"]
    say(f"nothing to do: {out_dir} is at step {step} and train.steps is {config.train.steps}; "
        f"pass --train.steps N with N > {step} to train longer")
    return TrainResult(run_dir=out_dir, step=step, checkpoint=path, sample_grid=None, seconds=0.0,
                       images_per_second=0.0, last_loss=None, skipped_steps=ckpt.meta.get("skipped_steps", 0),
                       nothing_to_do=True)


def _resolve_bf16(config: RunConfig, device: torch.device) -> RunConfig:
    """The configuration with ``train.bf16`` decided for this device (auto → the measured default)."""
    bf16 = resolve_bf16(config.train.bf16, device, training=True)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, bf16=bf16))


def _training_data(config: RunConfig, data: ImageData | None, progress: bool) -> tuple[ImageData, RunConfig]:
    """The training images, and the configuration with the data's class count for ``class_cond``."""
    cfg = config.train
    if data is None:
        data = load_images(config.data.source, config.model.image_size, config.model.in_channels,
                           split=config.data.split, root=config.data.root or None,
                           limit=config.data.limit or None, progress=progress)
    if cfg.class_cond:
        if data.num_classes == 0:
            raise UserError(f"--train.class_cond needs labels, but {config.data.source} has none")
        if config.model.num_classes not in (0, data.num_classes):
            raise UserError(f"model.num_classes {config.model.num_classes} != the data's {data.num_classes} classes")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=data.num_classes))
    if len(data) < cfg.batch_size:
        raise UserError(f"{config.data.source} has {len(data)} images, fewer than train.batch_size {cfg.batch_size}")
    return data, config


def _divergence_message(bad: int, step: int, checkpoint: Path | None, cfg: Any) -> str:
    causes = f"a learning rate too high (train.lr={cfg.lr})"
    if cfg.bf16:
        causes += ", or a bfloat16 overflow (try --train.bf16 false)"
    return (f"{bad} steps in a row had a non-finite loss or gradient (step {step}); the last good state is saved "
            f"in {checkpoint}. Likely causes: {causes}")


@torch.no_grad()
def _ranks_max_param_diff(model: nn.Module, procs: Processes) -> float | None:
    """The largest difference between any parameter on any two ranks (0 when DDP kept them in sync)."""
    if procs.world_size == 1:
        return None
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).max())
