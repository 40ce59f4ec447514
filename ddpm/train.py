"""Training: Algorithm 1 of Ho et al. (2020) with the paper's recipe, exact resume and DDP.

The loop is in :func:`train` in plain sight: draw a batch, t and ε; compute the loss; clip the
gradient; step Adam; update the EMA; now and then log, save a sample grid and a checkpoint.

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

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm import checkpoints
from ddpm.config import RunConfig
from ddpm.data import ImageData, load_images
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.images import auto_scale, make_grid, save_image
from ddpm.models.unet import UNet
from ddpm.timestep_sampling import make_timestep_sampler

#: Run-directory entries that ``--overwrite`` may delete (nothing else is ever removed).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "samples", "tensorboard", "summary.json")

#: Fields that may change when a run is resumed; any other difference is an incompatible config.
RESUMABLE_FIELDS = {
    "data.source", "data.root",
    "train.steps", "train.time_limit", "train.log_every", "train.sample_every", "train.sample_count",
    "train.sample_sampler", "train.sample_steps", "train.ckpt_every", "train.keep_last", "train.device",
    "train.threads", "train.tensorboard", "train.compile", "train.max_bad_steps",
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


# ---------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class Processes:
    """This process's place in a (maybe single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this process's GPU) if available, else MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--train.device cuda was asked for, but PyTorch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


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


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from several integers (a run seed, a rank, a purpose), well mixed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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


# ---------------------------------------------------------------------------- state for exact resume


def _rng_state(gen_t: torch.Generator, gen_noise: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "gen_t": gen_t.get_state(), "gen_noise": gen_noise.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], gen_t: torch.Generator, gen_noise: torch.Generator,
                   device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen_t.set_state(state["gen_t"])
    gen_noise.set_state(state["gen_noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_objects(obj: Any, procs: Processes) -> list[Any]:
    if procs.world_size == 1:
        return [obj]
    out: list[Any] = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- sampling previews


@torch.no_grad()
def sample_grid(model: nn.Module, diffusion: GaussianDiffusion, config: RunConfig, device: torch.device,
                count: int | None = None, seed: int | None = None) -> Tensor:
    """A fixed-seed batch of samples for a preview grid (class-conditional: classes in turn)."""
    count = count or config.train.sample_count
    model_kwargs = {}
    if config.model.num_classes:
        model_kwargs["y"] = torch.arange(count, device=device) % config.model.num_classes
    generator = torch.Generator(device=device).manual_seed(config.train.seed if seed is None else seed)
    shape = (count, config.model.in_channels, config.model.image_size, config.model.image_size)
    was_training = model.training
    model.eval()
    with _autocast(device, config.train.bf16):
        x = diffusion.sample(model, shape, sampler=config.train.sample_sampler, steps=config.train.sample_steps,
                             generator=generator, device=device, model_kwargs=model_kwargs)
    model.train(was_training)
    return x.float().cpu()


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        resume: continue the run in ``out_dir`` from its latest checkpoint.
        overwrite: start over in a directory that already holds a run.
        explicit: the ``section.field`` names the user set explicitly (for ``resume``).
        data: preloaded data (tests); by default loaded from ``config.data``.
    """
    out_dir = Path(out_dir)
    procs, device = init_processes(config.train.device)
    say = log if procs.is_main else (lambda message: None)
    if procs.is_main:
        prepare_run_dir(out_dir, resume, overwrite)
    if resume:
        config = resume_config(RunConfig.from_dict(checkpoints.load_json(out_dir / "config.json")), config,
                               explicit or set())
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % procs.world_size:
        raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by the {procs.world_size} processes")
    local_batch = cfg.batch_size // procs.world_size

    # Data.
    if data is None:
        data = load_images(config.data.source, config.model.image_size, config.model.in_channels,
                           split=config.data.split, root=config.data.root or None,
                           limit=config.data.limit or None, progress=progress and procs.is_main)
    say(f"data: {data.describe()}")
    if cfg.class_cond:
        if data.num_classes == 0:
            raise UserError(f"--train.class_cond needs labels, but {config.data.source} has none")
        if config.model.num_classes not in (0, data.num_classes):
            raise UserError(f"model.num_classes {config.model.num_classes} != the data's {data.num_classes} classes")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=data.num_classes))
    if len(data) < cfg.batch_size:
        raise UserError(f"{config.data.source} has {len(data)} images, fewer than train.batch_size {cfg.batch_size}")

    # Model, EMA, optimizer, diffusion.
    torch.manual_seed(derive_seed(cfg.seed, procs.rank, 0))
    model = UNet(config.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    diffusion = config.diffusion.build()
    timestep_sampler = make_timestep_sampler(cfg.timestep_sampler, diffusion.num_timesteps)
    gen_t = torch.Generator().manual_seed(derive_seed(cfg.seed, procs.rank, 1))
    gen_noise = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, procs.rank, 2))

    start_step, skipped = 0, 0
    if resume:
        found = checkpoints.latest_training_checkpoint(out_dir / "checkpoints", warn=lambda m: say(f"warning: {m}"))
        if found is None:
            say(f"no checkpoint in {out_dir / 'checkpoints'} yet: starting from step 0")
        else:
            path, ckpt = found
            model.load_weights(ckpt.group("model"), source=path / "model.safetensors")
            ema.load_weights(ckpt.group("ema"), source=path / "ema.safetensors")
            optimizer.load_state_dict(checkpoints.optimizer_state_from_flat(ckpt.group("optimizer"),
                                                                            ckpt.meta["optimizer"]))
            timestep_sampler.load_state_dict(ckpt.group("sampler"))
            start_step, skipped = ckpt.meta["step"], ckpt.meta.get("skipped_steps", 0)
            rng = checkpoints.rank_rng_state(ckpt.group("rng"), procs.rank)
            if ckpt.meta.get("world_size") == procs.world_size and rng:
                _set_rng_state(rng, gen_t, gen_noise, device)
            else:
                say(f"warning: {path} was written by {ckpt.meta.get('world_size')} process(es), this run has "
                    f"{procs.world_size}: random draws are reseeded, so the run will not repeat exactly")
                torch.manual_seed(derive_seed(cfg.seed, procs.rank, 0, start_step))
            say(f"resumed from {path} at step {start_step}")

    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.save_json(out_dir / "config.json", config.to_dict())
    say(f"config:\n{config.to_json()}")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params:,} parameters; device {device}; {procs.world_size} process(es), "
        f"{local_batch} images each per step")

    train_model: nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if procs.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.tensorboard else None,
                         keep_until=start_step if resume else None) if procs.is_main else None
    batches: Iterator[tuple[Tensor, Tensor]] = data.batches(
        local_batch, cfg.seed, flip=config.data.flip, rank=procs.rank, world_size=procs.world_size,
        start_step=start_step)

    def save(step: int) -> Path | None:
        rng = _gather_objects(_rng_state(gen_t, gen_noise, device), procs)
        if not procs.is_main:
            return None
        tensors, optimizer_meta = checkpoints.optimizer_state_to_flat(optimizer.state_dict())
        return checkpoints.save_training_checkpoint(
            out_dir / "checkpoints", step,
            tensors={"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": tensors,
                     "sampler": timestep_sampler.state_dict(), "rng": checkpoints.rng_states_to_flat(rng)},
            meta={"step": step, "skipped_steps": skipped, "world_size": procs.world_size,
                  "optimizer": optimizer_meta, "config": config.to_dict()},
            keep_last=cfg.keep_last,
        )

    def preview(step: int) -> Path | None:
        if not procs.is_main:
            return None
        x = sample_grid(ema, diffusion, config, device)
        nrow = config.model.num_classes or None
        grid = make_grid(x, nrow=nrow, scale=auto_scale(config.model.image_size))
        return save_image(grid, out_dir / "samples" / f"step_{step:08d}.png")

    step, last_ckpt, last_grid = start_step, None, None
    window: dict[str, float] = {}
    window_images, window_start = 0, time.perf_counter()
    run_start = time.perf_counter()
    last_loss = None
    consecutive_bad = 0
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and procs.is_main), file=sys.stderr)
    stop = _StopFlag()
    try:
        with stop:
            model.train()
            while step < cfg.steps:
                # --- one step of Algorithm 1 ---
                x, y = next(batches)
                x = x.to(device, non_blocking=True)
                if device.type == "cuda" and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                t, weights = timestep_sampler.sample(local_batch, device, generator=gen_t)
                model_kwargs = {}
                if cfg.class_cond:
                    drop = torch.rand(local_batch, generator=gen_t) < cfg.label_dropout
                    model_kwargs["y"] = torch.where(drop, torch.full_like(y, -1), y).to(device)
                noise = torch.randn(x.shape, generator=gen_noise, device=device, dtype=x.dtype)
                with _autocast(device, cfg.bf16):
                    terms = diffusion.training_losses(train_model, x, t, cfg.loss_type, noise=noise,
                                                      model_kwargs=model_kwargs)
                loss = (terms["loss"].float() * weights).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The norm is the same on every rank (DDP averaged the gradients), so all ranks
                # agree on skipping a step.
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
                if cfg.timestep_sampler != "uniform":
                    all_t, all_losses = _gather_tensors([t, terms["loss"].detach().float()], procs)
                    timestep_sampler.update(all_t, all_losses)
                step += 1
                if not math.isfinite(grad_norm):
                    skipped += 1
                    consecutive_bad += 1
                    optimizer.zero_grad(set_to_none=True)
                    if consecutive_bad >= cfg.max_bad_steps:
                        # The weights are still those of the last good step: save them.
                        last_ckpt = save(step - consecutive_bad)
                        raise Diverged(
                            f"{consecutive_bad} steps in a row had a non-finite loss or gradient (step {step}); "
                            f"the last good state is saved in {last_ckpt}. Likely causes: a learning rate too high "
                            f"(train.lr={cfg.lr}), or a float16/bfloat16 overflow (try --train.bf16 false)")
                else:
                    consecutive_bad = 0
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step - 1, cfg.lr, cfg.warmup_steps)
                    optimizer.step()
                    update_ema(ema, model, ema_decay(step - 1, cfg.ema_decay, cfg.ema_warmup))
                    last_loss = loss.item()
                    for key in ("loss", "mse", "vb"):
                        if key in terms:
                            window[key] = window.get(key, 0.0) + terms[key].detach().float().mean().item()
                    window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
                    window["n"] = window.get("n", 0.0) + 1
                window_images += cfg.batch_size
                bar.update(1)

                # --- bookkeeping ---
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    n = max(window.pop("n", 0.0), 1.0)
                    record = {"step": step, **{k: v / n for k, v in window.items()},
                              "lr": optimizer.param_groups[0]["lr"], "img_per_s": window_images / elapsed,
                              "skipped_steps": skipped, "time": time.perf_counter() - run_start}
                    if metrics is not None:
                        metrics.write(record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                    img_s=f"{record['img_per_s']:.0f}")
                    window, window_images, window_start = {}, 0, time.perf_counter()
                out_of_time = cfg.time_limit and time.perf_counter() - run_start > cfg.time_limit * 60
                stopping = _any_rank(stop.signum is not None or bool(out_of_time), procs)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    last_grid = preview(step) or last_grid
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                    last_ckpt = save(step) or last_ckpt
                if stopping:
                    break
        bar.close()
        if stop.signum is not None:
            raise Interrupted(stop.signum, last_ckpt)
        if out_of_time:
            say(f"time limit of {cfg.time_limit:g} min reached at step {step}")
        last_grid = preview(step) or last_grid
        seconds = time.perf_counter() - run_start
        result = TrainResult(
            run_dir=out_dir, step=step, checkpoint=last_ckpt, sample_grid=last_grid, seconds=seconds,
            images_per_second=(step - start_step) * cfg.batch_size / max(seconds, 1e-9), last_loss=last_loss,
            skipped_steps=skipped, ranks_max_param_diff=_ranks_max_param_diff(model, procs),
        )
        if procs.is_main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
            checkpoints.save_json(out_dir / "summary.json", summary)
        return result
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


def _gather_tensors(tensors: list[Tensor], procs: Processes) -> list[Tensor]:
    if procs.world_size == 1:
        return tensors
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(procs.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        out.append(torch.cat(parts))
    return out


def _any_rank(flag: bool, procs: Processes) -> bool:
    """Whether any process raised ``flag`` (all processes must stop at the same step)."""
    if procs.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
