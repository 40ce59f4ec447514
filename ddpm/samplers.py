"""Samplers: one reverse-time loop, one step function per sampler.

A step function maps x_t to x_{t−1} given p_θ's prediction at x_t (the dict of
:meth:`GaussianDiffusion.p_mean_variance`) and a standard-normal draw ``noise``. Timesteps are
0-based steps of the (maybe respaced) process: the loop runs t = K−1, ..., 0 and t = 0 returns x_0.
References are listed in :mod:`ddpm.diffusion`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.errors import UserError
from ddpm.schedules import even_timesteps, space_timesteps

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion, Model

Step = Callable[["GaussianDiffusion", dict[str, Tensor], Tensor, Tensor, Tensor, float], Tensor]


def ddpm_step(
    diffusion: GaussianDiffusion, p: dict[str, Tensor], x_t: Tensor, t: Tensor, noise: Tensor, eta: float
) -> Tensor:
    """Ancestral sampling, [DDPM] Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = 0 at t = 1.

    ``eta`` is unused (the variance is the model's, fixed or learned).
    """
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return p["mean"] + nonzero * (0.5 * p["log_variance"]).exp() * noise


def ddim_sigma(diffusion: GaussianDiffusion, t: Tensor, x: Tensor, eta: float) -> Tensor:
    """σ_t(η) = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}), [DDIM] eq. 16.

    η = 1 gives the DDPM posterior standard deviation √β̃_t, η = 0 the deterministic DDIM.
    """
    # In float64: at the first steps 1 − ᾱ is small and float32 loses digits of σ.
    acp = diffusion.coef("alphas_cumprod", t, x, dtype=torch.float64)
    acp_prev = diffusion.coef("alphas_cumprod_prev", t, x, dtype=torch.float64)
    sigma = eta * ((1.0 - acp_prev) / (1.0 - acp) * (1.0 - acp / acp_prev)).sqrt()
    return sigma.to(diffusion.coef("alphas_cumprod", t, x).dtype)


def ddim_step(
    diffusion: GaussianDiffusion, p: dict[str, Tensor], x_t: Tensor, t: Tensor, noise: Tensor, eta: float
) -> Tensor:
    """The generalised DDIM step, [DDIM] eq. 12.

    x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z, with x̂_0 and ε̂ from the model
    (ε̂ recomputed from the clipped x̂_0) and σ_t from :func:`ddim_sigma`. At t = 1 (index 0),
    ᾱ_0 = 1 and the step returns x̂_0.
    """
    sigma = ddim_sigma(diffusion, t, x_t, eta)
    acp_prev = diffusion.coef("alphas_cumprod_prev", t, x_t)
    direction = (1.0 - acp_prev - sigma**2).clamp(min=0.0).sqrt() * p["eps"]
    return acp_prev.sqrt() * p["pred_x0"] + direction + sigma * noise


SAMPLERS: dict[str, Step] = {"ddpm": ddpm_step, "ddim": ddim_step}


def check_sampler_arguments(T: int, sampler: str, steps: int | None, eta: float) -> None:
    """Raise :class:`UserError` unless ``sampler``, ``steps`` (1..T or None) and ``eta`` (in [0, 1]) are valid."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must lie in [0, 1], got {eta}")
    if steps is not None and not 1 <= steps <= T:
        raise UserError(f"the number of sampling steps must be between 1 and T={T}, got {steps}")


def randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
          device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """A standard-normal draw of ``shape``; with one generator per sample, sample i's from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    trajectory_every: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    timesteps: Sequence[int] | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Draw samples x_0 ~ p_θ by running the reverse process from x_T ~ N(0, I).

    Args:
        sampler: ``"ddpm"`` (ancestral, [DDPM] Algorithm 2) or ``"ddim"`` ([DDIM] eq. 12).
        steps: K < T runs the process respaced onto K kept steps; ``None`` uses all T. DDIM keeps
            {0, T/K, 2T/K, ...} (:func:`~ddpm.schedules.even_timesteps`, as the DDIM paper);
            DDPM keeps K evenly spaced steps from 0 to T−1 inclusive
            (:func:`~ddpm.schedules.space_timesteps`, improved-diffusion's respacing), so that
            it starts from the step whose marginal is closest to N(0, I). ``timesteps`` gives the
            kept steps explicitly instead.
        eta: DDIM's η in [0, 1] (0: deterministic; 1: DDPM's posterior variance).
        generator: makes the draws (x_T and every z) reproducible; it must live on ``device``.
        progress: show a progress bar over the steps.
        return_trajectory: also return ``{"timesteps": [n], "x_t": [n, *shape],
            "pred_x0": [n, *shape]}`` (on the CPU) every ``trajectory_every`` steps, the last
            step always included; ``timesteps`` are original 0-based timesteps.
        model_kwargs: passed to the model, e.g. ``{"y": labels, "guidance_scale": 3.0}``
            (see :meth:`GaussianDiffusion.model_output`).
        noise: x_T to start from instead of a fresh draw.

    Returns x_0 [*shape] (and the trajectory if asked).
    """
    check_sampler_arguments(diffusion.num_timesteps, sampler, steps, eta)
    step = SAMPLERS[sampler]
    T = diffusion.num_timesteps
    if timesteps is None and steps is not None and steps != T:
        timesteps = even_timesteps(T, steps) if sampler == "ddim" else space_timesteps(T, [steps])
    d = diffusion if timesteps is None else diffusion.respace(timesteps)

    if noise is not None:
        x = noise.to(device=device or noise.device, dtype=dtype)
    else:
        x = randn(tuple(shape), generator, device, dtype)
    batch = x.shape[0]
    needs_noise = sampler == "ddpm" or eta > 0
    record: dict[str, list[Tensor]] = {"timesteps": [], "x_t": [], "pred_x0": []}

    indices = range(d.num_timesteps - 1, -1, -1)
    for n, i in enumerate(tqdm(indices, desc=f"{sampler} sampling", unit="step", disable=not progress, leave=False)):
        t = torch.full((batch,), i, device=x.device, dtype=torch.long)
        p = d.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if needs_noise and i > 0:
            z = randn(x.shape, generator, x.device, x.dtype)
        else:
            z = torch.zeros_like(x)
        if return_trajectory and (n % trajectory_every == 0 or i == 0):
            record["timesteps"].append(d.original_timesteps(t[:1]).cpu())
            record["x_t"].append(x.cpu())
            record["pred_x0"].append(p["pred_x0"].cpu())
        x = step(d, p, x, t, z, eta)
    if not return_trajectory:
        return x
    return x, {
        "timesteps": torch.cat(record["timesteps"]),
        "x_t": torch.stack(record["x_t"]),
        "pred_x0": torch.stack(record["pred_x0"]),
    }
