"""Exact models: data x_0 ~ N(m, s²) per dimension, where the optimal predictors are known.

For such data x_t ~ N(√ᾱ m, v_t) with v_t = ᾱ s² + 1 − ᾱ, and the minimum-MSE predictors are
linear in x_t:

    E[x_0 | x_t] = m + g_t (x_t − √ᾱ m),   g_t = √ᾱ s² / v_t
    E[ε | x_t]   = √(1 − ᾱ) (x_t − √ᾱ m) / v_t
    E[v | x_t]   = √ᾱ E[ε | x_t] − √(1 − ᾱ) E[x_0 | x_t]

Every reverse step is then affine in x_t plus Gaussian noise, so the samplers' output is exactly
Gaussian with a mean and variance that a scalar float64 recursion gives. The recursion below is
written from the papers' equations with the posterior taken from Bayes' rule in precision form,
not from the library. For the bound, every term has a closed form or a one-dimensional integral
(Gauss–Hermite quadrature), which gives its exact expectation.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm import GaussianDiffusion, linear_betas

T = 1000
M, S = 0.1, 0.3
Z = 5.0  # see test_math_forward.py
BETAS = np.linspace(1e-4, 0.02, T)
ACP = np.cumprod(1.0 - BETAS)


def exact_model(mean_type, m=M, s=S, alphas_cumprod=ACP):
    """The minimum-MSE predictor for N(m, s²) data under the process with these ᾱ (default: the
    linear schedule), called with original 0-based timesteps."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def model(x, t):
        a = acp[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        v_t = a * s * s + 1 - a
        centred = x - a.sqrt() * m
        eps = (1 - a).sqrt() * centred / v_t
        x0 = m + a.sqrt() * s * s / v_t * centred
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[mean_type]

    return model


def gain(i):
    a = ACP[i]
    return math.sqrt(a) * S * S / (a * S * S + 1 - a)


def posterior_coefficients(i):
    """μ̃ = c1 x_0 + c2 x_t and β̃ of q(x_{t−1} | x_t, x_0) by Bayes' rule (precisions add)."""
    if i == 0:
        return 1.0, 0.0, 0.0
    acp_prev = ACP[i - 1]
    var = 1.0 / ((1 - BETAS[i]) / BETAS[i] + 1.0 / (1 - acp_prev))
    return math.sqrt(acp_prev) / (1 - acp_prev) * var, math.sqrt(1 - BETAS[i]) / BETAS[i] * var, var


def ddpm_moments():
    """Mean and variance of ancestral sampling's output with σ_t² = β̃_t and the exact ε model."""
    mean, var = 0.0, 1.0
    for i in range(T - 1, -1, -1):
        c1, c2, beta_tilde = posterior_coefficients(i)
        g = gain(i)
        A = c1 * g + c2
        mean = A * mean + c1 * (M - g * math.sqrt(ACP[i]) * M)
        var = A * A * var + beta_tilde
    return mean, var


def ddim_moments(K):
    """Mean and variance of deterministic DDIM (η = 0) over the kept steps floor(kT/K)."""
    kept = [(k * T) // K for k in range(K)]
    mean, var = 0.0, 1.0
    for j in range(K - 1, -1, -1):
        a = ACP[kept[j]]
        a_prev = ACP[kept[j - 1]] if j > 0 else 1.0
        g = gain(kept[j])
        # x̂0 = A0 x + b0; ε̂ = (x − √a x̂0)/√(1−a); x_prev = √a_prev x̂0 + √(1−a_prev) ε̂.
        A0, b0 = g, M - g * math.sqrt(a) * M
        Ae, be = (1 - math.sqrt(a) * A0) / math.sqrt(1 - a), -math.sqrt(a) * b0 / math.sqrt(1 - a)
        A = math.sqrt(a_prev) * A0 + math.sqrt(1 - a_prev) * Ae
        mean = A * mean + math.sqrt(a_prev) * b0 + math.sqrt(1 - a_prev) * be
        var = A * A * var
    return mean, var


def assert_gaussian_moments(x, mean, var):
    n = x.numel()
    x = x.double().flatten()
    assert abs(x.mean().item() - mean) < Z * math.sqrt(var / n)
    # The output is exactly Gaussian, so the sample variance has standard error var √(2/(n−1)).
    assert abs(x.var().item() - var) < Z * var * math.sqrt(2.0 / (n - 1))


def test_recursions_are_near_the_data_distribution():
    """The derivation itself: the samplers' exact output is close to N(m, s²), biased as theory says."""
    m, v = ddpm_moments()
    assert m == pytest.approx(M, abs=1e-4) and math.sqrt(v) == pytest.approx(S, rel=0.02)
    m, v = ddim_moments(T)
    assert m == pytest.approx(M, abs=1e-3) and math.sqrt(v) == pytest.approx(S, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_ddpm_sampler_with_exact_model(mean_type):
    d = GaussianDiffusion(linear_betas(T), mean_type=mean_type, var_type="fixed_small")
    x = d.sample(exact_model(mean_type), (40_000, 1), sampler="ddpm", generator=torch.Generator().manual_seed(0),
                 clip_denoised=False)
    assert_gaussian_moments(x, *ddpm_moments())


@pytest.mark.slow
@pytest.mark.parametrize("K", [50, 1000])
def test_ddim_sampler_with_exact_model(K):
    d = GaussianDiffusion(linear_betas(T))
    x = d.sample(exact_model("eps"), (40_000, 1), sampler="ddim", steps=K, eta=0.0,
                 generator=torch.Generator().manual_seed(1), clip_denoised=False)
    assert_gaussian_moments(x, *ddim_moments(K))


def test_parameterisations_give_the_same_samples():
    """ε-, x0- and v-models of the same predictor sample identically from the same draws."""
    outs = []
    for mean_type in ["eps", "x0", "v"]:
        d = GaussianDiffusion(linear_betas(T), mean_type=mean_type)
        outs.append(d.sample(exact_model(mean_type), (64, 1, 2, 2), sampler="ddim", steps=20, eta=0.5,
                             generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert torch.allclose(outs[0], outs[1], atol=1e-9) and torch.allclose(outs[0], outs[2], atol=1e-9)


# ---------------------------------------------------------------------------- the bound

H_BIN = 1.0 / 255.0
GRID = np.arange(256) / 127.5 - 1.0
LO = np.where(np.arange(256) == 0, -np.inf, GRID - H_BIN)
HI = np.where(np.arange(256) == 255, np.inf, GRID + H_BIN)


def expected_bound_terms(x0, m=M):
    """E_ε of each term of the bound (bits) for data values x0 on the grid, exact model for N(m, S²).

    Returns (prior [...], terms [..., T]) with column i the term at 0-based step i. L_T: KL of
    Gaussians in closed form. L_{t−1}, t > 1: with fixed β̃ variances the KL is
    (μ̃ − μ_θ)² / (2 β̃), and μ̃ − μ_θ = c1 (x0 − x̂0) with
    x0 − x̂0 = (1 − g√ᾱ)(x0 − m) − g√(1 − ᾱ) ε (the model's own m), whose mean square given x0 is
    c1² [(1 − g√ᾱ)² (x0 − m)² + g² (1 − ᾱ)]. L_0: the decoder's −log₂ P(bin of x0) integrated
    over x_1 by Gauss–Hermite quadrature, with mean x̂0(x_1) and variance β̃_2 (the clipped one).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    a_T = ACP[-1]
    prior = 0.5 * (-1 - math.log(1 - a_T) + (1 - a_T) + a_T * x0**2) / math.log(2)
    terms = np.zeros(x0.shape + (T,))
    for i in range(1, T):
        c1, _, beta_tilde = posterior_coefficients(i)
        a, g = ACP[i], gain(i)
        sq = (1 - g * math.sqrt(a)) ** 2 * (x0 - m) ** 2 + g * g * (1 - a)
        terms[..., i] = c1 * c1 * sq / (2 * beta_tilde) / math.log(2)
    sd = math.sqrt(posterior_coefficients(1)[2])
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    a, g = ACP[0], gain(0)
    k = np.clip(np.rint((x0 + 1) * 127.5).astype(int), 0, 255)
    x1 = math.sqrt(a) * x0[..., None] + math.sqrt(1 - a) * z
    mu = m + g * (x1 - math.sqrt(a) * m)
    p = norm.cdf((HI[k][..., None] - mu) / sd) - norm.cdf((LO[k][..., None] - mu) / sd)
    terms[..., 0] = (w * -np.log2(np.maximum(p, 1e-300))).sum(-1)
    return prior, terms


def assert_matches_expectation(estimates, expected):
    """Per-image estimates [B] against their exact expectations [B]: the residual is noise only."""
    residual = np.asarray(estimates) - np.asarray(expected)
    assert abs(residual.mean()) < Z * residual.std(ddof=1) / math.sqrt(len(residual)) + 1e-12


@pytest.mark.slow
def test_bits_per_dim_with_exact_model_matches_the_analytic_bound():
    """The Monte-Carlo bound equals its exact expectation, term by term, lies above the data's
    true NLL, and a wrong model scores far worse."""
    d = GaussianDiffusion(linear_betas(T))
    g = torch.Generator().manual_seed(0)
    B = 64
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64) * S + M
    x0 = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    out = d.bits_per_dim(exact_model("eps"), x0, clip_denoised=False, max_batch=B * 100, generator=g)

    prior, terms = expected_bound_terms(x0.numpy().reshape(B, -1))
    assert np.allclose(out["prior_bpd"].numpy(), prior.mean(1), rtol=1e-6)  # no noise in L_T
    for i in [0, 1, 2, 5, 20, 100, 500, 999]:
        assert_matches_expectation(out["terms"][:, i].numpy(), terms[..., i].mean(1))
    assert_matches_expectation(out["total_bpd"].numpy(), prior.mean(1) + terms.sum(-1).mean(1))

    # The true NLL of the discretized data is the entropy of its bin probabilities.
    P = norm.cdf((HI - M) / S) - norm.cdf((LO - M) / S)
    entropy = -(P * np.log2(P)).sum()
    prior_grid, terms_grid = expected_bound_terms(GRID)
    expected_total = (P * (prior_grid + terms_grid.sum(-1))).sum()
    assert expected_total >= entropy  # the bound holds…
    assert expected_total - entropy < 0.8  # …with DDPM's own gap (0.76 bits here, mostly L_0 and L_1)
    assert abs(out["total_bpd"].mean().item() - expected_total) < Z * out["total_bpd"].std().item() / math.sqrt(B)

    # A model that believes the mean is m + 0.3 pays for it, exactly as much as predicted.
    wrong = d.bits_per_dim(exact_model("eps", m=M + 0.3), x0, clip_denoised=False, max_batch=B * 100, generator=g)
    prior_w, terms_w = expected_bound_terms(x0.numpy().reshape(B, -1), m=M + 0.3)
    assert_matches_expectation(wrong["total_bpd"].numpy(), prior_w.mean(1) + terms_w.sum(-1).mean(1))
    assert wrong["total_bpd"].mean().item() > expected_total + 0.5

    assert out["terms"].shape == (B, T) and out["prior_bpd"].shape == (B,)
    assert torch.allclose(out["total_bpd"], out["terms"].sum(1) + out["prior_bpd"])
