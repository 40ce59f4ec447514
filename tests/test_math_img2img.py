"""SDEdit (img2img) against its definition.

Strength S runs the last int(N·S) of a sampler's N kept timesteps from x_{t_{n−1}} ~ q(· | x_0), diffusers'
convention (its img2img pipeline's ``get_timesteps``, called here on its own scheduler). With the exact
model of N(m, s²) data and DDPM's ancestral steps, every step is affine plus Gaussian noise, so the output
is Gaussian with the mean and variance of a scalar recursion started from q(x_{t_{n−1}} | x_0) =
N(√ᾱ x_0, 1 − ᾱ): written here from Bayes' rule (as test_math_exact_gaussian.py does), not by the
library. At S = 1 the image enters only through √ᾱ_T x_0 (0.0064 x_0 for the linear schedule): the output
is the unconditional one to within that; at S = 0 it is the image.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from test_math_exact_gaussian import ACP, BETAS, M, S, T, exact_model, gain, posterior_coefficients

from ddpm import GaussianDiffusion, linear_betas
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings
from ddpm.img2img import img2img, strength_timesteps

Z = 5.0
DIFFUSION = GaussianDiffusion(linear_betas(T))


class _Exact(torch.nn.Module):
    """The exact ε-model of N(M, S²) data as a network for 1 x 50 x 50 'images'."""

    sample_shape, num_classes = (1, 50, 50), 0

    def __init__(self) -> None:
        super().__init__()
        self.f = exact_model("eps")

    def forward(self, x, t):
        return self.f(x.double(), t).to(x.dtype)


def ddpm_moments_from(x0: float, start: int) -> tuple[float, float]:
    """Mean and variance of DDPM ancestral sampling (σ² = β̃, exact model) from x_start ~ q(· | x0)."""
    mean, var = math.sqrt(ACP[start]) * x0, 1 - ACP[start]
    for i in range(start, -1, -1):
        c1, c2, beta_tilde = posterior_coefficients(i)
        g = gain(i)
        A = c1 * g + c2
        mean = A * mean + c1 * (M - g * math.sqrt(ACP[i]) * M)
        var = A * A * var + beta_tilde
    return mean, var


def edit(value: float, strength: float, images: int = 16, seed: int = 0) -> torch.Tensor:
    x0 = torch.full((images, 1, 50, 50), value)
    return img2img(_Exact(), DIFFUSION, x0, strength, SamplerSettings("ddpm"), seed=seed, progress=False,
                   batch_size=images).images


@pytest.mark.slow
@pytest.mark.parametrize("value, strength", [(0.8, 1.0), (-0.6, 1.0), (0.8, 0.5), (-0.6, 0.3)])
def test_ddpm_edits_have_the_moments_of_the_chain_from_q(value, strength):
    """40,000 pixels: mean and variance within Z standard errors of the recursion's."""
    start = int(T * strength) - 1  # DDPM keeps all T steps: the last int(T·S) of them start at index T·S − 1
    mean, var = ddpm_moments_from(value, start)
    x = edit(value, strength).double().flatten()
    n = x.numel()
    assert abs(x.mean().item() - mean) < Z * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var().item() - var) < Z * var * math.sqrt(2 / (n - 1)), (x.var(), var)
    if strength == 1.0:  # nearly ignored: the images differ in the output mean by A √ᾱ_T Δx_0 only
        other = ddpm_moments_from(-value, start)[0]
        assert abs(mean - other) < 0.01 * abs(2 * value) and math.sqrt(var) == pytest.approx(S, rel=0.02)


def test_strength_zero_returns_the_image_and_spends_nothing():
    x0 = torch.linspace(-1, 1, 2 * 2500).reshape(2, 1, 50, 50)
    out = img2img(_Exact(), DIFFUSION, x0, 0.0, SamplerSettings("dpm++2m", 20), num_samples=2, progress=False)
    assert out.nfe == 0 and torch.equal(out.images, x0.repeat_interleave(2, 0))


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.55, 1.0])
def test_int_n_s_of_n_steps_run(strength):
    out = img2img(_Exact(), DIFFUSION, torch.zeros(1, 1, 50, 50), strength, SamplerSettings("dpm++2m", 20),
                  progress=False)
    assert out.nfe == int(20 * strength)


def test_the_kept_steps_at_a_strength_by_hand():
    # DDIM's leading spacing keeps 0, 50, ..., 950 of 1000; S = 0.3 runs int(20 · 0.3) = 6 of them, from 250.
    assert strength_timesteps(DIFFUSION, SamplerSettings("ddim", 20), 0.3) == [0, 50, 100, 150, 200, 250]


@pytest.mark.slow  # importing diffusers' pipelines takes seconds
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.75, 1.0])
def test_the_kept_steps_are_diffusers_img2img_timesteps(spacing, strength):
    diffusers = pytest.importorskip("diffusers", reason="diffusers' img2img pipeline defines the convention")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing,
                                        steps_offset=0)
    scheduler.set_timesteps(20)
    theirs, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=scheduler), 20, strength,
                                                             "cpu")
    ours = strength_timesteps(DIFFUSION, SamplerSettings("ddim", 20, spacing=spacing), strength)
    assert sorted(theirs.tolist()) == ours


def test_strength_outside_0_1_and_adaptive_steps_are_user_errors():
    for strength in (-0.1, 1.5):
        with pytest.raises(UserError, match=r"--strength must lie in \[0, 1\]"):
            strength_timesteps(DIFFUSION, SamplerSettings(), strength)
    with pytest.raises(UserError, match="dpm-adaptive"):
        strength_timesteps(DIFFUSION, SamplerSettings("dpm-adaptive"), 0.5)
    assert np.isclose(BETAS[0], 1e-4)
