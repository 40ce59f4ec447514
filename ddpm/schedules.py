"""Noise schedules β_1..β_T and respacing onto a subsequence of timesteps.

All schedules are float64 tensors of length T. Index ``i`` of a schedule is the paper's timestep
``t = i + 1``: ``betas[0]`` is β_1 and ``betas[T - 1]`` is β_T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddpm.errors import UserError

SCHEDULES = ("linear", "cosine", "scaled_linear")
#: β_1 and β_T of latent diffusion's ``scaled_linear`` schedule, for any T.
SCALED_LINEAR_ENDS = (0.00085, 0.012)


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


def scaled_linear_betas(T: int = 1000, beta_start: float = SCALED_LINEAR_ENDS[0],
                        beta_end: float = SCALED_LINEAR_ENDS[1]) -> torch.Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022; Stable Diffusion's, diffusers'
    ``scaled_linear``): √β linear from √0.00085 to √0.012, so β_t = (√β_1 + (√β_T - √β_1)(t-1)/(T-1))².

    Less noise than DDPM's linear schedule at every t (ᾱ_T = 0.0047 against 4e-5 for T = 1000):
    the latents of a small image hold few dimensions, and the heavy end of DDPM's schedule spends
    training on steps where they are already noise. The ends do not depend on T (as in the LDM
    code and diffusers). Returns float64 [T].
    """
    _check_T(T)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def get_betas(name: str, T: int) -> torch.Tensor:
    """A schedule by name: ``"linear"``, ``"cosine"`` or ``"scaled_linear"``."""
    if name == "linear":
        return linear_betas(T)
    if name == "cosine":
        return cosine_betas(T)
    if name == "scaled_linear":
        return scaled_linear_betas(T)
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


# ---------------------------------------------------------------------------- spacings
#
# A spacing picks the K timesteps a sampler visits, from the process's ᾱ (float64 [T]). Each
# returns K distinct 0-based timesteps in increasing order, and every one but ``leading`` keeps
# T − 1, so that the chain starts where x_T ~ N(0, I) is (nearly) true.


def uniform_timesteps(alphas_cumprod: torch.Tensor, K: int) -> list[int]:
    """K timesteps evenly spaced from 0 to T−1, both kept: round(j (T−1)/(K−1)).

    IDDPM's respacing (:func:`space_timesteps` with one section) and diffusers' ``linspace``
    with 0 kept. K = 1 keeps T−1 alone.
    """
    T = _check_K(alphas_cumprod, K)
    if K == 1:
        return [T - 1]
    stride = (T - 1) / (K - 1)  # the same arithmetic as space_timesteps, so the same steps
    return [round(j * stride) for j in range(K)]


def leading_timesteps(alphas_cumprod: torch.Tensor, K: int) -> list[int]:
    """DDIM's uniform subsequence floor(jT/K) (:func:`even_timesteps`): the one spacing that does
    not keep T−1 (its last step is T − T/K), kept as DDIM's default for backward compatibility."""
    return even_timesteps(_check_K(alphas_cumprod, K), K)


def trailing_timesteps(alphas_cumprod: torch.Tensor, K: int) -> list[int]:
    """round(T − jT/K) − 1 for j = 0..K−1: from T−1 down in equal strides, 0 not kept unless K = T
    (diffusers' ``trailing``; Lin et al. 2024, "Common diffusion noise schedules ...", Table 2)."""
    T = _check_K(alphas_cumprod, K)
    return _distinct([round(T - j * T / K) - 1 for j in range(K)], T)


def quadratic_timesteps(alphas_cumprod: torch.Tensor, K: int) -> list[int]:
    """round((T−1)(j/(K−1))²): DDIM's quadratic subsequence (Song et al. 2021, appendix D.2,
    its CIFAR-10 choice), stretched to end at T−1 instead of 0.8 T; dense near the data."""
    T = _check_K(alphas_cumprod, K)
    if K == 1:
        return [T - 1]
    return _distinct([round((T - 1) * (j / (K - 1)) ** 2) for j in range(K)], T)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ_t = log(α_t/σ_t) = ½ log(ᾱ_t / (1 − ᾱ_t)), the half log-SNR of DPM-Solver (Lu et al. 2022)."""
    acp = alphas_cumprod.to(torch.float64)
    return 0.5 * (acp.log() - torch.log1p(-acp))


#: The noisiest λ the λ- and σ-based spacings spread their steps from: about λ_{T−1} of DDPM's linear
#: schedule (−5.06), and diffusers' ``lambda_min_clipped`` advice for the cosine schedule, whose
#: clipped last βs reach λ ≈ −10 and would otherwise draw several steps into pure noise.
LAMBDA_MIN = -5.1


def logsnr_timesteps(alphas_cumprod: torch.Tensor, K: int) -> list[int]:
    """K timesteps uniform in λ from max(λ_{T−1}, :data:`LAMBDA_MIN`) to λ_0, each the timestep
    nearest in λ, the noisiest replaced by T−1 (DPM-Solver's ``logSNR`` skip type, recommended
    there for low-resolution images)."""
    T = _check_K(alphas_cumprod, K)
    lam = log_snr(alphas_cumprod)
    targets = torch.linspace(max(lam[-1].item(), LAMBDA_MIN), lam[0].item(), K, dtype=torch.float64)
    return _nearest_from_last(lam, targets, T)


def karras_timesteps(alphas_cumprod: torch.Tensor, K: int, rho: float = 7.0) -> list[int]:
    """Karras et al. (2022) eq. 5 in σ = √((1−ᾱ)/ᾱ): σ_j = (σ_max^{1/ρ} + j/(K−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,
    ρ = 7, from σ_max = min(σ_{T−1}, e^{−LAMBDA_MIN}) to σ_0, each mapped to the timestep nearest in
    log σ, the noisiest replaced by T−1.

    Nearest, not continuous: the model knows integer timesteps only, and the solvers then use that
    timestep's exact σ, so the grid is a little off eq. 5 but always self-consistent (diffusers
    instead rounds the timestep and keeps eq. 5's σ, a model/σ mismatch).
    """
    T = _check_K(alphas_cumprod, K)
    lam = log_snr(alphas_cumprod)
    s_max = math.exp(-max(lam[-1].item(), LAMBDA_MIN) / rho)
    s_min = math.exp(-lam[0].item() / rho)
    ramp = torch.linspace(0, 1, K, dtype=torch.float64)
    return _nearest_from_last(lam, -rho * torch.log(s_max + ramp * (s_min - s_max)), T)


SPACINGS = {
    "uniform": uniform_timesteps,
    "leading": leading_timesteps,
    "trailing": trailing_timesteps,
    "quadratic": quadratic_timesteps,
    "logsnr": logsnr_timesteps,
    "karras": karras_timesteps,
}


def _check_K(alphas_cumprod: torch.Tensor, K: int) -> int:
    T = len(alphas_cumprod)
    if not 1 <= K <= T:
        raise UserError(f"the number of sampling steps must be between 1 and T={T}, got {K}")
    return T


def _nearest_from_last(lam: torch.Tensor, targets: torch.Tensor, T: int) -> list[int]:
    """For each target λ, the timestep nearest in λ; the noisiest becomes T−1 (the chain starts from
    noise, and a first step from T−1 over the λ's below :data:`LAMBDA_MIN` costs the solvers
    nothing: x̂_0 barely changes there); made distinct."""
    steps = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    steps[steps.index(max(steps))] = T - 1
    return _distinct(steps, T)


def _distinct(steps: list[int], T: int) -> list[int]:
    """``steps`` sorted and made strictly increasing within 0..T−1, moving as few as needed.

    When K is close to T, rounding puts several targets on one timestep; the j-th smallest is then
    lifted to at least one above the (j−1)-th and capped at T − K + j, which keeps K distinct
    steps and leaves T−1 in place.
    """
    steps, K = sorted(steps), len(steps)
    out: list[int] = []
    for j, s in enumerate(steps):
        out.append(min(max(s, out[-1] + 1 if out else 0), T - K + j))
    return out


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
