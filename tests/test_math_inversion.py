"""Inversion and interpolation against answers they did not compute.

For data N(m, s²) per dimension the probability-flow ODE keeps z = (x_t − √ᾱ_t m) / √(ᾱ_t s² + 1 − ᾱ_t)
constant (tests/test_math_solvers.py), so the exact encoding of x_0, taken as x at the chain's last kept
step t_0, is x_T = √ᾱ_T m + √v_T z(x_0, t_0). On a process uniform in λ from λ = 10 (1 − ᾱ_{t_0} = 2e-9,
so x_0 ≈ x_{t_0} costs nothing) to λ = −5, encoding's error falls as h^p (measured slopes 0.98–1.00
for DDIM, 1.94–2.01 for DPM-Solver++ 2M over N = 16..128), and so does the round trip's
reconstruction error: DDIM's at order 1 (slopes 0.87–0.98), 2M's faster than its order (the errors of
the two directions largely cancel: slope about 4.8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_math_exact_gaussian import exact_model

from ddpm import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings
from ddpm.inversion import encode, interpolate, slerp

M, S = 0.1, 0.3
NS = np.array([16, 32, 64, 128])


def uniform_lambda_process(n: int, lam_max: float = 10.0, lam_min: float = -5.0) -> GaussianDiffusion:
    lam = torch.linspace(lam_max, lam_min, n, dtype=torch.float64)
    acp = torch.sigmoid(2 * lam)  # ᾱ = e^{2λ} / (1 + e^{2λ})
    return GaussianDiffusion(1 - acp / torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]]))


X0 = M + S * torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def errors(sampler: str, n: int) -> tuple[float, float]:
    """(encoding's error to the exact x_T, the round trip's to x_0), max over the samples."""
    d = uniform_lambda_process(n)
    acp = d.alphas_cumprod
    model = exact_model("eps", M, S, acp)
    x_T = encode(d, model, X0, sampler, timesteps=range(n), clip_denoised=False)
    a0, aT = acp[0].item(), acp[-1].item()
    z = (X0 - math.sqrt(a0) * M) / math.sqrt(a0 * S * S + 1 - a0)
    exact = math.sqrt(aT) * M + math.sqrt(aT * S * S + 1 - aT) * z
    back = d.sample(model, X0.shape, sampler=sampler, timesteps=range(n), noise=x_T, dtype=torch.float64,
                    clip_denoised=False)
    return (x_T - exact).abs().max().item(), (back - X0).abs().max().item()


def slope(values) -> float:
    return -np.polyfit(np.log(NS), np.log(values), 1)[0]


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2)])
def test_encoding_and_reconstruction_errors_fall_at_the_solvers_order(sampler, order):
    encoding, reconstruction = zip(*(errors(sampler, int(n)) for n in NS))
    assert order - 0.3 < slope(encoding) < order + 0.3, encoding
    assert slope(reconstruction) > order - 0.3, reconstruction
    if order == 1:
        assert slope(reconstruction) < order + 0.3, reconstruction
    assert reconstruction[-1] < 0.06 / order**4  # measured 0.054 (DDIM), 7e-7 (2M) at N = 128


def test_encoding_costs_one_evaluation_less_than_decoding():
    calls = []
    d = uniform_lambda_process(10)
    model = exact_model("eps", M, S, d.alphas_cumprod)
    encode(d, lambda x, t: calls.append(int(t[0])) or model(x, t), X0, "dpm++2m", timesteps=range(10))
    assert calls == list(range(9))  # evaluated at t_0, ..., t_{K-2}, moving each time one kept step up
    with pytest.raises(UserError, match="ddim or dpm\\+\\+2m"):
        encode(d, model, X0, "unipc", timesteps=range(10))


def test_slerp_is_ddims_formula():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    theta = math.acos((a.flatten() @ b.flatten()).item() / (a.norm() * b.norm()).item())
    for alpha in (0.0, 0.3, 1.0):
        expected = (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)
        torch.testing.assert_close(slerp(a, b, alpha), expected, rtol=0, atol=1e-12)
    path = slerp(a, b, torch.linspace(0, 1, 5, dtype=torch.float64))
    assert path.shape == (5, 3, 8, 8)
    torch.testing.assert_close(path[2], slerp(a, b, 0.5))
    # Orthogonal vectors of one norm stay on the sphere; the straight line would dip to 1/√2 of it.
    u, v = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 3.0], dtype=torch.float64)
    assert slerp(u, v, 0.5).norm().item() == pytest.approx(3.0)
    torch.testing.assert_close(slerp(u, u, 0.25), u)  # parallel: the line, which is the point itself


class _Exact(torch.nn.Module):
    """The exact model as a network with a sample shape, for the image-level functions."""

    sample_shape, num_classes = (1, 4, 4), 0

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.f = exact_model("eps", M, S, diffusion.alphas_cumprod)

    def forward(self, x, t):
        return self.f(x.double(), t).to(x.dtype)


def test_interpolation_decodes_the_great_circle_and_its_ends():
    d = uniform_lambda_process(20)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, 4, generator=g)
    model = _Exact(d)
    frames = interpolate(model, d, a, b, frames=5, settings=SamplerSettings("ddim", 20), progress=False)
    ends = d.sample(model, (2, 1, 4, 4), sampler="ddim", steps=20, noise=torch.stack([a, b]))
    torch.testing.assert_close(frames.images[[0, -1]], ends.clamp(-1, 1), rtol=0, atol=1e-5)
    assert frames.images.shape == (5, 1, 4, 4)
    with pytest.raises(UserError, match="deterministic"):
        interpolate(model, d, a, b, settings=SamplerSettings("dpm++2m-sde", 20), progress=False)
