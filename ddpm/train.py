"""Training: Algorithm 1 of Ho et al. (2020) with the paper's recipe, exact resume and DDP.

:func:`train` reads as nanoGPT's loop does: the setup in a few named pieces (the run directory
and configuration, the data, the :class:`TrainState`, resuming it), then one visible loop whose
body is :func:`train_step` (draw t and ε, compute the loss, clip the gradient, step Adam, update
the EMA) followed by the bookkeeping (a metrics line, a preview grid, a checkpoint). With
``data.autoencoder`` the same loop trains on an autoencoder's scaled latents, the training set
encoded once (:class:`ddpm.latent.LatentData`), and the previews are decoded (latent diffusion).
The loop itself, with its bookkeeping, is :func:`ddpm.runs.train_loop`, shared with every trainer.

Everything random is drawn from generators seeded by (seed, rank): the data order and flips
(:meth:`ddpm.data.ImageData.batches`), t and label dropout (a CPU generator), ε (a generator on
the device), dropout (the global generator) and a latent run's posterior draws (seeded by
(seed, rank, step), so nothing of them is saved). A checkpoint saves all their states together with
the weights, the EMA and Adam's moments, so that a resumed run takes exactly the steps the
uninterrupted one would have. Under ``torchrun`` each process trains on its own shard of every
batch, DDP averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddpm import checkpoints
from ddpm.conditioning import (
    Captions,
    TextPrompts,
    TrainingCondition,
    frozen_text_encoder,
    network_meta,
    prompts_of,
    run_network,
    training_condition,
)
from ddpm.config import RunConfig
from ddpm.data import Batch, ImageData
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate, grid_image
from ddpm.images import labelled_rows, save_image
from ddpm.latent import LatentData, load_autoencoder, pixel_size
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.video_unet import VideoUNetConfig
from ddpm.runs import (
    Hooks,
    MetricsLog,
    Processes,
    RunSpec,
    StepOutcome,
    TrainResult,
    clipped_grad_norm,
    ema_decay,
    init_processes,
    nothing_to_do,
    open_run,
    record_config,
    rng_state,
    set_rng_state,
    train_loop,
    update_ema,
)
from ddpm.runtime import autocast, derive_seed, num_parameters, resolve_bf16
from ddpm.shards import ShardStream
from ddpm.sources import TrainingImages, open_training_images
from ddpm.streaming import StreamedBatches
from ddpm.superres import superres_preview
from ddpm.timestep_sampling import UniformSampler, make_timestep_sampler
from ddpm.tokenizer import WordTokenizer
from ddpm.video_data import VideoData, load_videos
from ddpm.video_training import video_preview, video_training_condition

#: The run directory's entries (``--overwrite`` deletes only these) and the fields a resume may change
#: (any other difference is an incompatible config).
SPEC = RunSpec(
    run_files=("config.json", "metrics.jsonl", "checkpoints", "samples", "tensorboard", "summary.json", "cache"),
    resumable={
        "data.source", "data.root", "data.stream", "data.workers", "data.cache",
        "train.steps", "train.time_limit", "train.log_every", "train.sample_every", "train.sample_count",
        "train.sample_sampler", "train.sample_steps", "train.ckpt_every", "train.keep_last", "train.device",
        "train.threads", "train.tensorboard", "train.compile", "train.max_bad_steps", "train.check_sync",
    },
)


# ---------------------------------------------------------------------------- the recipe


def learning_rate(step: int, lr: float, warmup_steps: int) -> float:
    """The paper's linear warm-up: lr · min(1, (step + 1) / warmup)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


# ---------------------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a checkpoint holds: the network, its EMA, Adam, the t-sampler, the generators."""

    model: nn.Module  # a network of ddpm.models.NETWORKS
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    timestep_sampler: UniformSampler
    gen_t: torch.Generator  # t and label dropout (CPU)
    gen_noise: torch.Generator  # ε (on the device)
    step: int = 0
    skipped: int = 0

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"gen_t": self.gen_t, "gen_noise": self.gen_noise}


def build_state(config: RunConfig, device: torch.device, procs: Processes,
                tokenizer: WordTokenizer | None = None) -> TrainState:
    """A fresh model (its initialisation seeded per rank; a text-to-image run's with its text
    transformer on ``tokenizer``'s vocabulary), its EMA, Adam and the generators."""
    cfg = config.train
    torch.manual_seed(derive_seed(cfg.seed, procs.rank, 0))
    model = run_network(config, tokenizer).to(device)
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
        set_rng_state(rng, state.generators)
    else:
        say(f"warning: {path} was written by {ckpt.meta.get('world_size')} process(es), this run has "
            f"{procs.world_size}: random draws are reseeded, so the run will not repeat exactly")
        torch.manual_seed(derive_seed(config.train.seed, procs.rank, 0, state.step))
    say(f"resumed from {path} at step {state.step}")


def save_checkpoint(state: TrainState, step: int, out_dir: Path, config: RunConfig, procs: Processes,
                    data_state: Any = None) -> Path | None:
    """Write ``checkpoints/step_<step>/`` (rank 0; every rank's random state gathered into it, and with a
    shard stream every rank's ``data_state``, its place in the stream after ``step`` steps)."""
    rng = procs.gather_objects(rng_state(state.generators))
    places = procs.gather_objects(data_state) if data_state is not None else None
    if not procs.is_main:
        return None
    tensors, optimizer_meta = checkpoints.optimizer_state_to_flat(state.optimizer.state_dict())
    return checkpoints.save_training_checkpoint(
        out_dir / "checkpoints", step,
        tensors={"model": state.model.state_dict(), "ema": state.ema.state_dict(), "optimizer": tensors,
                 "sampler": state.timestep_sampler.state_dict(), "rng": checkpoints.rng_states_to_flat(rng)},
        meta={"step": step, "skipped_steps": state.skipped, "world_size": procs.world_size,
              "optimizer": optimizer_meta, "config": config.to_dict(), **network_meta(state.model),
              **({"data_state": places} if places is not None else {})},
        keep_last=config.train.keep_last,
    )


# ---------------------------------------------------------------------------- one step and its log


def train_step(state: TrainState, train_model: nn.Module, diffusion: GaussianDiffusion, batch: Batch,
               condition: TrainingCondition, config: RunConfig, device: torch.device, procs: Processes,
               bf16: bool) -> StepOutcome:
    """One step of Algorithm 1: t and ε drawn, the condition (with its dropout), the loss, its
    gradient clipped, Adam, the EMA.

    A step whose gradient is not finite changes nothing (the weights, Adam's moments, the EMA
    and the loss-aware sampler's history stay as they were) and is reported as not applied.
    """
    cfg = config.train
    x = batch.x.to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    t, weights = state.timestep_sampler.sample(x.shape[0], device, generator=state.gen_t)
    model_kwargs = condition(batch, state.gen_t, device)
    noise = torch.randn(x.shape, generator=state.gen_noise, device=device, dtype=x.dtype)
    with autocast(device, bf16):
        terms = diffusion.training_losses(train_model, x, t, cfg.loss_type, noise=noise, model_kwargs=model_kwargs,
                                          snr_gamma=cfg.snr_gamma)
    loss = (terms["loss"].float() * weights).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The norm is the same on every rank (DDP averaged the gradients), so all ranks agree on
    # skipping a step.
    grad_norm = clipped_grad_norm(state.model.parameters(), cfg.grad_clip)
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


def preview(ema: nn.Module, diffusion: GaussianDiffusion, config: RunConfig, device: torch.device, bf16: bool,
            path: Path, autoencoder: AutoencoderKL | None = None, prompts: TextPrompts | None = None,
            captions: Sequence[str] = ()) -> Path:
    """A fixed-seed grid of EMA samples, decoded to pixels by ``autoencoder`` for a latent model:
    for a class-conditional model the classes in turn, one per column; for a text-conditional one a
    row per prompt (``train.sample_prompts``, else the first distinct ``captions``), labelled."""
    cfg = config.train
    guided = ema.num_classes or prompts is not None
    kwargs = {"seed": cfg.seed, "batch_size": cfg.sample_count, "device": device, "bf16": bf16, "progress": False,
              "autoencoder": autoencoder,
              "guidance_scale": cfg.sample_guidance_scale if guided and cfg.sample_guidance_scale != 1 else None}
    settings = SamplerSettings(cfg.sample_sampler, cfg.sample_steps)
    if prompts is None:
        samples = generate(ema, diffusion, cfg.sample_count, settings, **kwargs)
        return save_image(grid_image(samples.uint8(), nrow=ema.num_classes or None), path)
    texts = preview_prompts(cfg.sample_prompts, captions)
    per = max(1, cfg.sample_count // len(texts))
    samples = generate(ema, diffusion, per * len(texts), settings, prompts=[t for t in texts for _ in range(per)],
                       conditioning=prompts, **kwargs)
    return save_image(labelled_rows([(samples.uint8()[i * per:(i + 1) * per], t) for i, t in enumerate(texts)]), path)


def _preview(ema: nn.Module, diffusion: GaussianDiffusion, config: RunConfig, data: ImageData | LatentData | VideoData,
             device: torch.device, path: Path, autoencoder: AutoencoderKL | None,
             prompts: TextPrompts | None) -> Path:
    """The run's preview picture: clips for a video model, enlarged training images for a
    super-resolution stage, else :func:`preview`."""
    bf16 = config.train.bf16
    if isinstance(data, VideoData):
        return video_preview(ema, diffusion, config, device, bf16, path)
    if getattr(config.model, "low_res_channels", 0):
        n = min(config.train.sample_count, len(data))
        return superres_preview(ema, diffusion, config, data.to_float(slice(0, n)), data.labels[:n], device, bf16, path)
    return preview(ema, diffusion, config, device, bf16, path, autoencoder, prompts, _captions(data))


def preview_prompts(given: str, captions: Sequence[str], count: int = 8) -> list[str]:
    """The preview's prompts: the lines of ``given``, else the first ``count`` distinct captions."""
    lines = [line.strip() for line in given.splitlines() if line.strip()]
    return lines or list(dict.fromkeys(c for c in captions if c))[:count] or [""]


# ---------------------------------------------------------------------------- the run


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
            configuration wins, except for ``explicit`` overrides listed in ``SPEC.resumable``).
        out_dir: the run directory (config.json, metrics.jsonl, samples/, checkpoints/, summary.json).
        resume: continue the run in ``out_dir`` from its latest checkpoint. A run already at or
            past ``train.steps`` is left untouched (``nothing_to_do`` is set).
        overwrite: start over in a directory that already holds a run.
        explicit: the ``section.field`` names the user set explicitly (for ``resume``).
        data: preloaded data (tests); by default loaded from ``config.data``.
    """
    # --- setup: processes, run directory, configuration ---
    command_start = time.perf_counter()  # train.time_limit counts from here, data loading included
    out_dir = Path(out_dir)
    procs, device = init_processes(config.train.device)
    say = log if procs.is_main else (lambda message: None)
    config, found = open_run(out_dir, config, SPEC, resume=resume, overwrite=overwrite, explicit=explicit,
                             procs=procs, say=say)
    if (done := nothing_to_do(out_dir, found, config.train.steps, say)) is not None:
        return done
    config = _resolve_bf16(config, device)
    cfg = config.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % procs.world_size:
        raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by the {procs.world_size} processes")
    local_batch = cfg.batch_size // procs.world_size

    # --- data, model, optimizer, diffusion ---
    autoencoder = load_autoencoder(config.data.autoencoder, device) if config.data.autoencoder else None
    cache = Path(config.data.cache).expanduser() if config.data.cache else out_dir / "cache"
    data, config = _training_data(config, data, autoencoder, progress and procs.is_main, cache)
    say(f"data: {data.describe()}")
    state = build_state(config, device, procs, run_tokenizer(config, data, found))
    condition, prompts = _conditions(config, state, data, device, progress and procs.is_main, cache)
    diffusion = config.diffusion.build()
    if found is not None:
        restore(state, *found, config, procs, say)
    record_config(out_dir, config, procs, say)
    say(f"model: {num_parameters(state.model):,} parameters; device {device}, "
        f"{'bfloat16 autocast' if cfg.bf16 else 'float32'}; {procs.world_size} process(es), "
        f"{local_batch} images each per step")
    train_model = _compiled_and_distributed(state.model, cfg.compile, procs, device)
    metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.tensorboard else None,
                         keep_until=state.step if resume else None) if procs.is_main else None
    batches = _batches(data, config, local_batch, state.step, procs, found)
    place, skipped = _stream_bookkeeping(data, batches)

    def step(batch: Batch) -> StepOutcome:
        return train_step(state, train_model, diffusion, batch, condition, config, device, procs, cfg.bf16)

    def grid(step: int) -> Path | None:
        if not procs.is_main:
            return None
        path = out_dir / "samples" / f"step_{step:08d}.png"
        return _preview(state.ema, diffusion, config, data, device, path, autoencoder, prompts)

    def finish() -> dict[str, Any]:
        sync = {"ranks_max_param_diff": _ranks_max_param_diff(state.model, procs)} if cfg.check_sync else {}
        return {**sync, **skipped()}

    # --- the loop ---
    state.model.train()
    hooks = Hooks(step, lambda step: save_checkpoint(state, step, out_dir, config, procs, place(step)), grid, finish,
                  log_extra=lambda: {"lr": state.optimizer.param_groups[0]["lr"], **skipped()})
    return train_loop(state, batches, hooks, cfg, out_dir, procs=procs, metrics=metrics, command_start=command_start,
                      progress=progress, desc="train", say=say)


def run_tokenizer(config: RunConfig, data: ImageData | LatentData,
                  found: tuple[Path, checkpoints.TrainingCheckpoint] | None) -> WordTokenizer | None:
    """The word tokenizer of a run that trains its text encoder: the checkpoint's when resuming (the
    vocabulary the weights were trained on), else one built from the training captions; else None."""
    if config.text is None:
        return None
    if found is not None and "tokenizer" in found[1].meta:
        return WordTokenizer(found[1].meta["tokenizer"])
    return WordTokenizer.from_captions(_captions(data))


def _captions(data: ImageData | LatentData | VideoData) -> list[str]:
    images = data.data if isinstance(data, LatentData) else data
    return getattr(images, "captions", None) or []


def _conditions(config: RunConfig, state: TrainState, data: TrainingImages | LatentData, device: torch.device,
                progress: bool, cache: Path) -> tuple[TrainingCondition, TextPrompts | None]:
    """What the run trains on besides the images, and for a text-to-image run what its previews ask
    for: the captions tokenized once (its own encoder) or embedded once (a frozen one); for streamed
    data into ``cache``, memory-mapped."""
    if isinstance(config.model, VideoUNetConfig):
        return video_training_condition(config, config.data.image_frames), None
    if not config.text_conditional:
        return training_condition(config), None
    frozen = None if config.text is not None else frozen_text_encoder(config, state.model, device)
    prompts = prompts_of(state.ema, frozen)
    images = data.data if isinstance(data, LatentData) else data
    captions = Captions(_captions(data), prompts.encoder, config.train.label_dropout, prompts.pooled,
                        progress=progress, cache=None if isinstance(images, ImageData) else cache)
    return captions, prompts


def _compiled_and_distributed(model: nn.Module, compile: bool, procs: Processes, device: torch.device) -> nn.Module:
    """The module the training step calls: ``model``, compiled if asked, wrapped in DDP on several processes."""
    if compile:
        model = torch.compile(model)
    if procs.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _resolve_bf16(config: RunConfig, device: torch.device) -> RunConfig:
    """The configuration with ``train.bf16`` decided for this device (auto → the measured default)."""
    bf16 = resolve_bf16(config.train.bf16, device)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, bf16=bf16))


def _training_data(config: RunConfig, data: TrainingImages | None, autoencoder: AutoencoderKL | None,
                   progress: bool, cache: Path) -> tuple[TrainingImages | LatentData, RunConfig]:
    """The training images (in memory, or streamed: :mod:`ddpm.sources` picks), or their latents encoded
    once (streamed ones into ``cache``), and the configuration with the data's class count for
    ``class_cond``."""
    cfg = config.train
    if data is None:
        data = _load(config, autoencoder, progress)
    if config.text_conditional and data.captions is None:
        raise UserError(f"--data {config.data.source} has no captions: a text-to-image run trains on a folder with a "
                        "metadata.jsonl (file_name and text on each line)")
    if cfg.class_cond:
        if data.num_classes == 0:
            raise UserError(f"--train.class_cond needs labels, but {config.data.source} has none")
        if config.model.num_classes not in (0, data.num_classes):
            raise UserError(f"model.num_classes {config.model.num_classes} != the data's {data.num_classes} classes")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=data.num_classes))
    if len(data) < cfg.batch_size:
        raise UserError(f"{config.data.source} has {len(data)} images, fewer than train.batch_size {cfg.batch_size}")
    if autoencoder is not None:
        return LatentData(data, autoencoder, config.data.flip, progress=progress,
                          cache=None if isinstance(data, ImageData) else cache), config
    return data, config


def _stream_bookkeeping(data: Any, batches: Iterator[Batch]) -> tuple[Callable[[int], Any], Callable[[], dict]]:
    """A shard stream's place after a step (which its checkpoint saves; None for other sources), and what
    a stream could not read (``data_skipped``, in every metrics line and the summary; nothing for others)."""
    def place(step: int) -> Any:  # never None for a shard stream: every rank must join the gathering
        return (batches.state_at(step) or {}) if isinstance(data, ShardStream) else None

    def skipped() -> dict[str, int]:
        return {"data_skipped": batches.skipped} if isinstance(batches, StreamedBatches) else {}

    return place, skipped


def _batches(data: TrainingImages | LatentData | VideoData, config: RunConfig, local_batch: int, start_step: int,
             procs: Processes, found: tuple[Path, checkpoints.TrainingCheckpoint] | None) -> Iterator[Batch]:
    """This rank's batches from ``start_step`` on. Latent runs: scaled latents, flipped in pixel space
    before encoding; video runs: clips with their independent image frames appended; a shard stream: from
    its place saved in the checkpoint."""
    kwargs: dict[str, Any] = {"flip": config.data.flip, "rank": procs.rank, "world_size": procs.world_size,
                              "start_step": start_step}
    if isinstance(data, VideoData):
        kwargs["image_frames"] = config.data.image_frames
    if isinstance(data, ShardStream):
        places = found[1].meta.get("data_state") if found is not None else None
        kwargs["state"] = places[procs.rank] if places and procs.rank < len(places) else None
    return data.batches(local_batch, config.train.seed, **kwargs)


def _load(config: RunConfig, autoencoder: AutoencoderKL | None, progress: bool) -> TrainingImages | VideoData:
    """The run's images at its network's size (through the autoencoder: the pixels its latents decode
    to; in memory or streamed, as :mod:`ddpm.sources` picks), or its clips for a video network."""
    d = config.data
    if isinstance(config.model, VideoUNetConfig):  # (a video U-Net's config is also a U-Net's)
        if autoencoder is not None:
            raise UserError("a video model trains on pixels: drop --autoencoder")
        m = config.model
        return load_videos(d.source, frames=m.frames, size=m.image_size, channels=m.in_channels, split=d.split,
                           limit=d.limit or None, progress=progress)
    channels, *size = config.model.sample_shape
    if autoencoder is not None and getattr(config.model, "low_res_channels", 0):
        raise UserError("a super-resolution stage trains on pixels: drop --autoencoder")
    if autoencoder is not None:
        size = pixel_size(config.model.sample_shape, autoencoder.config, d.autoencoder)
        channels = autoencoder.config.in_channels
    elif channels not in (1, 3):
        raise UserError(f"model.in_channels {channels} is not an image's (1 or 3): a latent model needs "
                        "--autoencoder PATH")
    return open_training_images(d, tuple(size), channels, need_captions=config.text_conditional, progress=progress)


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
