"""Training latent diffusion's KL autoencoder (Rombach et al. 2022, section 3.1 and appendix G).

The objective is :class:`ddpm.autoencoder_losses.AutoencoderLoss`: the L1 distance summed over
pixels, a KL weight of 1e-6, and optionally LPIPS and a hinge PatchGAN with Esser et al.'s adaptive
weight from ``loss.disc_start`` on. Adam with the LDM code's betas (0.5, 0.9) trains the
autoencoder, a second Adam the discriminator. :func:`train_autoencoder` reads as
:func:`ddpm.train.train` does (setup, then the loop) and runs in the same loop,
:func:`ddpm.runs.train_loop`, with its run directory, metrics log, exact resume, signal handling
and non-finite guard; it runs in one process.

At the end the latent scale is measured (:func:`latent_scale`, the LDM code's ``scale_by_std``),
stored as the model's ``scaling_factor``, and the model (EMA weights if any) is written in the
diffusers layout to ``<run>/autoencoder/``, which ``ddpm train --autoencoder <run>`` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ddpm import checkpoints
from ddpm.autoencoder_losses import AutoencoderLoss, AutoencoderLossConfig
from ddpm.config import DataConfig, SectionedConfig
from ddpm.data import ImageData, load_images
from ddpm.errors import UserError, check_positive
from ddpm.generate import grid_image
from ddpm.images import save_image, to_uint8
from ddpm.latent import AUTOENCODER_DIR
from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.runs import (
    Hooks,
    MetricsLog,
    Processes,
    RunSpec,
    StepOutcome,
    TrainResult,
    clipped_grad_norm,
    ema_decay,
    nothing_to_do,
    open_run,
    record_config,
    rng_state,
    set_rng_state,
    train_loop,
    update_ema,
)
from ddpm.runtime import derive_seed, num_parameters, resolve_device


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """The optimisation and the run's bookkeeping.

    Attributes:
        steps: optimizer steps.
        batch_size: images per step.
        lr: Adam's learning rate, for the autoencoder and the discriminator alike (as the LDM code).
        adam_beta1: Adam's beta1 (LDM: 0.5, as for GANs).
        adam_beta2: Adam's beta2 (LDM: 0.9).
        ema_decay: decay of an exponential moving average of the weights, which then makes the
            reconstruction grids and the saved model (0: none, as LDM).
        grad_clip: clip the autoencoder's global gradient norm to this (0: no clipping, as LDM).
        seed: the seed of every random draw (data order, flips, posterior samples).
        log_every: write a metrics line every this many steps.
        sample_every: save a grid of reconstructions every this many steps (0: only at the end).
        sample_count: images in that grid: the first training images above, their reconstructions below.
        ckpt_every: save a checkpoint every this many steps (and always at the end).
        keep_last: how many checkpoints to keep.
        time_limit: stop (with a checkpoint) once this many minutes have passed since the command started
            (data loading included; 0: no limit).
        max_bad_steps: stop after this many non-finite losses or gradients in a row.
        scale_images: training images whose latents give the scale factor 1 / std at the end.
        device: auto (CUDA if available), cpu, cuda, cuda:N or mps.
        threads: CPU threads for PyTorch (0: PyTorch's default).
    """

    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    ema_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    sample_count: int = 16
    ckpt_every: int = 1000
    keep_last: int = 3
    time_limit: float = 0.0
    max_bad_steps: int = 20
    scale_images: int = 4096
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "sample_count", "ckpt_every", "keep_last", "max_bad_steps",
                     "scale_images"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("sample_every", "threads", "seed"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if not self.lr > 0 or self.time_limit < 0 or self.grad_clip < 0:
            raise UserError(f"train.lr must be > 0, train.time_limit and train.grad_clip >= 0, got {self.lr}, "
                            f"{self.time_limit}, {self.grad_clip}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class AutoencoderRunConfig(SectionedConfig):
    """Everything an autoencoder run needs; saved as ``config.json`` in the run directory."""

    SECTIONS: ClassVar[dict[str, type]] = {"model": AutoencoderKLConfig, "loss": AutoencoderLossConfig,
                                           "data": DataConfig, "train": AutoencoderTrainConfig}
    VERB: ClassVar[str] = "train-autoencoder"

    model: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)

    def __post_init__(self) -> None:
        if self.data.autoencoder:
            raise UserError("data.autoencoder is for 'ddpm train' (a latent U-Net), not for training an autoencoder")


#: The run directory's entries (``--overwrite`` deletes only these) and the fields a resume may change.
SPEC = RunSpec(
    run_files=("config.json", "metrics.jsonl", "checkpoints", "samples", "summary.json", AUTOENCODER_DIR),
    resumable={
        "data.source", "data.root", "train.steps", "train.time_limit", "train.log_every", "train.sample_every",
        "train.sample_count", "train.ckpt_every", "train.keep_last", "train.scale_images", "train.device",
        "train.threads", "train.max_bad_steps",
    },
)

# Run presets: a model preset of ddpm.models.autoencoder.PRESETS plus section overrides. lr 1e-3
# (ten times LDM's) because runs here are CPU minutes long; what the presets reach in a budget is
# in bench/RESULTS.md (python -m bench.latent).
PRESETS: dict[str, dict] = {
    "mnist-f4": {
        "model": "mnist-f4", "data": {"flip": False},  # a mirrored digit is not a digit
        "train": {"steps": 3000, "batch_size": 32, "lr": 1e-3, "sample_every": 500, "ckpt_every": 500},
    },
    "mnist-pairs-f4": {  # for the mnist-pairs-latent text-to-image preset: 28x56 two-digit images
        "model": "mnist-pairs-f4", "data": {"flip": False},
        "train": {"steps": 3000, "batch_size": 32, "lr": 1e-3, "sample_every": 500, "ckpt_every": 500},
    },
    "cifar10-f4": {
        "model": "cifar10-f4",
        "train": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "sample_every": 1000, "ckpt_every": 500},
    },
    "cifar10-f2": {
        "model": "cifar10-f2",
        "train": {"steps": 6000, "batch_size": 32, "lr": 1e-3, "sample_every": 1000, "ckpt_every": 500},
    },
    "tiny": {
        "model": "tiny", "data": {"flip": False},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 3, "sample_count": 4,
                  "ckpt_every": 3, "keep_last": 2, "scale_images": 32},
    },
}


def get_config(preset: str, overrides: dict[str, str] | None = None) -> AutoencoderRunConfig:
    """The configuration of a run preset with ``section.field`` overrides applied."""
    if preset not in PRESETS:
        raise UserError(f"unknown autoencoder preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    values = {"model": AutoencoderKLConfig.preset(spec["model"]).to_dict(),
              **{section: dict(spec.get(section, {})) for section in ("loss", "data", "train")}}
    return AutoencoderRunConfig.from_dict(values).replace(overrides or {})


# ---------------------------------------------------------------------------- state and checkpoints


@dataclass
class AutoencoderState:
    """Everything a checkpoint holds: the autoencoder, its EMA, the loss's discriminator, both
    optimizers and the generator of the posterior samples."""

    model: AutoencoderKL
    ema: AutoencoderKL | None
    loss: AutoencoderLoss
    optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer | None
    gen_noise: torch.Generator
    step: int = 0
    skipped: int = 0

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"gen_noise": self.gen_noise}

    @property
    def sampling_model(self) -> AutoencoderKL:
        """The weights that reconstruct and are saved: the EMA's if there is one."""
        return self.ema if self.ema is not None else self.model

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer, **({"disc_optimizer": self.disc_optimizer} if self.disc_optimizer else {})}


def build_state(config: AutoencoderRunConfig, device: torch.device) -> AutoencoderState:
    """A fresh autoencoder (PyTorch's initialisation, seeded), its loss and EMA, the optimizers."""
    cfg = config.train
    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    model = AutoencoderKL(config.model).to(device)
    loss = AutoencoderLoss(config.loss, config.model.in_channels).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None

    def adam(params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))

    disc_optimizer = adam(loss.discriminator.parameters()) if loss.discriminator is not None else None
    return AutoencoderState(model, ema, loss, adam(model.parameters()), disc_optimizer,
                            torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, 0, 2)))


def save_checkpoint(state: AutoencoderState, step: int, out_dir: Path, config: AutoencoderRunConfig) -> Path:
    """Write ``checkpoints/step_<step>/``: weights, EMA, discriminator, both optimizers, random states."""
    tensors: dict[str, dict[str, Tensor]] = {"model": state.model.state_dict(),
                                             "rng": rng_state(state.generators)}
    if state.ema is not None:
        tensors["ema"] = state.ema.state_dict()
    if state.loss.discriminator is not None:
        tensors["disc"] = state.loss.discriminator.state_dict()
    meta = {"step": step, "skipped_steps": state.skipped, "world_size": 1, "config": config.to_dict()}
    for name, optimizer in state.optimizers().items():
        tensors[name], meta[name] = checkpoints.optimizer_state_to_flat(optimizer.state_dict())
    return checkpoints.save_training_checkpoint(out_dir / "checkpoints", step, tensors, meta,
                                                keep_last=config.train.keep_last)


def restore(state: AutoencoderState, path: Path, ckpt: checkpoints.TrainingCheckpoint) -> None:
    """Load what :func:`save_checkpoint` wrote into ``state``."""
    state.model.load_weights(ckpt.group("model"), source=path / "model.safetensors")
    if state.ema is not None:
        state.ema.load_weights(ckpt.group("ema"), source=path / "ema.safetensors")
    if state.loss.discriminator is not None:
        state.loss.discriminator.load_state_dict(ckpt.group("disc"))
    for name, optimizer in state.optimizers().items():
        optimizer.load_state_dict(checkpoints.optimizer_state_from_flat(ckpt.group(name), ckpt.meta[name]))
    set_rng_state(ckpt.group("rng"), state.generators)
    state.step, state.skipped = ckpt.meta["step"], ckpt.meta.get("skipped_steps", 0)


# ---------------------------------------------------------------------------- one step, pictures, scale


def train_step(state: AutoencoderState, x: Tensor, cfg: AutoencoderTrainConfig) -> StepOutcome:
    """One update of the autoencoder on ``L_G`` and (once the GAN is on) of the discriminator on
    ``L_D``, then the EMA; returns the logged terms and the autoencoder's gradient norm.

    Both gradients are taken before either optimizer steps, so a step whose loss or gradient is
    not finite, in either network, changes nothing (weights, Adam's moments, the EMA) and is
    reported as not applied. The discriminator's loss sees the reconstruction detached, so the
    order changes none of the updates.
    """
    reconstruction, posterior = state.model(x, sample_posterior=True, generator=state.gen_noise)
    loss, terms = state.loss.generator_loss(x, reconstruction, posterior, state.step, state.model.last_layer)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clipped_grad_norm(state.model.parameters(), cfg.grad_clip)
    disc = state.disc_optimizer if state.disc_optimizer is not None and state.loss.gan_active(state.step) else None
    finite = math.isfinite(grad_norm)
    if disc is not None:
        disc_loss, disc_terms = state.loss.discriminator_loss(x, reconstruction)
        disc.zero_grad(set_to_none=True)  # also the generator loss's gradients
        disc_loss.backward()
        finite = finite and math.isfinite(clipped_grad_norm(state.loss.discriminator.parameters(), 0.0))
        terms |= disc_terms
    if not finite:
        for optimizer in state.optimizers().values():
            optimizer.zero_grad(set_to_none=True)
        return StepOutcome({}, grad_norm, applied=False)
    state.optimizer.step()
    if disc is not None:
        disc.step()
    if state.ema is not None:
        update_ema(state.ema, state.model, ema_decay(state.step, cfg.ema_decay, warmup=True))
    means = {key: value.item() for key, value in terms.items()}
    return StepOutcome(means, grad_norm, applied=True, loss=means.get("loss"))


@torch.no_grad()
def reconstruction_grid(model: AutoencoderKL, data: ImageData, count: int, device: torch.device, path: Path) -> Path:
    """The first ``count`` training images above their reconstructions (the posterior's mode)."""
    x = data.to_float(slice(0, count)).to(device)
    reconstruction = model(x)[0].clamp(-1, 1)
    return save_image(grid_image(to_uint8(torch.cat([x, reconstruction]).cpu()), nrow=len(x)), path)


@torch.no_grad()
def latent_scale(model: AutoencoderKL, images: Tensor, seed: int, batch_size: int = 256) -> float:
    """The LDM code's ``scale_by_std``: 1 / the standard deviation of all elements of the latents
    ``z ~ q(z | x)`` (posterior samples, as LDM draws them for its first batch) of ``images``
    ``[N, C, H, W]`` in [-1, 1], so that diffusion starts from unit-variance data."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 4))
    z = torch.cat([model.encode(part.to(device)).sample(generator).float().cpu()
                   for part in images.split(batch_size)])
    return 1.0 / z.flatten().std().item()


def finish(model: AutoencoderKL, data: ImageData, config: AutoencoderRunConfig, out_dir: Path) -> tuple[float, Path]:
    """Measure the latent scale, store it as ``scaling_factor`` and write ``<run>/autoencoder/``."""
    images = data.to_float(slice(0, config.train.scale_images))
    scale = latent_scale(model, images, config.train.seed)
    final = AutoencoderKL(dataclasses.replace(model.config, scaling_factor=scale))
    final.load_state_dict(model.state_dict())
    final.save_diffusers(out_dir / AUTOENCODER_DIR)
    return scale, out_dir / AUTOENCODER_DIR


# ---------------------------------------------------------------------------- the run


def train_autoencoder(
    config: AutoencoderRunConfig,
    out_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    explicit: set[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: ImageData | None = None,
) -> TrainResult:
    """Train an autoencoder on ``config.data.source`` and write the run to ``out_dir``: config.json,
    metrics.jsonl, samples/step_N.png, checkpoints/step_N/, summary.json and, at the end,
    autoencoder/.

    ``resume``, ``overwrite`` and ``explicit`` as :func:`ddpm.train.train` takes them. The result's
    ``extra`` (also in summary.json) holds ``scaling_factor`` and ``autoencoder``, the folder written.
    """
    # --- setup: run directory, configuration, data, state ---
    command_start = time.perf_counter()  # train.time_limit counts from here, data loading included
    out_dir, procs = Path(out_dir), Processes()
    config, found = open_run(out_dir, config, SPEC, resume=resume, overwrite=overwrite, explicit=explicit,
                             procs=procs, say=log)
    if (done := nothing_to_do(out_dir, found, config.train.steps, log)) is not None:
        return done
    cfg = config.train
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = _training_data(config, data, progress)
    log(f"data: {data.describe()}")
    state = build_state(config, device)
    if found is not None:
        restore(state, *found)
        log(f"resumed from {found[0]} at step {state.step}")
    record_config(out_dir, config, procs, log)
    f = config.model.downsampling_factor
    disc = "" if state.loss.discriminator is None else \
        f", discriminator {num_parameters(state.loss.discriminator):,} from step {config.loss.disc_start}"
    (h, w), c = data.size, config.model.latent_channels
    log(f"model: {num_parameters(state.model):,} parameters{disc}; device {device}, float32; "
        f"latents {h // f}x{w // f}x{c}")
    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_until=state.step if resume else None)
    batches = data.batches(cfg.batch_size, cfg.seed, flip=config.data.flip, start_step=state.step)

    def grid(step: int) -> Path:
        return reconstruction_grid(state.sampling_model, data, cfg.sample_count, device,
                                   out_dir / "samples" / f"step_{step:08d}.png")

    def finish_run() -> dict[str, Any]:
        scale, final = finish(state.sampling_model, data, config, out_dir)
        log(f"latent scale 1/std = {scale:.5g} over {min(len(data), cfg.scale_images):,} images: "
            f"scaling_factor of {final}")
        return {"scaling_factor": scale, "autoencoder": str(final)}

    # --- the loop ---
    state.model.train()
    hooks = Hooks(lambda batch: train_step(state, batch.x.to(device), cfg),
                  lambda step: save_checkpoint(state, step, out_dir, config), grid, finish_run, shown="rec")
    return train_loop(state, batches, hooks, cfg, out_dir, procs=procs, metrics=metrics, command_start=command_start,
                      progress=progress, desc="train-autoencoder", say=log)


def _training_data(config: AutoencoderRunConfig, data: ImageData | None, progress: bool) -> ImageData:
    """The training images, checked against the autoencoder's channels and downsampling factor."""
    if data is None:
        data = load_images(config.data.source, config.model.sample_size, config.model.in_channels,
                           split=config.data.split, root=config.data.root or None, limit=config.data.limit or None,
                           progress=progress)
    f, (h, w) = config.model.downsampling_factor, data.size
    if h % f or w % f or data.channels != config.model.in_channels:
        raise UserError(f"{config.data.source}: {h}x{w}x{data.channels} images do not fit the autoencoder "
                        f"(model.in_channels {config.model.in_channels}, sides divisible by {f})")
    return data
