"""Super-resolution diffusion and cascades: SR3 (Saharia et al. 2021) with Imagen's noise-conditioning
augmentation (Saharia et al. 2022, section 2.5), as lucidrains/imagen-pytorch decomposes them.

A cascade draws small images from a base model and enlarges them with a super-resolution model: a
U-Net (:class:`ddpm.models.unet.UNetConfig` with ``low_res_channels`` and ``noise_level_embedding``)
that sees, beside x_t, the low-resolution image upsampled bilinearly, and denoises the high-resolution
image. Its low-resolution input is itself noised, to a level s in [0, 1] of its own schedule
(:func:`augment`): during training s is drawn at random (:class:`SuperResolution`), so that the model
learns to ignore the small defects of a base model's samples; at sampling s is fixed (0.2, as
imagen-pytorch), and s is embedded like a timestep. Training pairs are made from the high-resolution
training images by :func:`degrade`.

The augmentation schedule is imagen-pytorch's continuous ``linear`` one (that of Kingma et al. 2021, the
continuous limit of DDPM's linear betas): log SNR(s) = −log(expm1(1e-4 + 10 s²)), i.e.
ᾱ(s) = exp(−(1e-4 + 10 s²)): at s = 0.2, √ᾱ = 0.82 and σ = 0.57; at s = 1, ᾱ = 4.5e-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.data import Batch
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import Conditioning, SamplerSettings, Samples, generate
from ddpm.images import labelled_rows, save_image
from ddpm.runtime import derive_seed
from ddpm.samplers import Generators, randn

if TYPE_CHECKING:
    from ddpm.conditioning import ClassLabels

#: The augmentation level a super-resolution stage samples at (imagen-pytorch's ``lowres_sample_noise_level``).
SAMPLE_LEVEL = 0.2


@dataclass(frozen=True)
class Cascade:
    """A base model and its super-resolution stage, as U-Net presets (:data:`ddpm.models.presets.PRESETS`).

    ``factor`` is the enlargement: the base draws ``size // factor`` pixels a side, the stage ``size``.
    """

    base: str
    upsampler: str
    factor: int
    size: int


#: The cascades with presets: MNIST 14 -> 28 and CIFAR-10 16 -> 32 (why these sizes: the presets' comments).
CASCADES: dict[str, Cascade] = {
    "mnist": Cascade(base="mnist-14", upsampler="mnist-sr", factor=2, size=28),
    "cifar10": Cascade(base="cifar10-16", upsampler="cifar10-sr", factor=2, size=32),
}


def degrade(x: Tensor, factor: int) -> Tensor:
    """The low-resolution image of ``x`` [B, C, H, W] in [-1, 1]: ``factor`` times smaller a side.

    Antialiased bicubic downsampling, the filter of the data loader's (Pillow's) resize, to within
    one or two of 255 levels; so the pairs an upsampler trains on look like what a base model trained
    on resized images draws. H and W must be divisible by ``factor``.
    """
    if not (isinstance(factor, int) and factor >= 1):
        raise UserError(f"the super-resolution factor must be an integer >= 1, got {factor!r}")
    if x.ndim != 4 or x.shape[2] % factor or x.shape[3] % factor:
        raise UserError(f"images {tuple(x.shape)} cannot be made {factor} times smaller: H and W must be divisible "
                        f"by {factor}")
    if factor == 1:
        return x
    size = (x.shape[2] // factor, x.shape[3] // factor)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1.0, 1.0)


def augmentation_alphas_cumprod(level: Tensor) -> Tensor:
    """ᾱ(s) = exp(−(1e-4 + 10 s²)) of the augmentation schedule at levels s in [0, 1] (the module docstring)."""
    return torch.exp(-(1e-4 + 10.0 * level.double() ** 2))


def augment(low_res: Tensor, level: Tensor | float, generator: Generators = None,
            noise: Tensor | None = None) -> Tensor:
    """Imagen's noise-conditioning augmentation: ``low_res`` [B, ...] q-sampled to level s in [0, 1].

    z = √ᾱ(s) x + √(1 − ᾱ(s)) ε, the forward process of :func:`augmentation_alphas_cumprod`'s schedule
    (DDPM eq. 4 in continuous time). ``level`` is a scalar or one per sample [B]; ε is ``noise`` or drawn
    from ``generator`` (one per sample for per-image draws, :func:`ddpm.samplers.randn`).
    """
    level = torch.as_tensor(level, dtype=torch.float64, device=low_res.device)
    if not bool(((level >= 0) & (level <= 1)).all()):
        raise UserError(f"the augmentation level must lie in [0, 1], got {level.tolist()}")
    if noise is None:
        noise = randn(low_res.shape, generator, low_res.device, low_res.dtype)
    acp = augmentation_alphas_cumprod(level.expand(low_res.shape[0])).reshape(-1, *[1] * (low_res.ndim - 1))
    return (acp.sqrt() * low_res + (1 - acp).sqrt() * noise).to(low_res.dtype)


@dataclass(frozen=True)
class SuperResolution:
    """The training condition of a super-resolution stage (a :class:`ddpm.conditioning.TrainingCondition`).

    The batch's images are the targets; the model gets their :func:`degrade` d version, augmented to a
    level s drawn uniformly from [0, ``max_level``] per image (Imagen trains on random levels), and s:
    ``{"low_res": [B, C, H/f, W/f], "noise_level": [B]}``, with the class labels of ``labels`` (their
    dropout for guidance) for a class-conditional stage. Every draw comes from ``generator``.
    """

    factor: int = 2
    max_level: float = 1.0
    labels: ClassLabels | None = None

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        x = batch.x.float().cpu()  # the draws are on the condition's CPU generator, so the work is there too
        low_res = degrade(x, self.factor)
        level = torch.rand(len(x), generator=generator, dtype=torch.float64) * self.max_level
        noise = torch.randn(low_res.shape, generator=generator)
        kwargs = {"low_res": augment(low_res, level, noise=noise).to(device), "noise_level": level.float().to(device)}
        return {**kwargs, **(self.labels(batch, generator, device) if self.labels is not None else {})}


def upsample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    low_res: Tensor,
    settings: SamplerSettings | None = None,
    level: float = SAMPLE_LEVEL,
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
    conditioning: Conditioning | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
    progress: bool = True,
) -> Samples:
    """Enlarge ``low_res`` [N, C, h, w] (in [-1, 1]) with a super-resolution ``model`` under ``diffusion``.

    Each image is augmented to ``level`` (:func:`augment`, its noise from the image's own generator, then
    its x_T) and the model samples the high-resolution image at its ``sample_shape`` given it. ``labels``
    [N] are the class of each image for a class-conditional stage (e.g. the base stage's), with
    ``guidance_scale`` for classifier-free guidance. ``prompts`` / ``conditioning``: a text-conditional
    stage's, passed to :func:`ddpm.generate.generate` (no text-conditional U-Net takes ``low_res`` yet). A
    stage trained without augmentation (no ``noise_level_embedding``) sees the images as they are.
    """
    channels = check_upsampler(model)
    if low_res.ndim != 4 or low_res.shape[1] != channels:
        raise UserError(f"the super-resolution model takes {channels}-channel low-resolution images, got "
                        f"{list(low_res.shape)}")
    if not 0.0 <= level <= 1.0:
        raise UserError(f"--noise-level must lie in [0, 1], got {level}")
    with_level = model.config.noise_level_embedding

    def prepare(first: int, n: int, generators: list[torch.Generator], where: torch.device) -> dict[str, Any]:
        part = low_res[first:first + n].to(where, torch.float32)
        kwargs: dict[str, Any] = {"low_res": augment(part, level, generators) if with_level else part}
        if with_level:
            kwargs["noise_level"] = torch.full((n,), float(level), device=where)
        if labels is not None and model.num_classes:
            kwargs["y"] = labels[first:first + n].to(where)
        return {"model_kwargs": kwargs}

    samples = generate(model, diffusion, len(low_res), settings, seed=seed, guidance_scale=guidance_scale,
                       prompts=prompts, conditioning=conditioning, batch_size=batch_size, device=device, bf16=bf16,
                       progress=progress, prepare=prepare)
    if labels is not None and model.num_classes:
        samples.labels = labels.cpu().clone()
    return samples


def cascade(
    base: Any,
    upsampler: Any,
    num_images: int,
    base_settings: SamplerSettings | None = None,
    upsampler_settings: SamplerSettings | None = None,
    level: float = SAMPLE_LEVEL,
    *,
    seed: int = 0,
    label: int | None = None,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
    progress: bool = True,
) -> tuple[Samples, Samples]:
    """Draw ``num_images`` from a cascade: the ``base`` model's images (a :class:`ddpm.loading.LoadedModel`,
    pixel or latent), enlarged by ``upsampler`` (a pixel super-resolution LoadedModel). Returns both
    stages' :class:`Samples`. A class ``label`` (or the classes in turn) and ``guidance_scale`` go to each
    stage that is class-conditional, ``prompts`` to a text-conditional base (its ``conditioning``; no
    super-resolution stage reads text yet); the stage's draws are seeded apart from the base's.
    """
    if upsampler.autoencoder is not None:
        raise UserError("the upsampler is a latent model; a super-resolution stage works on pixels")
    check_upsampler(upsampler.model)
    _check_sizes(base.image_shape, upsampler.model)
    if base.num_classes and upsampler.num_classes and base.num_classes != upsampler.num_classes:
        raise UserError(f"the base model has {base.num_classes} classes, the upsampler {upsampler.num_classes}")
    conditional_base = base.num_classes or base.conditioning is not None
    small = generate(base.model, base.diffusion.build(), num_images, base_settings, seed=seed, label=label,
                     guidance_scale=guidance_scale if conditional_base else None, prompts=prompts,
                     negative_prompt=negative_prompt, conditioning=base.conditioning, batch_size=batch_size,
                     device=device, bf16=bf16, progress=progress, autoencoder=base.autoencoder)
    if label is not None and not base.num_classes and upsampler.num_classes:
        small.labels = torch.full((num_images,), label)
    large = upsample(upsampler.model, upsampler.diffusion.build(), small.images, upsampler_settings, level,
                     seed=derive_seed(seed, 1), labels=small.labels if upsampler.num_classes else None,
                     guidance_scale=guidance_scale if upsampler.num_classes else None, batch_size=batch_size,
                     device=device, bf16=bf16, progress=progress)
    return small, large


def check_upsampler(model: nn.Module) -> int:
    """The low-resolution channels of a super-resolution ``model``; :class:`UserError` if it takes none."""
    channels = getattr(getattr(model, "config", None), "low_res_channels", 0)
    if not channels:
        raise UserError("--upsampler needs a super-resolution model (a U-Net with low_res_channels); this one takes "
                        "no low-resolution image")
    return channels


def _check_sizes(low_res: Sequence[int], model: nn.Module) -> None:
    """A base model's images ``(C, h, w)`` must be smaller than the upsampler's, by a whole factor."""
    channels, height, width = model.sample_shape
    c, h, w = low_res
    if c != model.config.low_res_channels or height % h or width % w or h >= height:
        raise UserError(f"the base model draws {h}x{w}x{c} images; the upsampler enlarges "
                        f"{model.config.low_res_channels}-channel images to {height}x{width} by a whole factor")
    if not math.isclose(height / h, width / w):
        raise UserError(f"the base model's {h}x{w} images and the upsampler's {height}x{width} differ in aspect")


@torch.no_grad()
def superres_preview(ema: nn.Module, diffusion: GaussianDiffusion, config: Any, images: Tensor, labels: Tensor,
                     device: torch.device, bf16: bool, path: Any) -> Any:
    """A training run's preview of a super-resolution stage: training ``images`` [N, C, H, W] shrunk by
    ``train.low_res_factor`` (top row, enlarged for the eye), what the EMA stage makes of them at the
    sampling level, and the originals (bottom row)."""
    cfg = config.train
    low_res = degrade(images, cfg.low_res_factor)
    samples = upsample(ema, diffusion, low_res, SamplerSettings(cfg.sample_sampler, cfg.sample_steps), seed=cfg.seed,
                       labels=labels if ema.num_classes else None, batch_size=len(images), device=device, bf16=bf16,
                       progress=False)
    shown = F.interpolate(low_res, size=images.shape[-2:], mode="nearest")
    return save_image(labelled_rows([(shown, "input"), (samples.images, "stage"), (images, "original")]), path)
