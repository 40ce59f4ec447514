"""Images into a model, and SDEdit (Meng et al. 2022): diffusers' img2img.

What the image-to-image methods share (:mod:`ddpm.inpaint`, :mod:`ddpm.inversion`, :mod:`ddpm.superres`):
checking a user's images against the model (:func:`check_images`), taking them to the space the chain
runs in (pixels, or a latent model's scaled latents: :func:`to_model_space`), and writing what came out
beside what went in (:func:`write_results`).

SDEdit noises an image part-way up the forward process and runs the reverse process from there: with a
sampler's N kept timesteps t_{N−1} > ... > t_0 and strength S in [0, 1], n = int(N·S) of them are run,
starting from x_{t_{n−1}} = √ᾱ x_0 + √(1 − ᾱ) ε (diffusers' ``strength``: its
``get_timesteps`` keeps the last int(N·S) of ``scheduler.timesteps`` and noises the image to the first
of them with ``add_noise``). S = 0 runs nothing and returns the image; S = 1 runs the whole chain from
x at its first kept step, where (for every spacing that starts at T) only √ᾱ_T x_0 of the image is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import Conditioning, SamplerSettings, Samples, generate
from ddpm.images import as_float_images, labelled_rows, save_image, save_pngs
from ddpm.latent import encode_images
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.samplers import chain_timesteps, randn


def check_image_model(shape: Sequence[int], what: str = "the model") -> None:
    """:class:`UserError` unless a model's sample ``shape`` is an image's ``(C, H, W)`` (not a video's)."""
    if len(shape) != 3:
        raise UserError(f"{what} draws {'x'.join(map(str, shape))} samples, not images (a video model?); the "
                        "image-to-image methods take image models")


def check_images(images: Tensor, shape: Sequence[int], what: str = "--image") -> None:
    """:class:`UserError` unless ``images`` [N, C, H, W] have the model's image shape ``(C, H, W)``."""
    check_image_model(shape)
    channels, height, width = shape
    kind = {1: "grey", 3: "colour (RGB)"}
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f"{what}: expected images [N, C, H, W], got {list(images.shape)}")
    c, h, w = images.shape[1:]
    if c != channels:
        raise UserError(f"{what} is a {kind.get(c, f'{c}-channel')} image; the model draws "
                        f"{kind.get(channels, f'{channels}-channel')} {width}x{height} images")
    if (h, w) != (height, width):
        raise UserError(f"{what} is {w}x{h}; the model draws {width}x{height} images: resize it to {width}x{height}")


def to_model_space(images: Tensor, autoencoder: AutoencoderKL | None) -> Tensor:
    """Images (uint8, or floats in [-1, 1]) as the chain's x_0: float pixels, or a latent model's
    scaled latents (:func:`ddpm.latent.encode_images`), on the CPU."""
    pixels = as_float_images(images)
    return pixels if autoencoder is None else encode_images(autoencoder, pixels).cpu()


def check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength must lie in [0, 1] (0 keeps the image, 1 ignores it), got {strength!r}")


def strength_timesteps(diffusion: GaussianDiffusion, settings: SamplerSettings, strength: float) -> list[int]:
    """The kept timesteps SDEdit runs at ``strength``: the last int(N·S) of the sampler's N (ascending)."""
    check_strength(strength)
    if settings.sampler == "dpm-adaptive":
        raise UserError("img2img runs part of a fixed chain; dpm-adaptive picks its own steps: choose another sampler")
    kept = chain_timesteps(diffusion, settings.sampler, settings.steps, settings.spacing, settings.timesteps,
                           settings.final_step)
    return kept[: int(len(kept) * strength)]


def img2img(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: Tensor,
    strength: float,
    settings: SamplerSettings | None = None,
    *,
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
    """SDEdit (the module docstring): ``num_samples`` edits of each of ``images`` [N, C, H, W] (uint8 or
    [-1, 1]) at ``strength``, image i's edit j at place i·num_samples + j (seeded by that place).

    Any sampler with a fixed chain; a class ``label``, or ``prompts``, ``negative_prompt`` and ``conditioning``
    (a text-conditional model's), ``guidance_scale`` and ``callback`` (each step and batch), as
    :func:`ddpm.generate.generate` takes them. A latent model (``autoencoder``) edits the image's latents.
    At strength 0 the images come back as they are (0 network evaluations, and nothing for ``callback``).
    """
    settings = settings or SamplerSettings()
    check_images(images, pixel_shape(model, autoencoder))
    kept = strength_timesteps(diffusion, settings, strength)
    pixels = as_float_images(images).repeat_interleave(num_samples, 0)
    if not kept:
        return Samples(pixels.clamp(-1, 1), torch.full((len(pixels),), -1 if label is None else label), 0.0)
    x0 = to_model_space(images, autoencoder).repeat_interleave(num_samples, 0)
    start = torch.full((1,), kept[-1], dtype=torch.long)

    def prepare(first: int, n: int, generators: list[torch.Generator], where: torch.device) -> dict[str, Any]:
        part = x0[first:first + n].to(where)
        noise = randn(part.shape, generators, where, part.dtype)
        return {"noise": diffusion.q_sample(part, start.expand(n).to(where), noise), "timesteps": kept}

    return generate(model, diffusion, len(x0), settings, seed=seed, label=label, guidance_scale=guidance_scale,
                    prompts=prompts, negative_prompt=negative_prompt, conditioning=conditioning,
                    batch_size=batch_size, device=device, bf16=bf16, progress=progress, autoencoder=autoencoder,
                    prepare=prepare, callback=callback)


def pixel_shape(model: nn.Module, autoencoder: AutoencoderKL | None) -> tuple[int, ...]:
    """``(C, H, W)`` of the images the model draws (through the autoencoder for a latent one)."""
    shape = tuple(model.sample_shape)
    if autoencoder is None:
        return shape
    f = autoencoder.config.downsampling_factor
    return (autoencoder.config.out_channels, *(side * f for side in shape[1:]))


def results_grid(inputs: Tensor, outputs: Tensor, num_samples: int = 1,
                 shown: Sequence[tuple[Tensor, str]] = ()) -> Image.Image:
    """The picture of ``grid.png``: a column per input, the input on top, then the rows of ``shown`` (e.g.
    the masked input), then one row per sample."""
    rows = [(inputs, "input"), *shown]
    rows += [(outputs[j::num_samples], f"sample {j + 1}" if num_samples > 1 else "output") for j in range(num_samples)]
    return labelled_rows(rows)


def write_results(out_dir: str | Path, inputs: Tensor, outputs: Tensor, num_samples: int = 1,
                  shown: Sequence[tuple[Tensor, str]] = (), grid: bool = True, pngs: bool = True) -> list[Path]:
    """Write ``grid.png`` (:func:`results_grid`) and every output as ``images/NNNNNN.png``; return the paths."""
    out_dir = Path(out_dir)
    written = [save_image(results_grid(inputs, outputs, num_samples, shown), out_dir / "grid.png")] if grid else []
    return written + (save_pngs(outputs, out_dir / "images") if pngs else [])

