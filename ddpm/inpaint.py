"""Inpainting with a model trained for nothing else: RePaint and the replacement method.

The mask is diffusers' (``RePaintPipeline``, ``RePaintScheduler.step``): 1 keeps a pixel (known), 0 has it
generated; a mask image is read as grey and thresholded at half (>= 128 keeps), as diffusers'
``_preprocess_mask``. (diffusers' Stable Diffusion inpainting pipelines use the opposite, white = repaint.)

**Replacement** (Song et al. 2021, appendix I.2, and before them Sohl-Dickstein et al. 2015): after every
step of any sampler, the known pixels of x are replaced by a fresh draw of q(x_t | x_0) at the step's
timestep, and at the end by x_0 itself. The unknown pixels are never told how the known ones were
drawn, so they follow p(x_u) near the boundary rather than p(x_u | x_k): the method is biased
(Ho et al. 2022, "Video Diffusion Models", section 3.1, derive the missing gradient term).

**RePaint** (Lugmayr et al. 2022, Algorithm 1 with the jumps of their section 4.2): the same combination
after each DDPM ancestral step, x_{t−1} = m ⊙ x^known_{t−1} + (1 − m) ⊙ x^unknown_{t−1} with
x^known_{t−1} = √ᾱ_{t−1} x_0 + √(1 − ᾱ_{t−1}) ε (the paper's Algorithm 1 prints (1 − ᾱ_{t−1}) ε, a typo:
q(x_{t−1} | x_0) has standard deviation √(1 − ᾱ_{t−1}), as its code and diffusers use), but the chain
goes back up every ``jump_length`` steps, by ``jump_length`` steps through q(x_{t+j} | x_t), and down
again, ``resamples`` times in all: the unknown pixels get time to harmonise with the known ones. On a
chain of K kept steps this costs K + ⌊(K − 1)/j⌋·(r − 1)·j network evaluations (:func:`repaint_nfe`):
2,410 for the paper's K = 250, j = 10, r = 10.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion, Model
from ddpm.errors import UserError
from ddpm.generate import Conditioning, SamplerSettings, Samples, generate
from ddpm.images import PathLike, as_float_images, read_image, read_images
from ddpm.img2img import check_images, pixel_shape, to_model_space
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.samplers import DEFAULT_SAMPLER, AfterStep, Generators, chain_timesteps, ddpm_step, heard, randn

#: RePaint's defaults (Lugmayr et al. 2022, section 5): T = 250 kept steps, jumps of 10, 10 resamplings.
REPAINT_STEPS = 250
JUMP_LENGTH = 10
RESAMPLES = 10
METHODS = ("repaint", "replacement")
_NOT_DDPM = ("RePaint's reverse steps are DDPM's ancestral ones: use --sampler ddpm (or --method replacement for "
             "another sampler)")


# ---------------------------------------------------------------------------- masks


def read_mask(path: PathLike) -> Tensor:
    """A mask image as float ``[1, 1, H, W]``: 1 keeps a pixel, 0 generates it (grey >= 128 keeps, as diffusers)."""
    grey = read_image(path).float().mean(0, keepdim=True)  # a colour mask: its mean grey
    return (grey >= 127.5).float()[None]


def check_mask(mask: Tensor, images: Tensor, what: str = "--mask") -> None:
    """:class:`UserError` unless ``mask`` [1 or N, 1, H, W] fits ``images`` [N, C, H, W] and has both kinds."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, len(images)):
        raise UserError(f"{what}: expected one mask [1, 1, H, W] or one per image, got {list(mask.shape)}")
    if mask.shape[2:] != images.shape[2:]:
        raise UserError(f"{what} is {mask.shape[3]}x{mask.shape[2]} but the image is "
                        f"{images.shape[3]}x{images.shape[2]}: they must have one size")
    if bool((mask >= 0.5).all()):
        raise UserError(f"{what} keeps every pixel (all white): there is nothing to inpaint (0 = generate)")
    if bool((mask < 0.5).all()):
        raise UserError(f"{what} keeps no pixel (all black): that is sampling, 'ddpm sample' (1 = keep)")


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask [N, 1, H, W] at a latent model's size: a latent is known only if all its f×f pixels are."""
    return -F.max_pool2d(-mask, factor) if factor > 1 else mask


# ---------------------------------------------------------------------------- RePaint


def repaint_schedule(steps: int, jump_length: int = JUMP_LENGTH, resamples: int = RESAMPLES) -> list[int]:
    """The kept steps RePaint's chain visits, from K − 1 (x_T) to −1 (the data), jumps included.

    The reference code's ``get_schedule_jump``: going down, at every kept step j = 0, j, 2j, ... below
    K − j the chain jumps back up j steps, r − 1 times (so a stretch of j steps is walked r times).
    Consecutive entries a > b are a reverse step (a network evaluation), a < b a jump up.
    """
    for name, value in (("steps", steps), ("jump length", jump_length), ("resamples", resamples)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"RePaint's {name} must be an integer >= 1, got {value!r}")
    jumps = {j: resamples - 1 for j in range(0, steps - jump_length, jump_length)}
    t, visited = steps, []
    while t >= 1:
        t -= 1
        visited.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                visited.append(t)
    return [*visited, -1]


def repaint_nfe(steps: int, jump_length: int = JUMP_LENGTH, resamples: int = RESAMPLES) -> int:
    """The network evaluations of :func:`repaint_schedule`: its reverse steps."""
    schedule = repaint_schedule(steps, jump_length, resamples)
    return sum(b < a for a, b in zip(schedule, schedule[1:]))


@torch.no_grad()
def repaint_chain(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    known: Tensor,
    mask: Tensor,
    steps: int | None = None,
    spacing: str | None = None,
    jump_length: int = JUMP_LENGTH,
    resamples: int = RESAMPLES,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **sampler: Any,
) -> Tensor:
    """RePaint's Algorithm 1 with jumps (the module docstring) on ``steps`` kept steps of ``diffusion``.

    ``known`` is x_0 [*shape] (only its ``mask`` = 1 part is read), ``mask`` broadcasts against it. The
    reverse steps are DDPM's ancestral ones ([DDPM] Algorithm 2, the model's variance) on the respaced
    chain, ``spacing`` (default ``uniform``) choosing its steps; the jumps draw q(x_b | x_a) =
    N(√(ᾱ_b/ᾱ_a) x_a, (1 − ᾱ_b/ᾱ_a) I) in one go. Draws come from ``generator`` (one per sample for
    per-image draws): x_T, then per reverse step the unknown part's z and the known part's ε. ``sampler``
    takes what :func:`ddpm.samplers.sample` would (only ``sampler="ddpm"`` and ``eta=0`` make sense here).
    ``callback`` hears each reverse step as :func:`ddpm.samplers.sample`'s does (:func:`ddpm.samplers.heard`,
    ``"step"`` counting the reverse steps so far) with ``"reverse_steps"``, how many the chain takes in all
    (the jumps send ``"k"`` back up); an exception it raises stops the chain.
    """
    if sampler.get("sampler", "ddpm") != "ddpm" or sampler.get("eta", 0.0) or sampler.get("return_trajectory"):
        raise UserError(_NOT_DDPM)
    kept = chain_timesteps(diffusion, "ddpm", steps, spacing)
    d = diffusion if kept == list(range(diffusion.num_timesteps)) else diffusion.respace(kept)
    x = randn(shape, generator, device, dtype) if noise is None else noise.to(device or noise.device, dtype)
    known, mask = known.to(x.device, x.dtype), mask.to(x.device, x.dtype)
    schedule = repaint_schedule(d.num_timesteps, jump_length, resamples)
    pairs, n = list(zip(schedule, schedule[1:])), 0
    reverse_steps = sum(b < a for a, b in pairs)
    for a, b in tqdm(pairs, desc="RePaint", unit="step", disable=not progress, leave=False):
        ta = torch.full((x.shape[0],), a, device=x.device, dtype=torch.long)
        if b > a:  # jump up: q(x_b | x_a) of the respaced forward process
            ratio = d.coef("alphas_cumprod", ta + (b - a), x) / d.coef("alphas_cumprod", ta, x)
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * randn(x.shape, generator, x.device, x.dtype)
            continue
        p = d.p_mean_variance(model, x, ta, clip_denoised, model_kwargs, dynamic_threshold)
        if callback is not None:
            callback({**heard(d, n, a, x, p["pred_x0"]), "reverse_steps": reverse_steps})
        n += 1
        # z for the unknown part, then ε for the known (Algorithm 1 lists ε first; the order is the
        # replacement method's, so that one resample draws exactly what replacement with DDPM does).
        z = randn(x.shape, generator, x.device, x.dtype) if b >= 0 else torch.zeros_like(x)
        unknown = ddpm_step(d, p, x, ta, z, 0.0)
        known_b = d.q_sample(known, ta - 1, randn(x.shape, generator, x.device, x.dtype)) if b >= 0 else known
        x = mask * known_b + (1 - mask) * unknown  # known: √ᾱ_b x_0 + √(1 − ᾱ_b) ε at b = a − 1
    return x


# ---------------------------------------------------------------------------- replacement


def replacement_step(diffusion: GaussianDiffusion, known: Tensor, mask: Tensor, generator: Generators) -> AfterStep:
    """The replacement method as an ``after_step`` of :func:`ddpm.samplers.sample`: x's known part becomes
    a fresh draw of q(x_t | x_0 = ``known``) at the step's original timestep t (x_0 itself at the end)."""

    def after_step(x: Tensor, t: int) -> Tensor:
        part = known.to(x.device, x.dtype)
        if t >= 0:
            noise = randn(x.shape, generator, x.device, x.dtype)
            part = diffusion.q_sample(part, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), noise)
        m = mask.to(x.device, x.dtype)
        return m * part + (1 - m) * x

    return after_step


# ---------------------------------------------------------------------------- images


def inpaint(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: Tensor,
    mask: Tensor,
    method: str = "repaint",
    settings: SamplerSettings | None = None,
    *,
    jump_length: int = JUMP_LENGTH,
    resamples: int = RESAMPLES,
    num_samples: int = 1,
    seed: int = 0,
    label: int | None = None,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    conditioning: Conditioning | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
    progress: bool = True,
    autoencoder: AutoencoderKL | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Samples:
    """Fill in the ``mask`` = 0 pixels of ``images`` [N, C, H, W] (uint8 or [-1, 1]); ``mask`` [1 or N, 1, H, W].

    ``method`` is ``"repaint"`` (``settings.steps`` kept DDPM steps, default :data:`REPAINT_STEPS`, with
    ``jump_length`` and ``resamples``) or ``"replacement"`` (any sampler of ``settings``). ``num_samples``
    completions of each image, image i's j-th at place i·num_samples + j. A latent model inpaints the
    latents with the mask shrunk (:func:`latent_mask`) and the known pixels are put back after decoding.
    ``label``, ``guidance_scale``, ``prompts``, ``negative_prompt`` and ``conditioning`` (a text-conditional
    model's), and ``callback`` (each step and batch): as :func:`ddpm.generate.generate` takes them.
    The :class:`Samples`' ``nfe`` is what the method spent per image.
    """
    if method not in METHODS:
        raise UserError(f"unknown inpainting method {method!r}; choose one of {', '.join(METHODS)}")
    check_images(images, pixel_shape(model, autoencoder))
    check_mask(mask, images)
    mask = mask.float().expand(len(images), -1, -1, -1) if len(mask) == 1 else mask.float()
    settings = settings or SamplerSettings("ddpm" if method == "repaint" else DEFAULT_SAMPLER)
    if method == "repaint" and (settings.sampler != "ddpm" or settings.eta):
        raise UserError(_NOT_DDPM)
    if method == "repaint" and settings.steps is None:
        settings = dataclasses.replace(settings, steps=min(REPAINT_STEPS, diffusion.num_timesteps))
    pixels = as_float_images(images).repeat_interleave(num_samples, 0)
    pixel_mask = mask.repeat_interleave(num_samples, 0)
    known = to_model_space(images, autoencoder).repeat_interleave(num_samples, 0)
    factor = autoencoder.config.downsampling_factor if autoencoder is not None else 1
    chain_mask = latent_mask(pixel_mask, factor)

    def prepare(first: int, n: int, generators: list[torch.Generator], where: torch.device) -> dict[str, Any]:
        part, m = known[first:first + n].to(where), chain_mask[first:first + n].to(where)
        if method == "repaint":
            return {"known": part, "mask": m}
        return {"after_step": replacement_step(diffusion, part, m, generators)}

    chain = partial(repaint_chain, diffusion, jump_length=jump_length, resamples=resamples) \
        if method == "repaint" else None
    samples = generate(model, diffusion, len(known), settings, seed=seed, label=label, guidance_scale=guidance_scale,
                       prompts=prompts, negative_prompt=negative_prompt, conditioning=conditioning,
                       batch_size=batch_size, device=device, bf16=bf16, progress=progress, autoencoder=autoencoder,
                       prepare=prepare, chain=chain, callback=callback)
    if autoencoder is not None:  # the decoder's known pixels are near the image's; the image's own are exact
        samples.images = pixel_mask * pixels + (1 - pixel_mask) * samples.images
    return samples


def masked_preview(images: Tensor, mask: Tensor) -> Tensor:
    """``images`` with the pixels to generate shown grey, for the picture of the inputs."""
    return as_float_images(images) * mask  # 0 is mid-grey in [-1, 1]


def load_inputs(image_paths: Sequence[PathLike], mask_path: PathLike) -> tuple[Tensor, Tensor]:
    """The images (uint8 [N, C, H, W]) and the mask ([1, 1, H, W]) of ``ddpm inpaint``, checked against each other."""
    images = read_images(image_paths)
    mask = read_mask(mask_path)
    check_mask(mask, images, f"--mask {mask_path}")
    return images, mask

