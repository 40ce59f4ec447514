"""Deterministic inversion, an image to its noise and back, and interpolation in noise space.

The probability-flow ODE (Song et al. 2021) is a one-to-one map between x_0 and x_T, and its solvers
can run it either way. Encoding integrates from the data up to the sampler's first kept step t_{K−1}
(x_T; for every spacing but DDIM's ``leading`` it is T): x_0 stands for x at the last kept step t_0
(ᾱ_{t_0} ≈ 1), and each of the K − 1 steps t_k → t_{k+1} is the solver's own update with the step
h = λ_{t_{k+1}} − λ_{t_k} < 0 (λ = log(α/σ)):

- ``ddim``: DDIM's deterministic step (Song et al. 2021, "DDIM", eq. 13 run forward, as section 4.3 and
  appendix D.4 use it for encoding): x_{t_{k+1}} = √ᾱ_{k+1} x̂_0 + √(1 − ᾱ_{k+1}) ε̂, the first-order
  x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂_0;
- ``dpm++2m``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with the same formula and
  D = (1 + 1/(2r)) x̂_0(s) − 1/(2r) x̂_0(s') in place of x̂_0 from the second step on (r = h'/h > 0).

Encoding costs K − 1 network evaluations, decoding (:func:`ddpm.samplers.sample` from that x_T with the
same sampler, steps and spacing) K, and the round trip's error falls as h^p, p the solver's order
(tests/test_math_inversion.py on the exact Gaussian model).

Interpolation (DDIM appendix D.5) decodes the spherical interpolation of two noises, slerp(x_a, x_b, α)
= sin((1 − α)θ)/sin θ · x_a + sin(αθ)/sin θ · x_b with θ = arccos(⟨x_a, x_b⟩ / (‖x_a‖ ‖x_b‖)): for
Gaussian noise of high dimension, θ ≈ 90° and the norm stays the √d that a draw of N(0, I) has, which
the straight line between them would shrink by up to √2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.checkpoints import atomic_write
from ddpm.diffusion import GaussianDiffusion, Model
from ddpm.errors import UserError
from ddpm.generate import Condition, Conditioning, SamplerSettings, Samples, generate, grid_image
from ddpm.images import PathLike, as_float_images, auto_scale, make_grid, save_gif, save_image
from ddpm.img2img import check_images, pixel_shape, to_model_space
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.runtime import autocast, resolve_bf16
from ddpm.samplers import Solver, chain_timesteps

#: The solvers that encode: first order (DDIM) and DPM-Solver++(2M).
INVERSION_SAMPLERS = {"ddim": 1, "dpm++2m": 2}
#: The solvers that decode deterministically (with eta 0).
DETERMINISTIC_SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "unipc", "unipc-bh1", "heun")


def check_inversion_settings(settings: SamplerSettings, decode_only: bool = False) -> None:
    """:class:`UserError` unless ``settings`` are a deterministic solver that can (also) encode."""
    allowed = DETERMINISTIC_SAMPLERS if decode_only else tuple(INVERSION_SAMPLERS)
    if settings.sampler not in allowed or settings.eta:
        got = settings.sampler + (f" with eta {settings.eta:g}" if settings.eta else "")
        raise UserError(f"a deterministic map between images and noise needs --sampler {' or '.join(allowed)} "
                        f"(with eta 0), got {got}")
    if settings.final_step != "denoise":
        raise UserError("inversion starts from the images themselves: its chain ends at the data (--final-step "
                        f"denoise), got {settings.final_step}")


@torch.no_grad()
def encode(
    diffusion: GaussianDiffusion,
    model: Model,
    x0: Tensor,
    sampler: str = "ddim",
    steps: int | None = None,
    spacing: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    progress: bool = False,
    timesteps: Sequence[int] | None = None,
) -> Tensor:
    """x_0 [B, ...] -> x at the first kept step of ``sampler``'s chain (the module docstring).

    ``steps``, ``spacing`` (or explicit ``timesteps``) choose the chain exactly as
    :func:`ddpm.samplers.sample` does, so that decoding there with the same arguments goes back.
    """
    if sampler not in INVERSION_SAMPLERS:
        raise UserError(f"inversion encodes with {' or '.join(INVERSION_SAMPLERS)}, not {sampler}")
    kept = sorted(set(int(t) for t in (timesteps or chain_timesteps(diffusion, sampler, steps, spacing))))
    d = diffusion if kept == list(range(diffusion.num_timesteps)) else diffusion.respace(kept)
    at = Solver(d)  # α, σ and λ at the kept steps
    x, previous = x0, None
    for k in tqdm(range(d.num_timesteps - 1), desc=f"{sampler} inversion", unit="step", disable=not progress,
                  leave=False):
        t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x0_hat = d.p_mean_variance(model, x, t, clip_denoised, model_kwargs, dynamic_threshold)["pred_x0"]
        lam_s, lam_t = at.log_snr(k), at.log_snr(k + 1)
        h, (alpha_t, sigma_t) = lam_t - lam_s, at.alpha_sigma(k + 1)
        D = x0_hat
        if INVERSION_SAMPLERS[sampler] == 2 and previous is not None:
            r = (lam_s - previous[0]) / h
            D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * previous[1]  # [DPM++] Algorithm 2
        x = (sigma_t / at.alpha_sigma(k)[1]) * x - alpha_t * math.expm1(-h) * D
        previous = (lam_s, x0_hat)
    return x


@dataclass
class Inversion:
    """What :func:`invert` found: ``latents`` x_T [N, *sample_shape] (float32, CPU), the images decoded
    from them (``reconstruction``), the network evaluations of encoding per image, and the
    per-dimension MSE of the reconstruction to the image on [0, 1]."""

    latents: Tensor
    reconstruction: Samples
    encode_nfe: int
    mse: float


def invert(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: Tensor,
    settings: SamplerSettings | None = None,
    *,
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
) -> Inversion:
    """Encode ``images`` [N, C, H, W] (uint8 or [-1, 1]) to their x_T with ``settings`` (``ddim`` by
    default, or ``dpm++2m``), then decode them back with the same settings. A class ``label`` (or the
    classes in turn), or ``prompts`` (with ``negative_prompt``, ``conditioning``), and ``guidance_scale``
    condition both ways; a latent
    model inverts the image's latents (:func:`ddpm.img2img.to_model_space`)."""
    settings = settings or SamplerSettings("ddim")
    check_inversion_settings(settings)
    settings.check(diffusion.num_timesteps)
    check_images(images, pixel_shape(model, autoencoder))
    condition = Condition(label, prompts, negative_prompt, guidance_scale)
    condition.check(model.num_classes, conditioning)
    if autoencoder is not None and settings.dynamic_threshold is not None:
        raise UserError("--dynamic-threshold is for pixel models: a latent model's x̂_0 has no [-1, 1] range")
    device = torch.device(device)
    x0 = to_model_space(images, autoencoder)
    steps = chain_timesteps(diffusion, settings.sampler, settings.steps, settings.spacing, settings.timesteps)
    latents, was_training = [], model.training
    model.eval()
    try:
        for first in range(0, len(x0), batch_size):
            part = x0[first:first + batch_size].to(device)
            kwargs = condition.batch(first, len(part), model.num_classes, conditioning, device)[0]
            with autocast(device, resolve_bf16(bf16, device)):
                latents.append(encode(diffusion, model, part, settings.sampler, model_kwargs=kwargs,
                                      clip_denoised=settings.clip_denoised and autoencoder is None,
                                      dynamic_threshold=settings.dynamic_threshold, progress=progress,
                                      timesteps=steps).float().cpu())
    finally:
        model.train(was_training)
    z = torch.cat(latents)
    back = generate(model, diffusion, len(z), settings, latents=z, label=label, guidance_scale=guidance_scale,
                    prompts=prompts, negative_prompt=negative_prompt, conditioning=conditioning,
                    batch_size=batch_size, device=device, bf16=bf16, progress=progress, autoencoder=autoencoder)
    mse = (((back.images - as_float_images(images)) / 2) ** 2).mean().item()
    return Inversion(z, back, len(steps) - 1, mse)


def slerp(a: Tensor, b: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between ``a`` and ``b`` (any one shape), DDIM appendix D.5 (module docstring).

    ``alpha`` is a number or a tensor [F] of them (then the result is [F, *a.shape]); 0 gives ``a``, 1 ``b``.
    Nearly parallel vectors (θ < 1e-4) fall back to the straight line, its limit.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    a64, b64 = a.double(), b.double()
    theta = torch.arccos((a64.flatten() @ b64.flatten() / (a64.norm() * b64.norm())).clamp(-1.0, 1.0))
    if theta < 1e-4:
        wa, wb = 1 - alpha, alpha
    else:
        wa, wb = torch.sin((1 - alpha) * theta) / torch.sin(theta), torch.sin(alpha * theta) / torch.sin(theta)
    trailing = [1] * a.ndim
    return (wa.reshape(*wa.shape, *trailing) * a64 + wb.reshape(*wb.shape, *trailing) * b64).to(a.dtype)


def interpolate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    a: Tensor,
    b: Tensor,
    frames: int = 10,
    settings: SamplerSettings | None = None,
    **generate_kwargs: Any,
) -> Samples:
    """The images decoded (:func:`ddpm.generate.generate` with ``latents``) from ``frames`` noises on the
    great circle from x_T ``a`` to ``b`` (each [*sample_shape]), both ends included; ``settings`` must be
    a deterministic solver (``ddim`` by default); ``generate_kwargs`` (label, guidance_scale, device,
    autoencoder, ...) go to ``generate``."""
    settings = settings or SamplerSettings("ddim")
    check_inversion_settings(settings, decode_only=True)
    if not isinstance(frames, int) or frames < 2:
        raise UserError(f"--frames must be an integer >= 2 (both ends), got {frames!r}")
    shape = tuple(model.sample_shape)
    for name, x in (("--a", a), ("--b", b)):
        if tuple(x.shape) != shape:
            raise UserError(f"{name}: the noise is {list(x.shape)}, the model's x_T is {list(shape)}")
    path = slerp(a.float(), b.float(), torch.linspace(0, 1, frames, dtype=torch.float64))
    return generate(model, diffusion, frames, settings, latents=path, **generate_kwargs)


def read_noise(path: PathLike, shape: Sequence[int] | None = None) -> Tensor:
    """x_T from a ``.npy`` (:func:`save_noise`'s [N, *shape] or one [*shape]) as float32 [N, *shape]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a NumPy .npy file ({e})") from e
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path}: not a NumPy .npy file (an .npz archive?); 'ddpm invert' writes latents.npy")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise UserError(f"{path}: expected finite floating-point noise, got {array.dtype}")
    z = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if shape is not None and tuple(z.shape) == tuple(shape):
        z = z[None]
    if shape is not None and tuple(z.shape[1:]) != tuple(shape):
        raise UserError(f"{path} holds noise {list(z.shape)}; the model's x_T is [N, {', '.join(map(str, shape))}]")
    return z


def save_noise(z: Tensor, path: PathLike) -> Path:
    """Write x_T [N, *shape] as a float32 ``.npy``, atomically."""
    with atomic_write(path, durable=False) as f:
        np.save(f, z.detach().cpu().float().numpy())
    return Path(path)


def write_interpolation(samples: Samples, out_dir: str | Path, duration_ms: int = 150) -> list[Path]:
    """``interpolation.png`` (the frames in one row) and ``interpolation.gif`` (there and back)."""
    out_dir = Path(out_dir)
    images = samples.uint8()
    tiles = [grid_image(image[None]) for image in images]
    gif = save_gif([*tiles, *tiles[-2:0:-1]], out_dir / "interpolation.gif", duration_ms=duration_ms)
    strip = make_grid(images, nrow=len(images), scale=auto_scale(images.shape[-1]))
    return [save_image(strip, out_dir / "interpolation.png"), gif]
