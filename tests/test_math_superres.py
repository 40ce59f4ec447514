"""Super-resolution against answers the code did not compute: the noise augmentation's marginal against
q at the level (imagen-pytorch's log-SNR formula, Monte-Carlo with tolerances from the statistics), the
low-resolution images against Pillow's resize, the training condition's draws, and Imagen's dynamic
thresholding against its definition (NumPy's percentile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, linear_betas
from ddpm.data import Batch
from ddpm.diffusion import dynamic_thresholding
from ddpm.errors import UserError
from ddpm.superres import SuperResolution, augment, augmentation_alphas_cumprod, degrade

Z = 5.0  # standard errors allowed (a false alarm about once in 10⁶ runs)


def imagen_alpha_sigma(s: float) -> tuple[float, float]:
    """imagen-pytorch's continuous 'linear' schedule: log SNR = −log(expm1(1e-4 + 10 s²)),
    α = √sigmoid(log SNR), σ = √sigmoid(−log SNR)."""
    log_snr = -math.log(math.expm1(1e-4 + 10 * s * s))
    sigmoid = 1 / (1 + math.exp(-log_snr))
    return math.sqrt(sigmoid), math.sqrt(1 - sigmoid)


@pytest.mark.parametrize("level", [0.0, 0.2, 0.5, 1.0])
def test_the_augmentation_schedule_is_imagen_pytorchs(level):
    alpha, sigma = imagen_alpha_sigma(level)
    acp = augmentation_alphas_cumprod(torch.tensor(level, dtype=torch.float64)).item()
    assert math.sqrt(acp) == pytest.approx(alpha, rel=1e-12)
    assert math.sqrt(1 - acp) == pytest.approx(sigma, rel=1e-9)


@pytest.mark.parametrize("level", [0.1, 0.2, 0.7])
def test_the_augmented_low_res_image_has_the_marginal_of_q_at_its_level(level):
    """z = augment(x, s) ~ N(α_s x, σ_s² I) per pixel: the sample mean and variance over 40,000 draws per
    pixel, each within Z standard errors (the variance's for a Gaussian: σ² √(2 / (n − 1)))."""
    alpha, sigma = imagen_alpha_sigma(level)
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    n = 40_000
    z = augment(x.expand(n, -1, -1, -1), level, torch.Generator().manual_seed(0))
    mean, var = z.mean(0), z.var(0)
    assert ((mean - alpha * x[0]).abs() < Z * sigma / math.sqrt(n)).all(), (mean, alpha * x[0])
    assert ((var - sigma**2).abs() < Z * sigma**2 * math.sqrt(2 / (n - 1))).all(), var
    # Per sample, one level each: the same marginal at each sample's own level.
    levels = torch.tensor([0.0, level])
    z2 = augment(x.expand(2, -1, -1, -1), levels, noise=torch.ones(2, 3, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(z2[0], math.sqrt(math.exp(-1e-4)) * x[0] + math.sqrt(-math.expm1(-1e-4)))
    torch.testing.assert_close(z2[1], alpha * x[0] + sigma)


def test_a_level_outside_0_1_is_refused():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        augment(torch.zeros(1, 1, 2, 2), 1.5)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_the_low_res_image_is_pillows_bicubic_resize(channels, size):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    small = np.asarray(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).resize(
        (size // 2, size // 2), Image.Resampling.BICUBIC), dtype=np.float64).reshape(size // 2, size // 2, channels)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 127.5 - 1
    ours = ((degrade(x, 2)[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    # Pillow works in fixed point on 8-bit levels and clips; ours in floats: within two levels.
    assert np.abs(ours - small).max() <= 2.0
    with pytest.raises(UserError, match="divisible by 3"):
        degrade(x, 3)


def test_the_training_condition_noises_each_low_res_image_to_its_own_uniform_level():
    """Standardised by its own level, every augmented pixel is N(0, 1); the levels are uniform on
    [0, max_level] (mean max/2, variance max²/12), all drawn from the run's generator."""
    n, max_level = 4000, 0.6
    x = torch.rand(1, 1, 8, 8).mul(2).sub(1).expand(n, -1, -1, -1)
    batch = Batch(x, torch.full((n,), -1), torch.arange(n))
    condition = SuperResolution(factor=2, max_level=max_level)
    out = condition(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    s = out["noise_level"].double()
    assert out["low_res"].shape == (n, 1, 4, 4) and s.shape == (n,)
    assert abs(s.mean().item() - max_level / 2) < Z * max_level / math.sqrt(12 * n)
    assert 0 <= s.min() and s.max() <= max_level
    acp = augmentation_alphas_cumprod(s).reshape(-1, 1, 1, 1)
    eps = (out["low_res"].double() - acp.sqrt() * degrade(x, 2).double()) / (1 - acp).sqrt()
    assert abs(eps.mean().item()) < Z / math.sqrt(eps.numel())
    assert abs(eps.var().item() - 1) < Z * math.sqrt(2 / eps.numel())
    again = condition(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(out[k], again[k]) for k in out)  # a resumed run draws the same


# ---------------------------------------------------------------------------- dynamic thresholding


def reference_threshold(x: np.ndarray, p: float) -> np.ndarray:
    """Imagen, section 2.3 (and its pseudo-code): s = max(1, percentile(|x̂_0|, p)) per sample, then
    x̂_0 = clip(x̂_0, −s, s) / s."""
    s = np.maximum(np.percentile(np.abs(x).reshape(len(x), -1), 100 * p, axis=1), 1.0)
    s = s.reshape(-1, *[1] * (x.ndim - 1))
    return np.clip(x, -s, s) / s


@pytest.mark.parametrize("p", [0.995, 0.9, 1.0])
def test_dynamic_thresholding_is_imagens_definition(p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 8, 8)) * np.array([0.2, 0.8, 1.5, 3.0, 10.0])[:, None, None, None]
    got = dynamic_thresholding(torch.from_numpy(x), p).numpy()
    np.testing.assert_allclose(got, reference_threshold(x, p), rtol=0, atol=1e-12)
    assert np.abs(got).max() <= 1.0
    np.testing.assert_array_equal(got[0], x[0])  # a prediction inside [-1, 1] (s = 1) is left alone


def test_samplers_threshold_x0_in_place_of_the_clip():
    """With an x0-predicting model whose prediction saturates, p_mean_variance's pred_x0 is the
    thresholded prediction and the mean is the posterior mean at it; DDIM's last step returns it."""
    d = GaussianDiffusion(linear_betas(100), mean_type="x0")
    target = torch.linspace(-4, 4, 2 * 16, dtype=torch.float64).reshape(2, 1, 4, 4)

    def model(x, t):
        return target.expand(len(x), -1, -1, -1)

    x_t, t = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([50, 50])
    p = d.p_mean_variance(model, x_t, t, model_kwargs=None, dynamic_threshold=0.995)
    expected = torch.from_numpy(reference_threshold(target.numpy(), 0.995))
    torch.testing.assert_close(p["pred_x0"], expected)
    torch.testing.assert_close(p["mean"], d.q_posterior(expected, x_t, t)[0])
    x = d.sample(model, (2, 1, 4, 4), sampler="ddim", steps=5, dtype=torch.float64, dynamic_threshold=0.995)
    torch.testing.assert_close(x, expected)
    with pytest.raises(UserError, match="percentile"):
        d.sample(model, (2, 1, 4, 4), sampler="ddim", steps=5, dynamic_threshold=99.5)
