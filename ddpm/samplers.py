"""Samplers: one reverse-time loop, one small solver class per method.

The loop (:func:`sample`) visits K kept timesteps t_{K−1} > ... > t_0 of the process (0-based:
index i is the paper's t = i + 1), calls the network once at each, and hands the prediction to
the solver's ``step``, which moves x from t_k to t_{k−1}, or at k = 0 to the data (ᾱ = 1). A
multistep solver keeps its history of x̂_0 on itself; Heun asks the loop's ``denoise`` for its
second evaluation. Adding a solver is one class and one line in :data:`SAMPLERS`.

The ODE solvers work in the notation of DPM-Solver: x_t = α_t x_0 + σ_t ε with α_t = √ᾱ_t,
σ_t = √(1 − ᾱ_t), and λ_t = log(α_t/σ_t), which grows from the noise (λ_{T−1} ≈ −5 for the
linear schedule) to the data (λ = +∞). They use the data prediction x̂_0 only (the mean channels
of a learned-variance model), clipped to [−1, 1] when ``clip_denoised``.

References (see also :mod:`ddpm.diffusion`):

- [DPM++] Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models. arXiv:2211.01095 (2022).
- [UniPC] Zhao, Bai, Rao, Zhou, Lu. UniPC: A Unified Predictor-Corrector Framework for Fast
  Sampling of Diffusion Models. arXiv:2302.04867 (2023).
- [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
  Models. NeurIPS 2022.
- [SDE] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through
  Stochastic Differential Equations. ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.errors import UserError
from ddpm.schedules import SPACINGS

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion, Model

#: ``denoise(x, k)``: the network's prediction at kept step k (the dict of ``p_mean_variance``).
Denoise = Callable[[Tensor, int], dict[str, Tensor]]
#: ``noise()``: a fresh standard-normal tensor shaped like x, drawn only when a solver needs one.
Noise = Callable[[], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
#: ``after_step(x, t) -> x``: called after each step with the original timestep x reached (−1: the data).
AfterStep = Callable[[Tensor, int], Tensor]


# ---------------------------------------------------------------------------- DDPM and DDIM


def ddpm_step(
    diffusion: GaussianDiffusion, p: dict[str, Tensor], x_t: Tensor, t: Tensor, noise: Tensor, eta: float
) -> Tensor:
    """Ancestral sampling, [DDPM] Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = 0 at t = 1.

    ``eta`` is unused (the variance is the model's, fixed or learned).
    """
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return p["mean"] + nonzero * (0.5 * p["log_variance"]).exp() * noise


def ddim_sigma(diffusion: GaussianDiffusion, t: Tensor, x: Tensor, eta: float, prev: float | None = None) -> Tensor:
    """σ_t(η) = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}), [DDIM] eq. 16.

    η = 1 gives the DDPM posterior standard deviation √β̃_t, η = 0 the deterministic DDIM.
    ``prev`` replaces ᾱ_{t−1} (the last step's target, see :class:`DDIM`).
    """
    # In float64: at the first steps 1 − ᾱ is small and float32 loses digits of σ.
    acp = diffusion.coef("alphas_cumprod", t, x, dtype=torch.float64)
    acp_prev = diffusion.coef("alphas_cumprod_prev", t, x, dtype=torch.float64)
    if prev is not None:
        acp_prev = torch.full_like(acp_prev, prev)
    sigma = eta * ((1.0 - acp_prev) / (1.0 - acp) * (1.0 - acp / acp_prev)).sqrt()
    return sigma.to(diffusion.coef("alphas_cumprod", t, x).dtype)


def ddim_step(
    diffusion: GaussianDiffusion, p: dict[str, Tensor], x_t: Tensor, t: Tensor, noise: Tensor, eta: float,
    prev: float | None = None,
) -> Tensor:
    """The generalised DDIM step, [DDIM] eq. 12.

    x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z, with x̂_0 and ε̂ from the model
    (ε̂ recomputed from the clipped x̂_0) and σ_t from :func:`ddim_sigma`. At t = 1 (index 0),
    ᾱ_0 = 1 and the step returns x̂_0. ``prev`` replaces ᾱ_{t−1}.
    """
    sigma = ddim_sigma(diffusion, t, x_t, eta, prev)
    acp_prev = diffusion.coef("alphas_cumprod_prev", t, x_t)
    if prev is not None:
        acp_prev = torch.full_like(acp_prev, prev)
    direction = (1.0 - acp_prev - sigma**2).clamp(min=0.0).sqrt() * p["eps"]
    return acp_prev.sqrt() * p["pred_x0"] + direction + sigma * noise


class Solver:
    """A reverse-time solver on the (respaced) process ``d``; ``step`` is called at k = K−1, ..., 0.

    ``step(x, k, p, denoise, noise)`` gets x at kept step k and the network's prediction ``p`` there,
    and returns x at step k − 1 (at k = 0: the sample). ``evaluations(K)`` is its NFE on K steps.
    The last step lands at the data (ᾱ = 1), or at ᾱ = ``final_alpha_cumprod`` < 1 for the solvers
    that take one (:data:`FINAL_STEP_SAMPLERS`).
    """

    def __init__(self, d: GaussianDiffusion, eta: float = 0.0, final_alpha_cumprod: float | None = None) -> None:
        self.d, self.eta = d, eta
        self.final = None if final_alpha_cumprod is None or final_alpha_cumprod == 1.0 else final_alpha_cumprod

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def evaluations(K: int) -> int:
        return K

    @staticmethod
    def kept_steps(nfe: int) -> int:
        """How many timesteps to keep for a budget of ``nfe`` network evaluations."""
        return nfe

    def next_step(self, k: int) -> int:
        """The kept step that the last ``step`` from k reached (every solver but the adaptive one: k − 1)."""
        return k - 1

    def alpha_sigma(self, k: int) -> tuple[float, float]:
        """(α, σ) = (√ᾱ, √(1 − ᾱ)) at kept step k, in float64; k = −1 is where the last step lands: the
        data, (1, 0), or ᾱ = ``final_alpha_cumprod``."""
        if k < 0:
            acp = 1.0 if self.final is None else self.final
        else:
            acp = self.d.alphas_cumprod[k].item()
        return math.sqrt(acp), math.sqrt(1.0 - acp)

    def log_snr(self, k: int) -> float:
        """λ = log(α/σ) at kept step k (+∞ at the data)."""
        alpha, sigma = self.alpha_sigma(k)
        return math.inf if sigma == 0.0 else math.log(alpha / sigma)


class DDPM(Solver):
    """Ancestral sampling, [DDPM] Algorithm 2 (:func:`ddpm_step`), on the respaced process."""

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        z = noise() if k > 0 else torch.zeros_like(x)
        return ddpm_step(self.d, p, x, _timestep(k, x), z, self.eta)


class DDIM(Solver):
    """[DDIM] eq. 12 (:func:`ddim_step`); η = 0 is the first-order solver of the PF-ODE in λ.

    The last step goes to the data (ᾱ = 1, x̂_0), or to ``final_alpha_cumprod`` < 1 when given: a
    diffusers ``DDIMScheduler`` with ``set_alpha_to_one = False`` ends at ᾱ of timestep 0, the
    paper's x_1, not x_0 (:class:`ddpm.models.diffusers_io.DDIMOptions`).
    """

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        last = k == 0
        z = noise() if self.eta > 0 and (not last or self.final is not None) else torch.zeros_like(x)
        return ddim_step(self.d, p, x, _timestep(k, x), z, self.eta, self.final if last else None)


# ---------------------------------------------------------------------------- multistep solvers


class Multistep(Solver):
    """A multistep solver: it keeps (λ, x̂_0) of its last ``order`` evaluations and steps at the highest
    order that this history allows.

    The first step has no history, so the order ramps up, 1, 2, ..., ``order`` (as every multistep
    method starts). With ``lower_order_final`` (the default; diffusers' option of that name) the order
    at kept step k is also at most k + 1: the step before last is at most second order and the last
    first order. A last step to the data (λ = ∞, ``final_step="denoise"``) is first order whatever
    the option: there the update is x̂_0 itself.
    """

    def __init__(self, d: GaussianDiffusion, eta: float = 0.0, order: int = 2, lower_order_final: bool = True,
                 final_alpha_cumprod: float | None = None) -> None:
        super().__init__(d, eta, final_alpha_cumprod)
        self.order, self.lower_order_final = order, lower_order_final
        self.history: list[tuple[float, Tensor]] = []  # (λ, x̂_0), newest last

    def remember(self, k: int, x0: Tensor) -> None:
        self.history = [*self.history, (self.log_snr(k), x0)][-self.order:]

    def step_order(self, k: int) -> int:
        """The order of the step from kept step k, after ``remember`` at k."""
        return min(self.order, len(self.history), k + 1 if self.lower_order_final else self.order)


class DPMSolverPP(Multistep):
    """DPM-Solver++ multistep with data prediction, [DPM++] Algorithm 2 (2M) and its third order (3M);
    with a noise amount ``eta`` = η > 0, their SDE variants (SDE-DPM-Solver++(2M), [DPM++] section 5).

    The reverse SDEs dy = −(1 + η)/2 g² ∇_y log p_t dt + √η g dw̄ in y = x/α all have the model's
    marginals (η = 0: the PF-ODE; η = 1: the reverse SDE of [SDE]; k-diffusion's ``eta``). With
    c = 1 + η and h = λ_t − λ_s, their linear part and their noise are exact from s to t:
    x_t = (σ_t/σ_s) e^{−ηh} x_s + α_t c ∫_0^h e^{−c(h−u)} x̂_0(λ_s + u) du + σ_t √(1 − e^{−2ηh}) z.
    Order 1 takes x̂_0 constant, a weight J_0 = 1 − e^{−ch} (DDIM at η = 0); 2M replaces x̂_0 by
    D = x̂_0(s) + (x̂_0(s) − x̂_0(s')) / (2r) from the previous step s' (r = h'/h; the midpoint rule
    of [DPM++] Algorithm 2); 3M expands x̂_0 to second order in λ through the last three points and
    integrates each term exactly, J_1 = h − J_0/c and J_2 = h²/2 − h/c + J_0/c². The orders ramp up
    and come down as :class:`Multistep` says; a last step to the data returns x̂_0.
    """

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        x0 = p["pred_x0"]
        self.remember(k, x0)
        alpha_t, sigma_t = self.alpha_sigma(k - 1)
        if sigma_t == 0.0:
            return x0  # h = ∞: e^{−h} = 0, the update is x̂_0 itself
        h = math.log(alpha_t / sigma_t) - self.history[-1][0]
        c, order = 1.0 + self.eta, self.step_order(k)
        decay = sigma_t / self.alpha_sigma(k)[1] * math.exp(-self.eta * h)  # (σ_t/σ_s) e^{−ηh}
        j0 = -math.expm1(-c * h)  # 1 − e^{−ch}
        if order == 1:
            x_t = decay * x + alpha_t * j0 * x0
        elif order == 2:
            x_t = decay * x + alpha_t * j0 * self.midpoint(h)
        else:
            d1, d2 = _lambda_derivatives(self.history)
            j1, j2 = h - j0 / c, h * h / 2 - h / c + j0 / (c * c)
            x_t = decay * x + alpha_t * (j0 * x0 + j1 * d1 + j2 * d2)
        if self.eta == 0.0:
            return x_t
        return x_t + sigma_t * math.sqrt(-math.expm1(-2 * self.eta * h)) * noise()

    def midpoint(self, h: float) -> Tensor:
        """2M's D = x̂_0(s) + (x̂_0(s) − x̂_0(s')) / (2r), r = (λ_s − λ_s')/h ([DPM++] Algorithm 2)."""
        (lam_1, x0_1), (lam_s, x0) = self.history[-2:]
        if self.eta == 0.0:  # two spellings of one D: each solver's own, so that seeds reproduce bit for bit
            r = (lam_s - lam_1) / h
            return (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_1
        return x0 + (x0 - x0_1) * h / (2 * (lam_s - lam_1))


def _lambda_derivatives(history: list[tuple[float, Tensor]]) -> tuple[Tensor, Tensor]:
    """dx̂_0/dλ and d²x̂_0/dλ² at the newest point, from the quadratic through the last three.

    Newton's divided differences: f[s0,s1] = (x̂_0(s0) − x̂_0(s1)) / (λ_0 − λ_1), and the quadratic's
    derivatives at λ_0 are f[s0,s1] + (λ_0 − λ_1) f[s0,s1,s2] and 2 f[s0,s1,s2].
    """
    (l2, m2), (l1, m1), (l0, m0) = history[-3:]
    f01, f12 = (m0 - m1) / (l0 - l1), (m1 - m2) / (l1 - l2)
    f012 = (f01 - f12) / (l0 - l2)
    return f01 + (l0 - l1) * f012, 2 * f012


class UniPC(Multistep):
    """UniPC with data prediction, [UniPC] section 3 (UniC, UniP): B(h) = e^h − 1 (``bh2``, the
    ``unipc`` sampler) or B(h) = h (``bh1``, ``unipc-bh1``), of ``order`` p = 1, 2 or 3 (default 3).

    Each step predicts with UniP-p from the last p points, then, once the network has been called
    at the predicted point (the next step's evaluation, so no extra NFE), corrects that point with
    UniC-p, which raises the order by one; the model output kept in the history is the one at the
    uncorrected point. The orders ramp up and come down as :class:`Multistep` says (diffusers'
    ``UniPCMultistepScheduler`` applies ``lower_order_final`` at every number of steps); a last step
    to the data returns x̂_0, and no corrector follows the last step.
    """

    def __init__(self, d: GaussianDiffusion, eta: float = 0.0, order: int = 3, variant: str = "bh2",
                 lower_order_final: bool = True, final_alpha_cumprod: float | None = None) -> None:
        super().__init__(d, eta, order, lower_order_final, final_alpha_cumprod)
        self.variant = variant
        self.last: tuple[Tensor, int, int] | None = None  # (x_s, k of s, order) of the last prediction

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        x0 = p["pred_x0"]
        if self.alpha_sigma(k - 1)[1] == 0.0:
            return x0  # to λ = ∞: x̂_0, whatever a correction of x would have been
        if self.last is not None:  # UniC: x was predicted; correct it with the model output at x
            x_s, k_s, order = self.last
            x = self.update(x_s, k_s, k, self.history[-order:], x0_t=x0)
        self.remember(k, x0)
        order = self.step_order(k)
        self.last = (x, k, order)
        return self.update(x, k, k - 1, self.history[-order:])

    def update(
        self, x: Tensor, k_s: int, k_t: int, points: list[tuple[float, Tensor]], x0_t: Tensor | None = None
    ) -> Tensor:
        """UniP (``x0_t`` None) or UniC from s = t_{k_s} to t = t_{k_t} ([UniPC] section 3).

        ``points`` are (λ, x̂_0) with s last. With r_m = (λ_m − λ_s)/h and D_m = (x̂_0(m) − x̂_0(s)) / r_m,
        x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) x̂_0(s) − α_t B(z) Σ_m ρ_m D_m, z = −h,
        where ρ solves Σ_m ρ_m r_m^{i−1} = b_i = i! z φ_{i+1}(z) / B(z), i = 1..p (the order conditions
        of [UniPC]), φ_1(z) = (e^z − 1)/z, φ_{i+1}(z) = (φ_i(z) − 1/i!)/z, and B(z) = e^z − 1 (bh2) or z
        (bh1). The corrector adds the point t itself (r = 1, D = x̂_0(t) − x̂_0(s)). With a single D (the
        predictor of order 2, the corrector of order 1) ρ = ½, b_1's limit as h → 0, as in UniPC's
        reference code and diffusers.
        """
        (lam_s, x0_s), older = points[-1], points[:-1]
        alpha_t, sigma_t = self.alpha_sigma(k_t)
        h = math.log(alpha_t / sigma_t) - lam_s
        r = [(lam - lam_s) / h for lam, _ in older]
        D = [(m - x0_s) / r_m for (_, m), r_m in zip(older, r, strict=True)]
        if x0_t is not None:
            r, D = [*r, 1.0], [*D, x0_t - x0_s]
        x_t = (sigma_t / self.alpha_sigma(k_s)[1]) * x - alpha_t * math.expm1(-h) * x0_s
        if not D:
            return x_t
        rho = [0.5] if len(D) == 1 else _unipc_rho(r, h, self.variant)
        B = _unipc_B(-h, self.variant)
        return x_t - alpha_t * B * sum(rho_m * D_m for rho_m, D_m in zip(rho, D, strict=True))


def _unipc_B(z: float, variant: str) -> float:
    """[UniPC]'s B(z) at z = −h: e^z − 1 for ``bh2``, z for ``bh1``."""
    return math.expm1(z) if variant == "bh2" else z


def _unipc_rho(r: list[float], h: float, variant: str = "bh2") -> list[float]:
    """Solve [UniPC]'s order conditions R ρ = b with R_{i,m} = r_m^{i−1} and the variant's b (UniPC.update)."""
    z, n = -h, len(r)  # data prediction integrates e^{−h}
    phi, fact, b = math.expm1(z) / z, 1.0, []
    for i in range(1, n + 1):
        phi = (phi - 1.0 / fact) / z  # φ_{i+1}(z)
        b.append(fact * z * phi / _unipc_B(z, variant))  # i! · z φ_{i+1}(z) / B(z)
        fact *= i + 1
    R = torch.tensor([[rm ** (i - 1) for rm in r] for i in range(1, n + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


# ---------------------------------------------------------------------------- Heun


class Heun(Solver):
    """Heun's second-order method on the PF-ODE in σ = σ_t/α_t, [EDM] Algorithm 1 (S_churn = 0).

    With y = x/α, the ODE is dy/dσ = (y − x̂_0(y, σ))/σ ([EDM] eq. 4 with s = 1). Each step takes an
    Euler step to the next σ and corrects it with the slope there (the second evaluation, at the
    next kept timestep); the last step, to σ = 0, is Euler alone and returns x̂_0. So K kept
    timesteps cost 2K − 1 network evaluations, and ``steps`` = N evaluations keep K = ⌊(N+1)/2⌋
    (an even N spends N − 1).
    """

    @staticmethod
    def evaluations(K: int) -> int:
        return 2 * K - 1

    @staticmethod
    def kept_steps(nfe: int) -> int:
        return (nfe + 1) // 2

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        (alpha_s, sigma_s), (alpha_t, sigma_t) = self.alpha_sigma(k), self.alpha_sigma(k - 1)
        s, t = sigma_s / alpha_s, sigma_t / alpha_t
        y = x / alpha_s
        slope = (y - p["pred_x0"]) / s
        y_euler = y + (t - s) * slope
        if t == 0.0:
            return y_euler
        slope_t = (y_euler - denoise(alpha_t * y_euler, k - 1)["pred_x0"]) / t
        return alpha_t * (y + (t - s) * (slope + slope_t) / 2)


# ---------------------------------------------------------------------------- adaptive


class DPMAdaptive(Solver):
    """DPM-Solver-12 with adaptive step size (Lu et al. 2022a, "DPM-Solver", its adaptive solver), in
    the data-prediction form of [DPM++], on the process's own integer timesteps.

    From s it proposes t with λ_t ≈ λ_s + h and takes both a first-order step (DDIM) and the
    second-order singlestep DPM-Solver++(2S) through the midpoint u (λ_u ≈ (λ_s + λ_t)/2, one more
    evaluation). Their difference estimates the local error, measured as
    E = RMS((x_high − x_low) / max(atol, rtol · max(|x_low|, |x_s|))) over the whole batch: E ≤ 1
    accepts x_high, else t is refused; either way h ← h · min(5, max(0.2, 0.9 E^{−1/2})).
    Proposals snap to the nearest timestep (at least two below s, so a midpoint exists), and the
    last step returns x̂_0 at timestep 0. The NFE is known only afterwards (``stats`` of
    :func:`sample`); the step sizes depend on the whole batch, so unlike the other solvers a sample
    is not independent of its batch.
    """

    def __init__(self, d: GaussianDiffusion, eta: float = 0.0, rtol: float = 0.05, atol: float = 0.0078) -> None:
        super().__init__(d, eta)
        self.rtol, self.atol = rtol, atol
        self.lam = [self.log_snr(k) for k in range(d.num_timesteps)]
        self.h = (self.lam[0] - self.lam[-1]) / 20  # a first guess; the controller corrects it
        self.reached = -1

    @staticmethod
    def evaluations(K: int) -> int:
        raise ValueError("dpm-adaptive's NFE is known only after sampling: pass stats={} to sample()")

    def next_step(self, k: int) -> int:
        return self.reached

    def nearest(self, lam: float, lo: int, hi: int) -> int:
        """The timestep in lo..hi whose λ is nearest to ``lam``."""
        return min(range(lo, hi + 1), key=lambda j: abs(self.lam[j] - lam))

    def first_order(self, x: Tensor, k_s: int, k_t: int, x0: Tensor) -> Tensor:
        (alpha_t, sigma_t), sigma_s = self.alpha_sigma(k_t), self.alpha_sigma(k_s)[1]
        return (sigma_t / sigma_s) * x - alpha_t * math.expm1(self.lam[k_s] - self.lam[k_t]) * x0

    def step(self, x: Tensor, k: int, p: dict[str, Tensor], denoise: Denoise, noise: Noise) -> Tensor:
        x0 = p["pred_x0"]
        if k <= 1:  # nothing left to adapt: DDIM to timestep 0, or x̂_0 from it
            self.reached = k - 1
            return x0 if k == 0 else self.first_order(x, k, 0, x0)
        while True:
            t = self.nearest(self.lam[k] + self.h, 0, k - 2)
            u = self.nearest((self.lam[k] + self.lam[t]) / 2, t + 1, k - 1)
            h, r = self.lam[t] - self.lam[k], (self.lam[u] - self.lam[k]) / (self.lam[t] - self.lam[k])
            x_low = self.first_order(x, k, t, x0)
            x0_u = denoise(self.first_order(x, k, u, x0), u)["pred_x0"]
            x_high = self.first_order(x, k, t, (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * x0_u)  # [DPM++] Alg. 1
            scale = torch.maximum(x_low.abs(), x.abs()).mul(self.rtol).clamp(min=self.atol)
            error = ((x_high - x_low) / scale).pow(2).mean().sqrt().item()
            self.h = h * min(5.0, max(0.2, 0.9 * max(error, 1e-10) ** -0.5))
            if error <= 1.0 or t == k - 2:  # a step of two timesteps is the smallest there is
                self.reached = t
                return x_high


# ---------------------------------------------------------------------------- registries

#: Every solver by its name: a constructor ``(d, eta, **options) -> Solver``. ``dpm++2m`` and ``dpm++2m-sde``
#: (and the 3M pair) are one solver; the name sets the noise amount η (:data:`DEFAULT_ETA`).
SAMPLERS: dict[str, Callable[..., Solver]] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "dpm++2m": partial(DPMSolverPP, order=2),
    "dpm++3m": partial(DPMSolverPP, order=3),
    "dpm++2m-sde": partial(DPMSolverPP, order=2),
    "dpm++3m-sde": partial(DPMSolverPP, order=3),
    "unipc": partial(UniPC, variant="bh2"),
    "unipc-bh1": partial(UniPC, variant="bh1"),
    "heun": Heun,
    "dpm-adaptive": DPMAdaptive,
}

#: The spacing each solver uses unless told. DDPM and DDIM keep their historical ones (so a seed gives the
#: same images as before). For the others the spacing with the smallest error on the exact Gaussian model
#: won (geometric mean over N(0.1, 0.3²) and N(0.1, 0.5²), linear and cosine schedules, NFE 5, 10, 20;
#: ``python tests/test_math_solvers.py`` prints the table): ``logsnr``, e.g. for dpm++2m logsnr 0.018,
#: quadratic 0.019, karras 0.030, trailing 0.044, uniform 0.078; for Heun ``karras``, 0.86 (trailing 1.4,
#: logsnr 1.5; ``leading``, which skips T−1, is no candidate: test_heun_at_its_default_spacing).
#: dpm++2m-sde is the exception: on a trained MNIST model (``python -m bench.solvers``, FD of 1,000
#: samples, bench/RESULTS.md) ``trailing`` beat ``logsnr`` at 5 and 10 NFE (85.3 vs 142.9, 27.4 vs 38.3)
#: and tied at 20 (25.0 vs 23.5); on the Gaussian toy its moments barely separate the two. dpm++3m-sde
#: follows it. unipc-bh1, the default at 5 and 7 NFE (:data:`DEFAULT_SAMPLER_BY_NFE`), is ``trailing`` by
#: the same kind of measurement (the 30-minute ``mnist`` model, FD of 500 samples, bench/RESULTS.md):
#: trailing 26.8, 17.5, 16.5, 16.6 at 5, 7, 10, 15 NFE against logsnr's 151.6, 51.2, 34.9, 17.9. Trailing
#: won for every ODE solver there; the others keep logsnr until they are measured at 20 NFE too.
DEFAULT_SPACING: dict[str, str] = {
    "ddpm": "uniform",
    "ddim": "leading",
    "dpm++2m": "logsnr",
    "dpm++3m": "logsnr",
    "dpm++2m-sde": "trailing",
    "dpm++3m-sde": "trailing",
    "unipc": "logsnr",
    "unipc-bh1": "trailing",
    "heun": "karras",  # at 20 NFE 0.11, 2.4x DDIM's 0.046; at 80 NFE 0.0047 (DDIM 0.012)
    "dpm-adaptive": "uniform",  # it keeps every timestep and picks its own steps among them
}

#: The solvers that take ``eta`` and its default: DDIM's η in [0, 1] (0: deterministic, 1: DDPM's posterior
#: variance) and the SDE solvers' noise amount (1: the reverse SDE, as they always sampled; 0: exactly their
#: ODE, dpm++2m / dpm++3m; :class:`DPMSolverPP`). DDPM's variance is the model's; it ignores ``eta``.
DEFAULT_ETA: dict[str, float] = {"ddpm": 0.0, "ddim": 0.0, "dpm++2m-sde": 1.0, "dpm++3m-sde": 1.0}

#: The multistep solvers (:class:`Multistep`): ``lower_order_final`` is theirs.
MULTISTEP = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "unipc", "unipc-bh1")

#: The solvers whose ``order`` is an option, and the orders they take (UniPC; DPM-Solver++'s is in its name).
ORDERS: dict[str, tuple[int, ...]] = {"unipc": (1, 2, 3), "unipc-bh1": (1, 2, 3)}

#: What the last step does. ``denoise`` (the default, as every solver always did): it goes to the data and
#: returns x̂_0 of the last evaluation (k-diffusion's and diffusers' ``final_sigmas_type="zero"``).
#: ``sigma-min``: it is a step of the solver to timestep 0's noise level, landing there without evaluating
#: (diffusers' ``final_sigmas_type="sigma_min"``); see :func:`chain_timesteps`.
FINAL_STEPS = ("denoise", "sigma-min")

#: The solvers whose last step may land short of the data (``final_step``, ``final_alpha_cumprod``).
FINAL_STEP_SAMPLERS = ("ddim", *MULTISTEP)

#: What every entry point samples with when not told (``ddpm sample``, the training previews,
#: :meth:`GaussianDiffusion.sample`, :class:`ddpm.generate.SamplerSettings`): the solver and NFE
#: that ``python -m bench.solvers`` picked on a trained MNIST model (bench/RESULTS.md).
#: ``sampler="ddpm"`` is the paper's Algorithm 2 over all T steps.
DEFAULT_SAMPLER = "dpm++2m-sde"
DEFAULT_NFE = 20

#: The solver for the NFE asked, when no sampler is given (:func:`default_sampler`; ``ddpm sample --steps N``,
#: :func:`sample`, :class:`ddpm.generate.SamplerSettings`): the entry of the largest NFE here not above N
#: (the smallest entry's below them). Measured by ``python -m bench.solvers`` on the 30-minute ``mnist``
#: model (FD of 500 samples in the MNIST classifier's features; bench/RESULTS.md, 2026-12-02; DDPM-1000:
#: 9.8): at 5 NFE unipc-bh1 (trailing) 26.8 against the best SDE solver's 33.3; at 7 they tie (17.5 and
#: dpm++3m-sde's 17.6); at 10 and 15 the SDE solvers lead (dpm++3m-sde 10.5 and 14.0, dpm++2m-sde 13.2
#: and 14.5, the best ODE solver 16.3 and 16.4). 20 NFE is :data:`DEFAULT_SAMPLER`, chosen on the earlier
#: 10,626-step model and confirmed on this one: 8.7 (dpm++3m-sde 8.7, the ODE solvers 16.5-16.8).
DEFAULT_SAMPLER_BY_NFE: dict[int, str] = {
    5: "unipc-bh1",
    10: "dpm++3m-sde",
    DEFAULT_NFE: DEFAULT_SAMPLER,
}


def default_sampler(nfe: int | None) -> str:
    """The sampler for ``nfe`` network evaluations when none is given (:data:`DEFAULT_SAMPLER_BY_NFE`);
    ``None`` (the default NFE): :data:`DEFAULT_SAMPLER`."""
    if nfe is None:
        return DEFAULT_SAMPLER
    below = [n for n in DEFAULT_SAMPLER_BY_NFE if n <= nfe]
    return DEFAULT_SAMPLER_BY_NFE[max(below) if below else min(DEFAULT_SAMPLER_BY_NFE)]


def default_steps(sampler: str, T: int) -> int | None:
    """The NFE ``sampler`` spends when not told: all T for ``ddpm`` (Algorithm 2), none for
    ``dpm-adaptive`` (it picks its own), :data:`DEFAULT_NFE` (at most T) for the others."""
    if sampler == "ddpm":
        return T
    return None if sampler == "dpm-adaptive" else min(DEFAULT_NFE, T)


def _solver_class(sampler: str) -> type[Solver]:
    make = SAMPLERS[sampler]
    return make.func if isinstance(make, partial) else make  # type: ignore[return-value]


def network_evaluations(sampler: str, K: int) -> int:
    """The number of network evaluations (NFE) ``sampler`` spends on K kept timesteps."""
    return _solver_class(sampler).evaluations(K)


#: Imagen's percentile for dynamic thresholding (Saharia et al. 2022, section 2.3; imagen-pytorch's default):
#: see :func:`ddpm.diffusion.dynamic_thresholding`.
DYNAMIC_THRESHOLD = 0.995


def check_dynamic_threshold(p: float | None) -> None:
    """:class:`UserError` unless ``p`` is None or a percentile in (0, 1]."""
    if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 < p <= 1.0):
        raise UserError(f"the dynamic threshold is a percentile in (0, 1] (Imagen's: {DYNAMIC_THRESHOLD}), got {p!r}")


def check_sampler_arguments(
    T: int, sampler: str, steps: int | None, eta: float | None, spacing: str | None = None, rtol: float | None = None,
    order: int | None = None, lower_order_final: bool = True, final_step: str = "denoise",
) -> None:
    """Raise :class:`UserError` unless ``sampler``, ``steps`` (1..T or None; None for dpm-adaptive),
    ``eta`` (None, or in [0, 1] and 0 but for :data:`DEFAULT_ETA`'s solvers), ``spacing`` (a name of
    :data:`SPACINGS` or None), ``rtol`` (dpm-adaptive's, > 0), ``order`` (:data:`ORDERS`),
    ``lower_order_final`` (:data:`MULTISTEP`'s) and ``final_step`` (:data:`FINAL_STEPS`) are valid."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must lie in [0, 1], got {eta}")
    if eta and sampler not in DEFAULT_ETA:
        raise UserError(f"eta is DDIM's and the SDE solvers' ({', '.join(DEFAULT_ETA)}); the {sampler} sampler "
                        f"takes none (got eta={eta})")
    if steps is not None and not 1 <= steps <= T:
        raise UserError(f"the number of sampling steps must be between 1 and T={T}, got {steps}")
    if sampler == "dpm-adaptive" and (steps is not None or spacing is not None):
        raise UserError("dpm-adaptive chooses its own steps: give it rtol instead of steps or a spacing")
    if rtol is not None and (sampler != "dpm-adaptive" or not rtol > 0):
        raise UserError(f"rtol is dpm-adaptive's and must be > 0 (got sampler {sampler!r}, rtol={rtol})")
    if spacing is not None and spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    _check_solver_options(sampler, order, lower_order_final, final_step)


def _check_solver_options(sampler: str, order: int | None, lower_order_final: bool, final_step: str) -> None:
    if order is not None and order not in ORDERS.get(sampler, ()):
        raise UserError(f"order is UniPC's, 1, 2 or 3 (DPM-Solver++'s is in its name: dpm++2m, dpm++3m); got "
                        f"order={order!r} for the {sampler} sampler")
    if not isinstance(lower_order_final, bool) or (not lower_order_final and sampler not in MULTISTEP):
        raise UserError(f"lower_order_final (true or false) is the multistep solvers' ({', '.join(MULTISTEP)}); "
                        f"got {lower_order_final!r} for the {sampler} sampler")
    if final_step not in FINAL_STEPS:
        raise UserError(f"unknown final step {final_step!r}; choose one of {', '.join(FINAL_STEPS)}")
    if final_step != "denoise" and sampler not in FINAL_STEP_SAMPLERS:
        raise UserError(f"the final step {final_step!r} is for {', '.join(FINAL_STEP_SAMPLERS)}; the {sampler} "
                        "sampler ends with x̂_0 (denoise)")


def kept_timesteps(
    diffusion: GaussianDiffusion, sampler: str, steps: int | None, spacing: str | None = None
) -> list[int]:
    """The 0-based timesteps ``sampler`` visits for ``steps`` network evaluations (None: T).

    ``spacing`` (default :data:`DEFAULT_SPACING`) chooses them; Heun keeps ⌊(steps+1)/2⌋.
    """
    T = diffusion.num_timesteps
    K = _solver_class(sampler).kept_steps(T if steps is None else steps)
    return SPACINGS[spacing or DEFAULT_SPACING[sampler]](diffusion.alphas_cumprod, K)


# ---------------------------------------------------------------------------- the loop


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """A standard-normal draw; with one generator per sample, sample i's entries come from generator i
    alone, so a sample does not depend on the batch it is drawn in."""
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
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    spacing: str | None = None,
    generator: Generators = None,
    progress: bool = False,
    return_trajectory: bool = False,
    trajectory_every: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    timesteps: Sequence[int] | None = None,
    rtol: float | None = None,
    stats: dict[str, int] | None = None,
    dynamic_threshold: float | None = None,
    after_step: AfterStep | None = None,
    final_alpha_cumprod: float | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    order: int | None = None,
    lower_order_final: bool = True,
    final_step: str = "denoise",
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Draw samples x_0 ~ p_θ by solving the reverse process from x_T ~ N(0, I).

    Args:
        sampler: a name of :data:`SAMPLERS`: ``"ddpm"`` ([DDPM] Algorithm 2), ``"ddim"`` ([DDIM] eq. 12),
            ``"dpm++2m"``, ``"dpm++3m"``, ``"dpm++2m-sde"``, ``"dpm++3m-sde"`` ([DPM++]), ``"unipc"``,
            ``"unipc-bh1"`` ([UniPC]), ``"heun"`` ([EDM] Algorithm 1) or ``"dpm-adaptive"`` (its own steps
            from ``rtol``); ``None``: the one for the NFE asked, :func:`default_sampler`.
        steps: the number of network evaluations (NFE); ``None``: :func:`default_steps` (all T
            for ``ddpm``, :data:`DEFAULT_NFE` for the others). Every solver but Heun evaluates
            once per kept timestep; Heun keeps ⌊(steps+1)/2⌋ and spends 2K − 1.
        eta: DDIM's η in [0, 1] (0: deterministic; 1: DDPM's posterior variance) or the SDE solvers' noise
            amount (1: the reverse SDE; 0: their ODE); ``None``: :data:`DEFAULT_ETA`; others take none.
        order, lower_order_final: UniPC's order (1–3; default 3) and the multistep solvers' lower orders at
            the last steps (:class:`Multistep`); ``final_step``: :data:`FINAL_STEPS` (:func:`chain_timesteps`).
        spacing: which timesteps to keep, a name of :data:`~ddpm.schedules.SPACINGS` (default:
            :data:`DEFAULT_SPACING`); ``timesteps`` gives the kept steps explicitly instead.
        generator: makes the draws (x_T and every z) reproducible; it must live on ``device``. One
            generator per sample draws sample i's x_T and noise from it alone (the same image in any batch).
        progress: show a progress bar over the steps.
        return_trajectory: also return ``{"timesteps": [n], "x_t": [n, *shape],
            "pred_x0": [n, *shape]}`` (on the CPU) every ``trajectory_every`` steps, the last
            step always included; ``timesteps`` are original 0-based timesteps, ``x_t`` the point
            where the network was evaluated (before a UniPC correction).
        model_kwargs: passed to the model (:meth:`~GaussianDiffusion.model_output`), e.g. ``{"y": labels}``.
        clip_denoised: clip x̂_0 to [−1, 1]; the ODE solvers then integrate with the clipped x̂_0.
        dynamic_threshold: Imagen's dynamic thresholding of x̂_0 at this percentile in place of the clip.
        noise: x at the first kept step (x_T, or an img2img start) instead of a fresh draw.
        after_step: :data:`AfterStep`, its return value replaces x after every step (e.g. inpainting's
            replacement of the known pixels, :mod:`ddpm.inpaint`).
        rtol: dpm-adaptive's relative tolerance (default 0.05); it takes no ``steps``.
        stats: if given, filled with ``{"nfe": network evaluations spent}``.
        final_alpha_cumprod: the ᾱ the last step lands at (default 1, x̂_0; see :class:`DDIM`).
        callback: hears each step as the trajectory does (:func:`heard`); an exception it raises stops the chain.

    Returns x_0 [*shape] (and the trajectory if asked).
    """
    check_dynamic_threshold(dynamic_threshold)
    sampler, d, solver = _chain_and_solver(diffusion, sampler, steps, spacing, timesteps, final_step, eta, rtol,
                                           final_alpha_cumprod, order, lower_order_final)
    x = randn(shape, generator, device, dtype) if noise is None else noise.to(device or noise.device, dtype)
    draw = partial(randn, x.shape, generator, x.device, x.dtype)  # fresh noise shaped like x, for a solver
    denoise = _Network(d, model, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                       dynamic_threshold=dynamic_threshold)
    record = _Trajectory(trajectory_every) if return_trajectory else None
    listeners = [f for f in (record, callback) if f is not None]
    bar = {"desc": f"{sampler} sampling", "disable": not progress}
    x = _solve(d, solver, x, denoise, draw, listeners, bar, after_step, 0 if final_step == "sigma-min" else -1)
    if stats is not None:
        stats["nfe"] = denoise.nfe
    return x if record is None else (x, record.result())


class _Network:
    """:func:`sample`'s ``denoise``: the chain's ``p_mean_variance`` at kept step k, counting the calls."""

    def __init__(self, d: GaussianDiffusion, model: Model, **kwargs: Any) -> None:
        self.d, self.model, self.kwargs, self.nfe = d, model, kwargs, 0

    def __call__(self, x: Tensor, k: int) -> dict[str, Tensor]:
        self.nfe += 1
        return self.d.p_mean_variance(self.model, x, _timestep(k, x), **self.kwargs)


def _solve(d: GaussianDiffusion, solver: Solver, x: Tensor, denoise: Denoise, draw: Noise,
           listeners: Sequence[Callable[[dict[str, Any]], None]], bar: dict[str, Any], after_step: AfterStep | None,
           end: int) -> Tensor:
    """The loop: kept steps k = K−1, ..., 0 (0-based), one network evaluation and one solver step each; the
    last lands at original timestep ``end`` (−1: the data), which ``after_step`` hears."""
    k, n = d.num_timesteps - 1, 0
    with tqdm(total=d.num_timesteps, unit="step", leave=False, **bar) as progress:
        while k >= 0:
            p = denoise(x, k)
            for listen in listeners:
                listen(heard(d, n, k, x, p["pred_x0"]))
            x, n = solver.step(x, k, p, denoise, draw), n + 1
            progress.update(k - solver.next_step(k))
            k = solver.next_step(k)
            if after_step is not None:
                x = after_step(x, end if k < 0 else int(d.timestep_map[k]))
    return x


def chain_timesteps(diffusion: GaussianDiffusion, sampler: str, steps: int | None, spacing: str | None = None,
                    timesteps: Sequence[int] | None = None, final_step: str = "denoise") -> list[int]:
    """The 0-based kept timesteps (ascending) at which :func:`sample` evaluates the network for these
    arguments: ``timesteps`` if given, else those of :func:`kept_timesteps` (at :func:`default_steps`
    when ``steps`` is None).

    With ``final_step="sigma-min"`` the chain lands on timestep 0 without evaluating there: 0 is dropped
    from ``timesteps``, and a spacing that keeps 0 is taken for one point more and its 0 dropped, so that
    the ``steps`` evaluations lie above it (``trailing`` and ``leading``'s own points, say, stay as they are).
    """
    if timesteps is not None:
        kept = sorted(set(int(t) for t in timesteps))
    else:
        T = diffusion.num_timesteps
        steps = default_steps(sampler, T) if steps is None else steps
        kept = kept_timesteps(diffusion, sampler, steps, spacing)
        if final_step == "sigma-min" and kept[0] == 0 and steps is not None and steps < T:
            kept = kept_timesteps(diffusion, sampler, steps + 1, spacing)
    if final_step == "sigma-min" and kept[0] == 0:
        kept = kept[1:]
        if not kept:
            raise UserError("final step 'sigma-min' lands on timestep 0, and the chain has no other to evaluate")
    return kept


def heard(d: GaussianDiffusion, n: int, k: int, x_t: Tensor, pred_x0: Tensor) -> dict[str, Any]:
    """What :func:`sample`'s trajectory and callback hear of step ``n`` of the chain ``d``: ``{"step": n,
    "k": k, "total": K, "timestep": t, "x_t": x_t, "pred_x0": x̂_0}``, at kept step k (K − 1, ..., 0; 0 is
    the last), original 0-based timestep t, x_t where the network was evaluated and its x̂_0 there."""
    return {"step": n, "k": k, "total": d.num_timesteps, "timestep": int(d.timestep_map[k]), "x_t": x_t,
            "pred_x0": pred_x0}


def _chain_and_solver(diffusion: GaussianDiffusion, sampler: str | None, steps: int | None, spacing: str | None,
                      timesteps: Sequence[int] | None, final_step: str, eta: float | None, rtol: float | None,
                      final_alpha_cumprod: float | None, order: int | None,
                      lower_order_final: bool) -> tuple[str, GaussianDiffusion, Solver]:
    """:func:`sample`'s sampler (``None``: :func:`default_sampler`), checked, its chain (the process respaced
    to the kept timesteps) and its solver there."""
    sampler = sampler or default_sampler(len(timesteps) if steps is None and timesteps is not None else steps)
    check_sampler_arguments(diffusion.num_timesteps, sampler, steps, eta, spacing, rtol, order, lower_order_final,
                            final_step)
    d = _kept_chain(diffusion, sampler, steps, spacing, timesteps, final_step)
    if final_step == "sigma-min":
        if final_alpha_cumprod is not None:
            raise UserError("give final_step='sigma-min' or a final alpha-bar, not both")
        final_alpha_cumprod = diffusion.alphas_cumprod[0].item()  # timestep 0's: σ_min
    return sampler, d, _solver(sampler, d, eta, rtol, final_alpha_cumprod, order, lower_order_final)


def _solver(sampler: str, d: GaussianDiffusion, eta: float | None, rtol: float | None,
            final_alpha_cumprod: float | None, order: int | None, lower_order_final: bool) -> Solver:
    """The solver ``sampler`` on the chain ``d``, with the options it takes."""
    options: dict[str, Any] = {"rtol": rtol, "order": order, "final_alpha_cumprod": final_alpha_cumprod}
    if final_alpha_cumprod is not None:
        if sampler not in FINAL_STEP_SAMPLERS:
            raise UserError(f"a final alpha-bar is for {', '.join(FINAL_STEP_SAMPLERS)}; the {sampler} sampler "
                            "ends at the data")
        if not 0.0 < final_alpha_cumprod <= 1.0:
            raise UserError(f"final_alpha_cumprod must lie in (0, 1], got {final_alpha_cumprod}")
    if sampler in MULTISTEP:
        options["lower_order_final"] = lower_order_final
    eta = DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
    return SAMPLERS[sampler](d, eta, **{key: value for key, value in options.items() if value is not None})


def _kept_chain(diffusion: GaussianDiffusion, sampler: str, steps: int | None, spacing: str | None,
                timesteps: Sequence[int] | None, final_step: str) -> GaussianDiffusion:
    """The process respaced to the timesteps the sampler visits (itself when it visits all T)."""
    kept = chain_timesteps(diffusion, sampler, steps, spacing, timesteps, final_step)
    return diffusion if kept == list(range(diffusion.num_timesteps)) else diffusion.respace(kept)


class _Trajectory:
    """The chain every ``every`` steps, the last always included: the original timestep, x_t and
    x̂_0 (on the CPU)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.parts: dict[str, list[Tensor]] = {"timesteps": [], "x_t": [], "pred_x0": []}

    def __call__(self, step: dict[str, Any]) -> None:
        if step["step"] % self.every == 0 or step["k"] == 0:
            timestep = torch.tensor([step["timestep"]], dtype=torch.long)
            for key, value in (("timesteps", timestep), ("x_t", step["x_t"].cpu()), ("pred_x0", step["pred_x0"].cpu())):
                self.parts[key].append(value)

    def result(self) -> dict[str, Tensor]:
        return {"timesteps": torch.cat(self.parts["timesteps"]), "x_t": torch.stack(self.parts["x_t"]),
                "pred_x0": torch.stack(self.parts["pred_x0"])}


def _timestep(k: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
