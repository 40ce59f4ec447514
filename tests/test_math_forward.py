"""Oracles for the forward process, the posterior, the schedules and the parameterisations.

Each test compares the library with something it did not compute: a simulated Markov chain,
Bayes' rule evaluated on a grid, a closed form of the schedule, or an algebraic identity.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm import GaussianDiffusion, cosine_betas, even_timesteps, linear_betas, space_timesteps
from ddpm.errors import UserError
from ddpm.schedules import get_betas, scaled_linear_betas

# Two-sided z for the statistical tests: P(|Z| > 5) = 5.7e-7 per comparison, so a suite of a
# few hundred comparisons fails by chance with probability below 1e-4 (and the seeds are fixed).
Z = 5.0


# Seconds each: the fast set walks the chain of one schedule, the full suite of all three.
@pytest.mark.parametrize("schedule", ["linear", pytest.param("cosine", marks=pytest.mark.slow),
                                      pytest.param("scaled_linear", marks=pytest.mark.slow)])
def test_markov_chain_matches_closed_form_marginal(schedule):
    """Iterating q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t) reproduces q(x_t | x_0) ([DDPM] eq. 2 → 4)."""
    T, N = 1000, 50_000
    betas = get_betas(schedule, T)
    d = GaussianDiffusion(betas)
    rng = np.random.default_rng(0)
    x0 = np.array([-1.0, -0.3, 0.5, 1.0])
    x = np.tile(x0, (N, 1))
    b = betas.numpy()
    checkpoints = {1, 10, 100, 500, 1000}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, T + 1):  # the paper's t
        x = np.sqrt(1.0 - b[step - 1]) * x + np.sqrt(b[step - 1]) * rng.standard_normal(x.shape)
        if step not in checkpoints:
            continue
        t = torch.full((N * 4,), step - 1)
        acp = d.alphas_cumprod[step - 1].item()
        mean, var = np.sqrt(acp) * x0, 1.0 - acp
        # The chain against the closed form of the library's ᾱ.
        assert np.all(np.abs(x.mean(0) - mean) < Z * np.sqrt(var / N))
        assert np.all(np.abs(x.var(0, ddof=1) - var) < Z * var * np.sqrt(2.0 / (N - 1)))
        # q_sample's draws against the chain's moments (both estimated: the variances add).
        xs = d.q_sample(torch.tensor(np.tile(x0, N)), t, generator=gen).reshape(N, 4).numpy()
        assert np.all(np.abs(xs.mean(0) - x.mean(0)) < Z * np.sqrt(2 * var / N))
        assert np.all(np.abs(xs.var(0, ddof=1) - x.var(0, ddof=1)) < Z * var * np.sqrt(4.0 / (N - 1)))


@pytest.mark.parametrize("step", [2, 3, 10, 250, 999])
def test_posterior_is_bayes_rule_on_a_grid(step):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised numerically ([DDPM] eqs. 6–7)."""
    T = 1000
    d = GaussianDiffusion(linear_betas(T))
    b = linear_betas(T).numpy()
    acp = np.cumprod(1.0 - b)
    rng = np.random.default_rng(step)
    i = step - 1  # 0-based index of the paper's t = step
    for _ in range(3):
        x0, xt = rng.uniform(-1, 1), rng.normal()
        # The grid spans both factors' centres with 12 of the wider standard deviation to spare.
        centers = [xt / np.sqrt(1 - b[i]), np.sqrt(acp[i - 1]) * x0]
        spread = 12 * max(np.sqrt(b[i] / (1 - b[i])), np.sqrt(1 - acp[i - 1]))
        grid = np.linspace(min(centers) - spread, max(centers) + spread, 400_001)
        log_density = norm.logpdf(xt, np.sqrt(1 - b[i]) * grid, np.sqrt(b[i])) + norm.logpdf(
            grid, np.sqrt(acp[i - 1]) * x0, np.sqrt(1 - acp[i - 1])
        )
        w = np.exp(log_density - log_density.max())
        w /= np.trapezoid(w, grid)
        mean = np.trapezoid(w * grid, grid)
        var = np.trapezoid(w * (grid - mean) ** 2, grid)
        got_mean, got_var, got_logvar = d.q_posterior(
            torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([i])
        )
        assert got_mean.item() == pytest.approx(mean, rel=1e-7, abs=1e-9)
        assert got_var.item() == pytest.approx(var, rel=1e-6)
        assert got_logvar.item() == pytest.approx(math.log(var), abs=1e-6)


def test_posterior_at_first_step_is_the_data():
    """At the paper's t = 1 the posterior q(x_0 | x_1, x_0) is a point mass at x_0."""
    d = GaussianDiffusion(linear_betas(1000))
    x0 = torch.tensor([[0.25, -0.5]], dtype=torch.float64)
    mean, var, _ = d.q_posterior(x0, torch.randn(1, 2, dtype=torch.float64), torch.tensor([0]))
    assert torch.allclose(mean, x0, atol=1e-12)
    assert torch.all(var == 0)


def test_forward_variance_keeps_float64_precision_for_float32_data():
    """q's variance 1 − ᾱ_t comes from the float64 buffers, not from 1 − ᾱ in the data's dtype."""
    d = GaussianDiffusion(linear_betas(1000))
    t = torch.tensor([0, 1, 2])
    _, var, log_var = d.q_mean_variance(torch.zeros(3, 1), t)
    exact = 1 - torch.cumprod(1 - linear_betas(1000), 0)[t]
    assert var.dtype == torch.float32
    assert torch.allclose(var.double().flatten(), exact, rtol=1e-6)
    assert torch.allclose(log_var.double().flatten(), exact.log(), rtol=1e-6)


def test_linear_schedule_endpoints_and_scaling():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # Improved DDPM scales both ends by 1000 / T.
    b4 = linear_betas(4000)
    assert b4[0].item() == pytest.approx(2.5e-5) and b4[-1].item() == pytest.approx(0.005)
    with pytest.raises(UserError):
        linear_betas(10)  # β_T would be 2
    with pytest.raises(UserError):
        linear_betas(0)


def test_cosine_schedule_telescopes_to_closed_form():
    """Π(1 − β_t) equals ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) π/2) ([IDDPM] eq. 17), until the clip."""
    T, s = 1000, 0.008
    b = cosine_betas(T)
    acp = torch.cumprod(1 - b, 0).numpy()
    t = np.arange(1, T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    clipped = int(np.argmax(b.numpy() >= 0.999)) if (b >= 0.999).any() else T
    assert clipped > 990  # only the last steps are clipped
    assert np.allclose(acp[:clipped], f[:clipped], rtol=1e-10, atol=1e-15)
    assert b.max().item() == pytest.approx(0.999) and torch.all(b.diff() >= 0)


def test_scaled_linear_schedule_is_ldms():
    """LDM's schedule (make_beta_schedule "linear", linear_start 0.00085, linear_end 0.012): equal
    steps in √β, whatever T; ᾱ_T for T = 1000 is the 0.0047 Stable Diffusion's samplers start from."""
    for T in (1000, 50):
        b = scaled_linear_betas(T)
        assert b.dtype == torch.float64 and len(b) == T
        assert b[0].item() == pytest.approx(0.00085, rel=1e-12) and b[-1].item() == pytest.approx(0.012, rel=1e-12)
        step = (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)
        assert torch.allclose(b.sqrt().diff(), torch.full((T - 1,), step, dtype=torch.float64), rtol=1e-9)
    acp_T = math.prod(1 - (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
                      for i in range(1000))
    assert torch.cumprod(1 - scaled_linear_betas(1000), 0)[-1].item() == pytest.approx(acp_T, rel=1e-9)
    assert 0.0046 < acp_T < 0.0048


def test_kept_timesteps():
    assert even_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert even_timesteps(1000, 1000) == list(range(1000))
    assert even_timesteps(10, 3) == [0, 3, 6]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # improved-diffusion's docstring example: 300 steps cut into sections of 10, 15 and 20.
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and kept[:2] == [0, 11] and kept[9] == 99 and kept[10] == 100 and kept[-1] == 299
    with pytest.raises(UserError):
        even_timesteps(100, 101)


def test_respacing_all_steps_is_the_original_process():
    d = GaussianDiffusion(linear_betas(1000), var_type="fixed_large")
    r = d.respace(range(1000))
    assert torch.allclose(r.betas, d.betas, rtol=1e-12)
    assert torch.equal(r.timestep_map, torch.arange(1000))
    assert torch.allclose(r.posterior_variance, d.posterior_variance, rtol=1e-10, atol=1e-20)


def test_respacing_keeps_the_marginals_at_kept_steps():
    d = GaussianDiffusion(cosine_betas(1000))
    kept = [0, 7, 100, 101, 640, 999]
    r = d.respace(kept)
    assert torch.allclose(torch.cumprod(1 - r.betas, 0), d.alphas_cumprod[kept], rtol=1e-12)
    assert r.timestep_map.tolist() == kept
    # Respacing a respaced process composes the maps.
    assert r.respace([1, 4]).timestep_map.tolist() == [7, 640]


def test_parameterisation_conversions_invert_each_other():
    d = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, noise=eps)
    assert torch.allclose(d.predict_x0_from_eps(x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-7)
    assert torch.allclose(d.predict_x0_from_v(x_t, t, d.get_v(x0, eps, t)), x0, atol=1e-12)
    # v is the rotation of (x0, ε) by the angle φ with tan φ = √(1-ᾱ)/√ᾱ: norms are kept.
    a = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = d.get_v(x0, eps, t)
    assert torch.allclose(v**2 + x_t**2, x0**2 + eps**2, atol=1e-12)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-12)


@pytest.mark.parametrize("step", [0, 1, 500, 999])
def test_learned_range_extremes_are_beta_and_beta_tilde(step):
    """[IDDPM] eq. 15: v = 1 gives σ² = β_t, v = −1 gives β̃_t (β̃_2 at t = 1, where β̃_1 = 0 is clipped)."""
    betas = cosine_betas(1000)
    d = GaussianDiffusion(betas, var_type="learned_range")
    acp = torch.cumprod(1 - betas, 0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    beta_tilde = betas * (1 - acp_prev) / (1 - acp)
    x_t = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([step])
    expected_small = beta_tilde[max(step, 1)]
    for v, expected in [(1.0, betas[step]), (-1.0, expected_small)]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        p = d.p_mean_variance_from_output(out, x_t, t)
        assert torch.allclose(p["variance"], expected.expand_as(x_t), rtol=1e-10)
    # v = 0 is the geometric mean.
    out = torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], dim=1)
    p = d.p_mean_variance_from_output(out, x_t, t)
    assert torch.allclose(p["variance"], (betas[step] * expected_small).sqrt().expand_as(x_t), rtol=1e-10)


def test_fixed_variances():
    betas = linear_betas(1000)
    d_small = GaussianDiffusion(betas, var_type="fixed_small")
    d_large = GaussianDiffusion(betas, var_type="fixed_large")
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    for step in [1, 10, 999]:
        t = torch.tensor([step])
        assert d_large.p_mean_variance_from_output(x, x, t)["variance"][0, 0, 0, 0] == pytest.approx(betas[step].item())
        assert d_small.p_mean_variance_from_output(x, x, t)["variance"][0, 0, 0, 0] == pytest.approx(
            d_small.posterior_variance[step].item()
        )


def test_invalid_construction_is_a_user_error():
    with pytest.raises(UserError):
        GaussianDiffusion([0.1, 1.0])
    with pytest.raises(UserError):
        GaussianDiffusion([0.1, -0.1])
    with pytest.raises(UserError):
        GaussianDiffusion([])
    with pytest.raises(UserError):
        GaussianDiffusion([0.1], mean_type="score")
    with pytest.raises(UserError):
        GaussianDiffusion([0.1], var_type="learned")
