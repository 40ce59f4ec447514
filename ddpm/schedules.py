"""Noise schedules β_1..β_T and respacing onto a subsequence of timesteps.

All schedules are float64 tensors of length T. Index ``i`` of a schedule is the paper's timestep
``t = i + 1``: ``betas[0]`` is β_1 and ``betas[T - 1]`` is β_T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddpm.errors import UserError

SCHEDULES = ("linear", "cosine")


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear schedule of Ho et al. (2020, section 4): β from 1e-4 to 0.02 over T = 1000 steps.

    For another T, both ends are scaled by 1000 / T, as Improved DDPM does
    (Nichol & Dhariwal 2021, ``get_named_beta_schedule``), so that the total noise added stays
    about the same. Returns float64 [T].
    """
    _check_T(T)
    scale = 1000.0 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    if betas[-1] >= 1.0:
        raise UserError(
            f"the linear schedule with T={T} steps would need beta_T = {betas[-1].item():.3g} >= 1; "
            "use T >= 21 or the cosine schedule"
        )
    return betas


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, eq. 17).

    ᾱ_t = f(t) / f(0) with f(t) = cos²((t/T + s) / (1 + s) · π/2), and β_t = 1 - ᾱ_t / ᾱ_{t-1}
    clipped at ``max_beta`` = 0.999 to avoid the singularity at t = T. Returns float64 [T].
    """
    _check_T(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def get_betas(name: str, T: int) -> torch.Tensor:
    """A schedule by name: ``"linear"`` or ``"cosine"``."""
    if name == "linear":
        return linear_betas(T)
    if name == "cosine":
        return cosine_betas(T)
    raise UserError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def even_timesteps(T: int, K: int) -> list[int]:
    """K kept timesteps spread evenly over 0..T-1: ``floor(i·T/K)`` for i = 0..K-1.

    When K divides T this is {0, T/K, 2T/K, ...}, the uniform subsequence of DDIM
    (Song et al. 2021, section 4.2) with 0-based indices.
    """
    _check_T(T)
    if not 1 <= K <= T:
        raise UserError(f"the number of sampling steps must be between 1 and T={T}, got {K}")
    return [(i * T) // K for i in range(K)]


def space_timesteps(T: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Kept timesteps in improved-diffusion's notation.

    ``section_counts`` is an int K (→ :func:`even_timesteps`), a string ``"ddimK"`` (the same),
    or a list / comma-separated string of counts: 0..T-1 is cut into that many equal sections and
    each section keeps that many evenly spaced steps, its first and last included
    (Nichol & Dhariwal 2021, ``space_timesteps``). E.g. ``"10,15,20"`` for T=300 keeps 10 steps
    of the first 100, 15 of the second and 20 of the third.
    """
    if isinstance(section_counts, int):
        return even_timesteps(T, section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return even_timesteps(T, int(section_counts[len("ddim"):]))
        section_counts = [int(c) for c in section_counts.split(",")]
    counts = list(section_counts)
    size, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise UserError(f"cannot keep {count} steps of a section of {section} timesteps")
        stride = (section - 1) / (count - 1) if count > 1 else 0.0
        kept += [start + round(j * stride) for j in range(count)]
        start += section
    return kept


def respace_betas(alphas_cumprod: torch.Tensor, use_timesteps: Sequence[int]) -> torch.Tensor:
    """Betas of the diffusion that visits only ``use_timesteps`` (improved-diffusion's respacing).

    The respaced process keeps the marginals q(x_t | x_0) at the kept steps: with kept steps
    τ_1 < ... < τ_K it has ᾱ'_k = ᾱ_{τ_k}, hence β'_k = 1 - ᾱ_{τ_k} / ᾱ_{τ_{k-1}} (ᾱ_{τ_0} = 1).
    Returns float64 [K].
    """
    kept = sorted(set(int(t) for t in use_timesteps))
    T = len(alphas_cumprod)
    if not kept or kept[0] < 0 or kept[-1] >= T:
        raise UserError(f"kept timesteps must lie in 0..{T - 1}")
    acp = alphas_cumprod.to(torch.float64)[kept]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    return 1.0 - acp / prev


def _check_T(T: int) -> None:
    if int(T) != T or T < 1:
        raise UserError(f"the number of diffusion steps T must be a positive integer, got {T}")
