"""Video sampling on an exact model: Gaussian clips whose frames are correlated.

Data x ~ N(μ, Σ) over (T, H, W) = (4, 2, 2), Σ = s² R ⊗ I with R[i, j] = ρ^|i−j| across frames. The
minimum-MSE ε-model is linear in z_t (x_t = α x + σ ε, α = √ᾱ, σ = √(1 − ᾱ)):

    E[x | z_t] = μ + G (z_t − α μ),  G = α Σ (α² Σ + σ² I)^{-1},   E[ε | z_t] = σ (α² Σ + σ² I)^{-1} (z_t − α μ).

Deterministic DDIM (η = 0) over all T steps is then affine in x_T; with frames a given and replaced by
z_t^a = α x^a + σ ξ (fresh ξ every step), and with reconstruction guidance's correction
x̃^b = x̂^b + w α (∂x̂^a/∂z^b)^T (x^a − x̂^a), every step is affine in (x^b, ξ), so the drawn frames b
are exactly Gaussian with a mean and covariance that the float64 recursion below propagates. The
recursion is written from the papers' equations (DDIM eq. 12, VDM eq. 7) with this test's own
matrices, not the library's; the library's video path (:func:`ddpm.video_sampling.generate_video`,
through the network wrapper and autograd) must draw from it, to within the sampling error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm import GaussianDiffusion
from ddpm.generate import SamplerSettings, image_generators
from ddpm.samplers import SAMPLERS
from ddpm.schedules import linear_betas
from ddpm.video_sampling import FramePlan, generate_video

T_DIFFUSION = 100
BETAS = linear_betas(T_DIFFUSION).numpy()
ACP = np.cumprod(1.0 - BETAS)
FRAMES, H, W = 4, 2, 2
D = FRAMES * H * W
S, RHO = 0.3, 0.8
Z = 5.0  # standard errors: with a few hundred comparisons, a false alarm is still below 1e-4
N = 4000


def covariance(rho=RHO, s=S):
    lag = np.abs(np.arange(FRAMES)[:, None] - np.arange(FRAMES)[None, :])
    return s * s * np.kron(rho ** lag, np.eye(H * W))  # frame-major, as [T, H, W] flattens


MU = np.linspace(-0.2, 0.2, D)


class ExactVideoModel(nn.Module):
    """E[ε | z_t] for N(μ, Σ) clips [B, 1, T, H, W], called with original 0-based timesteps."""

    def __init__(self, sigma: np.ndarray, mu: np.ndarray = MU) -> None:
        super().__init__()
        self.sigma, self.mu = torch.from_numpy(sigma), torch.from_numpy(mu)
        self.acp = torch.from_numpy(ACP)

    sample_shape = (1, FRAMES, H, W)
    num_classes = 0

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.acp[t[0]]
        assert (t == t[0]).all()
        flat = z.reshape(len(z), D).double()
        cov = a * self.sigma + (1 - a) * torch.eye(D, dtype=torch.float64)
        eps = (1 - a).sqrt() * torch.linalg.solve(cov, (flat - a.sqrt() * self.mu).T).T
        return eps.reshape(z.shape).to(z.dtype)


def gain(i, sigma):
    a = ACP[i]
    return math.sqrt(a) * sigma @ np.linalg.inv(a * sigma + (1 - a) * np.eye(D))


def ddim_moments(sigma, given=(), x_a=None, weight=None):
    """Mean and covariance of DDIM's frames b (all but ``given``) over all T steps; with given frames,
    replaced at every step (and with ``weight``, reconstruction guidance)."""
    mask = np.zeros((FRAMES, H * W), bool)
    mask[list(given)] = True
    a_idx, b_idx = np.flatnonzero(mask.ravel()), np.flatnonzero(~mask.ravel())
    nb = len(b_idx)
    mean, cov = np.zeros(nb), np.eye(nb)
    x_a = np.zeros(len(a_idx)) if x_a is None else x_a
    for i in range(T_DIFFUSION - 1, -1, -1):
        a, a_prev = ACP[i], ACP[i - 1] if i > 0 else 1.0
        alpha, sig = math.sqrt(a), math.sqrt(1 - a)
        G = gain(i, sigma)
        # z = S_b x_b + S_a (α x^a + σ ξ); x̂ = G z + (I − αG) μ, as (matrix on x_b, on ξ, constant).
        on_b, on_xi = G[:, b_idx], G[:, a_idx] * sig
        const = G[:, a_idx] @ (alpha * x_a) + (np.eye(D) - alpha * G) @ MU
        x0_b = [on_b[b_idx], on_xi[b_idx], const[b_idx]]
        if weight is not None:
            jac = G[np.ix_(a_idx, b_idx)]  # ∂x̂^a / ∂z^b
            residual = [-on_b[a_idx], -on_xi[a_idx], x_a - const[a_idx]]  # x^a − x̂^a
            x0_b = [p + weight * alpha * jac.T @ r for p, r in zip(x0_b, residual)]
        # DDIM: x_prev = √ā_prev x̃ + √(1 − ā_prev) (x − α x̃)/σ.
        c_x, c_0 = math.sqrt(1 - a_prev) / sig, math.sqrt(a_prev) - math.sqrt(1 - a_prev) * alpha / sig
        F = c_x * np.eye(nb) + c_0 * x0_b[0]
        Hm = c_0 * x0_b[1]
        mean = F @ mean + c_0 * x0_b[2]
        cov = F @ cov @ F.T + Hm @ Hm.T
    return mean, cov, b_idx


def sample(sigma, **kwargs):
    d = GaussianDiffusion(BETAS)
    out = generate_video(ExactVideoModel(sigma), d, N, SamplerSettings("ddim", steps=T_DIFFUSION, clip_denoised=False),
                         seed=0, batch_size=N, progress=False, **kwargs)
    return out.videos.double().reshape(N, D).numpy()


def assert_moments(x, mean, cov):
    """Sample mean and covariance against the exact ones, each entry within Z standard errors (Gaussian:
    Var(S_ij) = (C_ii C_jj + C_ij²) / n)."""
    n = len(x)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < Z * se_mean), np.abs(x.mean(0) - mean) / se_mean
    d = np.diag(cov)
    se_cov = np.sqrt((d[:, None] * d[None, :] + cov**2) / n)
    err = np.abs(np.cov(x, rowvar=False) - cov)
    assert np.all(err < Z * se_cov), (err / se_cov).max()


def test_the_recursion_is_near_the_data_distribution():
    # The derivation itself: DDIM's exact output on T = 100 steps is close to N(μ, Σ).
    mean, cov, _ = ddim_moments(covariance())
    assert np.abs(mean - MU).max() < 0.01
    assert np.abs(cov - covariance()).max() < 0.01


@pytest.mark.slow
def test_the_video_path_samples_the_covariance_across_frames():
    x = sample(covariance())
    assert_moments(x, *ddim_moments(covariance())[:2])
    # And so the frames are as correlated as the data: lag-1 correlation ρ = 0.8, lag 3 ρ³ ≈ 0.51.
    frames = x.reshape(N, FRAMES, H * W)
    lag1 = np.mean([np.corrcoef(frames[:, 0, p], frames[:, 1, p])[0, 1] for p in range(H * W)])
    assert lag1 == pytest.approx(RHO, abs=0.03)


def _true_conditional(sigma, a_idx, b_idx, x_a):
    s_aa, s_ba = sigma[np.ix_(a_idx, a_idx)], sigma[np.ix_(b_idx, a_idx)]
    mean = MU[b_idx] + s_ba @ np.linalg.solve(s_aa, x_a - MU[a_idx])
    cov = sigma[np.ix_(b_idx, b_idx)] - s_ba @ np.linalg.solve(s_aa, s_ba.T)
    return mean, cov


@pytest.mark.slow
@pytest.mark.parametrize("method", ["replacement", "reconstruction"])
def test_conditioning_on_the_first_frame_samples_as_derived(method):
    sigma = covariance()
    x_a = np.full(H * W, 0.4)  # the first frame, well off the mean
    weight = 2.0
    mean, cov, b_idx = ddim_moments(sigma, given=[0], x_a=x_a, weight=weight if method == "reconstruction" else None)
    first = torch.from_numpy(x_a).float().reshape(1, 1, 1, H, W)
    x = sample(sigma, first_frames=first, method=method, guidance_weight=weight)
    assert np.allclose(x[:, :H * W], x_a, atol=1e-6)  # the given frame is kept as given
    assert_moments(x[:, b_idx], mean, cov)


def test_reconstruction_guidance_corrects_replacement_as_vdm_says():
    # On the exact model the derivation shows VDM's point: replacement's frames follow the given one only
    # weakly (the next frame's mean moves less than half the way from the prior's to the true conditional
    # E[x^b | x^a]); reconstruction guidance closes the gap, more with a larger weight (VDM: w_r > 1 is
    # better than the w_r = 1 of their Gaussian approximation), until a large weight overshoots.
    sigma = covariance()
    x_a = np.full(H * W, 0.4)
    replaced, replaced_cov, b_idx = ddim_moments(sigma, given=[0], x_a=x_a)
    truth, truth_cov = _true_conditional(sigma, np.arange(H * W), b_idx, x_a)
    prior = MU[b_idx]
    nxt = slice(0, H * W)  # the frame right after the given one

    def gap(mean):
        return np.abs(mean - truth)[nxt].mean()

    assert (replaced - prior)[nxt].mean() < 0.5 * (truth - prior)[nxt].mean()
    gaps = [gap(ddim_moments(sigma, given=[0], x_a=x_a, weight=w)[0]) for w in (1, 2, 4)]
    assert gap(replaced) > gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.25 * gap(replaced)
    overshoot = ddim_moments(sigma, given=[0], x_a=x_a, weight=16)[0]
    assert (overshoot - truth)[nxt].mean() > gaps[2]
    # The spread narrows toward the conditional's as well (replacement keeps most of the prior's).
    guided_cov = ddim_moments(sigma, given=[0], x_a=x_a, weight=4)[1]
    assert np.trace(truth_cov) < np.trace(guided_cov) * 1.5 and np.trace(guided_cov) < np.trace(replaced_cov)


def test_independent_frames_are_left_alone():
    # With ρ = 0 the given frame says nothing about the others: both methods give the unconditional frames.
    sigma = covariance(rho=0.0)
    x_a = np.full(H * W, 0.4)
    free, free_cov, b_all = ddim_moments(sigma)
    for weight in (None, 3.0):
        mean, cov, b_idx = ddim_moments(sigma, given=[0], x_a=x_a, weight=weight)
        keep = np.isin(b_all, b_idx)
        assert np.allclose(mean, free[keep], atol=1e-12) and np.allclose(cov, free_cov[np.ix_(keep, keep)], atol=1e-12)


def test_frame_plans():
    assert FramePlan(8, 8, 4).windows() == [(0, 8)]
    assert FramePlan(5, 8, 4).windows() == [(0, 5)]
    assert FramePlan(20, 8, 4).windows() == [(0, 8), (4, 8), (8, 8), (12, 8)]
    assert FramePlan(14, 8, 6).windows() == [(0, 8), (2, 8), (4, 8), (6, 8)]
    assert FramePlan(10, 8, 4).windows() == [(0, 8), (4, 6)]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_samples_videos_as_any_tensor(sampler):
    # The solvers do their arithmetic on [B, ...] whatever the rank: the video path's clips
    # [B, 1, T, H, W] are, number for number, what the same sampler draws for the same data flattened to
    # [B, T*H*W] with the same per-clip generators (the same normals in the same order).
    d = GaussianDiffusion(BETAS)
    n, model = 64, ExactVideoModel(covariance())
    settings = SamplerSettings(sampler, rtol=0.05 if sampler == "dpm-adaptive" else None, clip_denoised=False)
    out = generate_video(model, d, n, settings, seed=1, batch_size=n, progress=False)
    assert out.videos.shape == (n, 1, FRAMES, H, W) and torch.isfinite(out.videos).all()

    def flat_model(x, t):
        return model(x.reshape(n, 1, FRAMES, H, W), t).reshape(n, D)

    flat = d.sample(flat_model, (n, D), generator=image_generators(1, 0, n, torch.device("cpu")),
                    **settings.sample_kwargs())
    # (generate_video clamps the clips to [-1, 1], as generate does images.)
    torch.testing.assert_close(out.videos.reshape(n, D), flat.float().clamp(-1, 1), rtol=1e-5, atol=1e-5)
    # And, as a video, it has the data's correlation across frames (loosely: each solver's own error).
    frames = out.videos.double().reshape(n, FRAMES, H * W)
    assert np.corrcoef(frames[:, 0].flatten(), frames[:, 1].flatten())[0, 1] > 0.5
