"""Oracles for the KL, the discretized decoder, the training losses and timestep sampling."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

import ddpm.losses as ddpm_losses
from ddpm import GaussianDiffusion, linear_betas
from ddpm.errors import UserError
from ddpm.losses import HYBRID_LAMBDA, discretized_gaussian_log_likelihood, normal_kl
from ddpm.timestep_sampling import LossAwareSampler, UniformSampler, make_timestep_sampler

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1.0], [1.0], [3.0], [3.0]], dtype=torch.float64)
    m1, m2, lv1, lv2 = torch.randn(4, 1000, generator=g, dtype=torch.float64) * scale
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.3, 0.05), (-0.97, 0.01), (0.999, 0.002), (0.2, 3e-4), (-2.0, 0.5)])
def test_decoder_bins_sum_to_one_and_match_integration(mean, std):
    """The 256 bin probabilities sum to 1 and each equals ∫ N(x; μ, σ²) dx over its bin."""
    mu = torch.full((256,), mean, dtype=torch.float64)
    logvar = torch.full((256,), 2 * math.log(std), dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(GRID, mu, logvar)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    h = 1.0 / 255.0
    for k in [0, 1, 64, 127, 128, 200, 254, 255]:
        lo = -np.inf if k == 0 else GRID[k].item() - h
        hi = np.inf if k == 255 else GRID[k].item() + h
        p, _ = integrate.quad(lambda x: norm.pdf(x, mean, std), lo, hi, epsabs=1e-300, epsrel=1e-12,
                              points=None if np.isinf(lo) or np.isinf(hi) else [mean] if lo < mean < hi else None)
        if p > 1e-200:
            assert logp[k].item() == pytest.approx(math.log(p), rel=1e-6, abs=1e-9)


def test_decoder_is_accurate_far_in_the_tails():
    """Far from the mean the log-probability stays finite and matches scipy's log-CDF / log-survival."""
    h = 1.0 / 255.0
    cases = [(1.0, 0.0, 1e-3), (-1.0, 0.0, 1e-3), (0.5, -0.5, 0.01), (-0.5, 0.5, 0.01)]
    for x, mean, std in cases:
        got = discretized_gaussian_log_likelihood(
            torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
            torch.tensor([2 * math.log(std)], dtype=torch.float64),
        ).item()
        if x == 1.0:
            expected = norm.logsf((x - h - mean) / std)
        elif x == -1.0:
            expected = norm.logcdf((x + h - mean) / std)
        elif x > mean:  # log(sf(lo) - sf(hi)) = logsf(lo) + log1p(-sf(hi)/sf(lo))
            a, b = norm.logsf((x - h - mean) / std), norm.logsf((x + h - mean) / std)
            expected = a + math.log1p(-math.exp(b - a))
        else:
            a, b = norm.logcdf((x + h - mean) / std), norm.logcdf((x - h - mean) / std)
            expected = a + math.log1p(-math.exp(b - a))
        assert math.isfinite(got) and got < -1000
        assert got == pytest.approx(expected, rel=1e-9)


def _constant_model(value):
    return lambda x, t: torch.full_like(x, value)


def test_simple_loss_is_the_mse_of_the_target():
    """L_simple = ‖target − prediction‖² averaged over dimensions, with the target by parameterisation."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    acp = torch.cumprod(1 - linear_betas(1000), 0)[t].reshape(-1, 1, 1, 1)
    targets = {"eps": noise, "x0": x0, "v": acp.sqrt() * noise - (1 - acp).sqrt() * x0}
    for mean_type, target in targets.items():
        d = GaussianDiffusion(linear_betas(1000), mean_type=mean_type)
        out = d.training_losses(_constant_model(0.25), x0, t, "simple", noise=noise)
        assert torch.allclose(out["loss"], ((target - 0.25) ** 2).mean(dim=(1, 2, 3)), atol=1e-12)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_x0_error_weighted_by_the_capped_snr(mean_type):
    """Min-SNR-γ (Hang et al. 2023, eq. 7): the loss is min(SNR_t, γ) ‖x_0 − x̂_0‖², with x̂_0 the
    x_0 the prediction implies, for every parameterisation; γ above every SNR leaves SNR_t ‖x_0 − x̂_0‖²."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 1, 5, 999]), torch.randint(0, 1000, (12,), generator=g)])
    acp = torch.cumprod(1 - linear_betas(1000), 0)[t]
    snr = acp / (1 - acp)
    d = GaussianDiffusion(linear_betas(1000), mean_type=mean_type)
    x_t = acp.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - acp).sqrt().reshape(-1, 1, 1, 1) * noise
    prediction = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # x̂_0 from the prediction by the closed forms, not through the diffusion's own helpers.
    a, s = acp.sqrt().reshape(-1, 1, 1, 1), (1 - acp).sqrt().reshape(-1, 1, 1, 1)
    x0_hat = {"eps": (x_t - s * prediction) / a, "x0": prediction, "v": a * x_t - s * prediction}[mean_type]
    x0_error = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    for gamma, weight in ((5.0, snr.clamp(max=5.0)), (1e9, snr)):
        out = d.training_losses(lambda x, tt: prediction, x0, t, "simple", noise=noise, snr_gamma=gamma)
        assert torch.allclose(out["loss"].double(), weight * x0_error, rtol=1e-5)
        unweighted = d.training_losses(lambda x, tt: prediction, x0, t, "simple", noise=noise)["loss"]
        assert torch.allclose(out["mse"], unweighted)
    with pytest.raises(UserError, match="γ must be positive"):
        ddpm_losses.min_snr_weight(d, t, 0.0, x0)


def test_vlb_loss_at_t0_is_the_decoder_and_elsewhere_the_kl():
    d = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (2, 1, 3, 3), generator=g) / 127.5 - 1).double()
    noise = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    model = _constant_model(0.1)
    t = torch.tensor([0, 400])
    out = d.training_losses(model, x0, t, "vlb", noise=noise)
    x_t = d.q_sample(x0, t, noise=noise)
    p = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    dec = -discretized_gaussian_log_likelihood(x0[0], p["mean"][0], p["log_variance"][0]).mean() / math.log(2)
    qm, _, qlv = d.q_posterior(x0[1:], x_t[1:], t[1:])
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(qm, (0.5 * qlv).exp()),
        torch.distributions.Normal(p["mean"][1:], (0.5 * p["log_variance"][1:]).exp()),
    ).mean() / math.log(2)
    assert out["vb"][0].item() == pytest.approx(dec.item(), rel=1e-9)
    assert out["vb"][1].item() == pytest.approx(kl.item(), rel=1e-9)
    assert torch.allclose(out["loss"], 1000 * out["vb"])


def test_hybrid_loss_stops_the_mean_gradient_in_the_bound():
    """L_hybrid = L_simple + λ T L_t, and the bound's gradient reaches only the variance channels."""
    d = GaussianDiffusion(linear_betas(1000), var_type="learned_range")
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 300, 999])
    param = torch.zeros(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = d.training_losses(lambda x, tt: param + 0.1, x0, t, "hybrid", noise=noise)
    assert torch.allclose(out["loss"], out["mse"] + HYBRID_LAMBDA * 1000 * out["vb"])
    out["loss"].sum().backward()
    grad_mean = param.grad[:, :2].clone()
    param.grad = None
    mse_only = d.training_losses(lambda x, tt: param + 0.1, x0, t, "hybrid", noise=noise)["mse"]
    mse_only.sum().backward()
    assert torch.allclose(grad_mean, param.grad[:, :2], atol=1e-14)
    # …and the variance channels do get a gradient from the bound.
    param.grad = None
    d.training_losses(lambda x, tt: param + 0.1, x0, t, "hybrid", noise=noise)["loss"].sum().backward()
    assert param.grad[:, 2:].abs().sum() > 0


def test_simple_loss_refuses_a_learned_variance():
    d = GaussianDiffusion(linear_betas(1000), var_type="learned_range")
    with pytest.raises(UserError, match="hybrid"):
        d.training_losses(_constant_model(0.0), torch.zeros(1, 1, 2, 2), torch.tensor([3]), "simple")
    with pytest.raises(UserError):
        d.training_losses(_constant_model(0.0), torch.zeros(1, 1, 2, 2), torch.tensor([3]), "l1")
    # …and the hybrid loss refuses a fixed variance, for which its bound term would train nothing.
    with pytest.raises(UserError, match="learned_range"):
        GaussianDiffusion(linear_betas(1000)).training_losses(
            _constant_model(0.0), torch.zeros(1, 1, 2, 2), torch.tensor([3]), "hybrid")


def test_uniform_sampler():
    s = make_timestep_sampler("uniform", 10)
    t, w = s.sample(100_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10).double()
    # Multinomial counts: mean N/T, standard deviation √(N p (1−p)).
    assert torch.all((counts - 10_000).abs() < 5 * math.sqrt(100_000 * 0.1 * 0.9))
    assert torch.all(w == 1.0)


def test_loss_aware_sampler_is_proportional_to_rms_loss_and_unbiased():
    """[IDDPM] eq. 18: p_t ∝ √E[L_t²]; the weights 1/(T p_t) make E_p[w L] the uniform mean of L."""
    T = 6
    s = LossAwareSampler(T, history=4, uniform_prob=0.0)
    assert isinstance(s, UniformSampler) and not s.warmed_up()
    assert torch.allclose(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    losses = {t: [1.0 + t, 2.0 + t, 3.0 + t, 4.0 + t, 5.0 + t] for t in range(T)}
    for k in range(5):
        s.update(torch.arange(T), torch.tensor([losses[t][k] for t in range(T)]))
    assert s.warmed_up()
    # The newest four losses are kept.
    rms = torch.tensor([math.sqrt(np.mean(np.square(losses[t][1:]))) for t in range(T)], dtype=torch.float64)
    assert torch.allclose(s.probabilities(), rms / rms.sum(), rtol=1e-12)
    p = s.probabilities()
    L = torch.arange(T, dtype=torch.float64) ** 2
    assert (p * (1 / (T * p)) * L).sum().item() == pytest.approx(L.mean().item(), rel=1e-12)
    # Draws follow p.
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(t, minlength=T).double() / 200_000
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / 200_000).sqrt())
    assert torch.allclose(w.double(), 1 / (T * p[t]), rtol=1e-6)
    # State round trip.
    s2 = LossAwareSampler(T, history=4, uniform_prob=0.0)
    s2.load_state_dict(s.state_dict())
    assert torch.allclose(s2.probabilities(), p)
