"""Inpainting against the true conditional of Gaussian data.

For data x_0 ~ N(m, Σ) with a correlated Σ, x_t ~ N(√ᾱ m, C_t) with C_t = ᾱΣ + (1 − ᾱ)I, and the
minimum-MSE ε-model is linear: E[ε | x_t] = √(1 − ᾱ) C_t⁻¹ (x_t − √ᾱ m). The unknown coordinates given
the known ones are exactly N(m_u + Σ_uk Σ_kk⁻¹ (x_k − m_k), Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku) (the Schur
complement): an answer the samplers never compute. Every step is affine in Gaussians, so the methods'
outputs are Gaussian and their sample moments have the usual standard errors.

What the measurement showed (4,000 draws, Σ_ij = 0.25 · 0.9^|i−j| on 4 coordinates, two known ones
1.5 and 2 standard deviations above their means; ``python tests/test_math_inpaint.py`` prints it):
on 250 DDPM steps the replacement method misses the conditional mean by 0.23 (40 standard errors;
DPM-Solver++ replacement by 0.42); RePaint with jumps of 10 closes the gap as the resamples grow, r =
1, 2, 5, 10: mean error 0.23, 0.10, 0.005, 0.003, KL to the true conditional 0.31, 0.069, 0.012, 0.011,
and at r = 10 (the paper's default) it is the true conditional within the standard errors. On 100
steps the mean error is 0.24, 0.12, 0.056, 0.030 at r = 1, 2, 3, 5; on a coarse chain (50 steps)
resampling still helps (0.26, 0.16, 0.12 at r = 1, 2, 5) but stops short of the truth: the DDPM steps'
own discretisation error remains.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import GaussianDiffusion, linear_betas
from ddpm.errors import UserError
from ddpm.inpaint import check_mask, repaint_chain, repaint_nfe, repaint_schedule, replacement_step
from ddpm.samplers import sample

Z = 5.0
T = 1000
MEAN = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
_i = torch.arange(4)
SIGMA = 0.25 * 0.9 ** (_i[:, None] - _i[None, :]).abs().double()
KNOWN, UNKNOWN = [0, 1], [2, 3]
MASK = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
X0 = MEAN.clone()
X0[KNOWN] += torch.tensor([2 * 0.5, 1.5 * 0.5], dtype=torch.float64)  # 2 and 1.5 standard deviations up
N = 4000


def gaussian_eps_model(diffusion: GaussianDiffusion):
    """E[ε | x_t] for N(MEAN, SIGMA) data, by original 0-based timestep (one per batch)."""
    acp = diffusion.alphas_cumprod
    gains = (1 - acp).sqrt()[:, None, None] * torch.linalg.inv(
        acp[:, None, None] * SIGMA + (1 - acp)[:, None, None] * torch.eye(4, dtype=torch.float64))

    def model(x, t):
        k = int(t[0])
        assert bool((t == k).all())
        return (x - acp[k].sqrt() * MEAN) @ gains[k].T

    return model


def true_conditional() -> tuple[torch.Tensor, torch.Tensor]:
    s_kk, s_uk, s_uu = SIGMA[KNOWN][:, KNOWN], SIGMA[UNKNOWN][:, KNOWN], SIGMA[UNKNOWN][:, UNKNOWN]
    mean = MEAN[UNKNOWN] + s_uk @ torch.linalg.solve(s_kk, X0[KNOWN] - MEAN[KNOWN])
    return mean, s_uu - s_uk @ torch.linalg.solve(s_kk, s_uk.T)


def gaussian_kl(mean: torch.Tensor, cov: torch.Tensor, mean_true: torch.Tensor, cov_true: torch.Tensor) -> float:
    """KL(N(mean, cov) || N(mean_true, cov_true))."""
    inv, delta = torch.linalg.inv(cov_true), mean_true - mean
    k = len(mean)
    return 0.5 * (torch.trace(inv @ cov) + delta @ inv @ delta - k + torch.logdet(cov_true) - torch.logdet(cov)).item()


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = x[:, UNKNOWN]
    return u.mean(0), torch.cov(u.T)


DIFFUSION = GaussianDiffusion(linear_betas(T))
MODEL = gaussian_eps_model(DIFFUSION)


def replacement(sampler: str, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample(DIFFUSION, MODEL, (N, 4), sampler=sampler, steps=steps, generator=g, clip_denoised=False,
                  dtype=torch.float64, after_step=replacement_step(DIFFUSION, X0.expand(N, 4), MASK, g))


def repaint(steps: int, resamples: int, jump_length: int = 10, seed: int = 0) -> torch.Tensor:
    return repaint_chain(DIFFUSION, MODEL, (N, 4), known=X0.expand(N, 4), mask=MASK, steps=steps,
                         jump_length=jump_length, resamples=resamples, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64, clip_denoised=False)


def mean_error(x: torch.Tensor) -> float:
    return (moments(x)[0] - true_conditional()[0]).norm().item()


def standard_error() -> float:
    """Of the norm of the mean error of N draws from the true conditional (its RMS value)."""
    return math.sqrt(torch.trace(true_conditional()[1]).item() / N)


def test_the_known_part_is_exact_and_one_resample_is_the_replacement_method():
    a, b = replacement("ddpm", 50), repaint(50, resamples=1)
    assert torch.equal(a[:, KNOWN], X0[KNOWN].expand(N, 2)) and torch.equal(b[:, KNOWN], a[:, KNOWN])
    # The same draws in the same order: RePaint without resampling is replacement with DDPM steps.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_the_replacement_method_is_biased_and_resampling_narrows_the_gap():
    """On a 100-step chain: replacement misses the conditional mean by many standard errors whichever
    the sampler; RePaint's resampling (jumps of 10) shrinks the error, r = 1 > 2 > 5 (measured 0.24, 0.12,
    0.030), each step down by more than Z standard errors of the difference."""
    se = standard_error()
    for sampler in ("ddpm", "dpm++2m"):
        assert mean_error(replacement(sampler, 100)) > 20 * se, sampler
    errors = [mean_error(repaint(100, r, seed=r)) for r in (1, 2, 5)]
    assert errors[0] > errors[1] + Z * math.sqrt(2) * se and errors[1] > errors[2] + Z * math.sqrt(2) * se, errors


@pytest.mark.slow
def test_repaint_at_its_defaults_draws_the_true_conditional():
    """250 steps, jumps of 10: KL to the true conditional falls with the resamples (measured 0.31, 0.069,
    0.012, 0.011 for r = 1, 2, 5, 10), and at r = 10 the mean and covariance are the true ones within
    Z standard errors, while replacement stays 20 standard errors off."""
    mean_true, cov_true = true_conditional()
    kls = [gaussian_kl(*moments(repaint(250, r, seed=r)), mean_true, cov_true) for r in (1, 2, 5)]
    assert kls[0] > 3 * kls[1] > 3 * kls[2], kls
    x = repaint(250, 10, seed=10)
    mean, cov = moments(x)
    se_mean = (torch.diagonal(cov_true) / N).sqrt()
    assert ((mean - mean_true).abs() < Z * se_mean).all(), (mean, mean_true)
    # Sample covariance entries: Var = (Σ_ii Σ_jj + Σ_ij²) / n for Gaussian draws.
    se_cov = ((torch.outer(torch.diagonal(cov_true), torch.diagonal(cov_true)) + cov_true**2) / N).sqrt()
    assert ((cov - cov_true).abs() < Z * se_cov).all(), (cov, cov_true)
    assert mean_error(replacement("ddpm", 250)) > 20 * standard_error()


def test_the_jump_schedule_is_the_reference_codes_and_its_nfe():
    # RePaint's get_schedule_jump(t_T=10, jump_length=3, jump_n_sample=2), written out by hand:
    # down to 6, up to 9, down to 3, up to 6, down to 0, up to 3, down to -1.
    assert repaint_schedule(10, 3, 2) == [9, 8, 7, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0,
                                          1, 2, 3, 2, 1, 0, -1]
    assert repaint_nfe(10, 3, 2) == 10 + 3 * 3
    assert repaint_nfe(250, 10, 10) == 2410 == 250 + 24 * 9 * 10  # the paper's defaults
    assert repaint_schedule(5, 10, 10) == [4, 3, 2, 1, 0, -1]  # a chain shorter than a jump: no jumps


def test_repaint_tells_its_callback_every_reverse_step_and_stops_when_it_raises():
    heard = []
    chain = dict(known=X0.expand(8, 4), mask=MASK, steps=10, jump_length=3, resamples=2, dtype=torch.float64,
                 clip_denoised=False)
    x = repaint_chain(DIFFUSION, MODEL, (8, 4), generator=torch.Generator().manual_seed(1), callback=heard.append,
                      **chain)
    # Listening changes no draw; it hears the schedule's reverse steps in order, and how many there are.
    assert torch.equal(x, repaint_chain(DIFFUSION, MODEL, (8, 4), generator=torch.Generator().manual_seed(1), **chain))
    schedule = repaint_schedule(10, 3, 2)
    assert [h["k"] for h in heard] == [a for a, b in zip(schedule, schedule[1:]) if b < a]
    assert [h["step"] for h in heard] == list(range(19)) and {h["reverse_steps"] for h in heard} == {19}
    assert heard[0]["pred_x0"].shape == (8, 4) and heard[-1]["timestep"] == 0

    def stop(event):
        if event["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        repaint_chain(DIFFUSION, MODEL, (8, 4), callback=stop, **chain)


def test_masks_that_leave_nothing_to_do_or_do_not_fit_are_user_errors():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(UserError, match="must have one size"):
        check_mask(torch.ones(1, 1, 8, 6), images)
    with pytest.raises(UserError, match="nothing to inpaint"):
        check_mask(torch.ones(1, 1, 8, 8), images)
    with pytest.raises(UserError, match="ddpm sample"):
        check_mask(torch.zeros(1, 1, 8, 8), images)
    check_mask(torch.ones(2, 1, 8, 8).index_fill_(3, torch.tensor([0]), 0), images)


if __name__ == "__main__":
    mean_true, cov_true = true_conditional()
    print(f"standard error of the mean error: {standard_error():.4f}")
    for steps in (50, 100, 250):
        for sampler in ("ddpm", "dpm++2m"):
            error = mean_error(replacement(sampler, steps))
            print(f"{steps} steps, replacement with {sampler}: mean error {error:.4f}")
        for r in (1, 2, 5, 10):
            x = repaint(steps, r, seed=r)
            kl = gaussian_kl(*moments(x), mean_true, cov_true)
            print(f"{steps} steps, RePaint r={r} ({repaint_nfe(steps, 10, r)} NFE): mean error {mean_error(x):.4f}, "
                  f"KL {kl:.4f}")
