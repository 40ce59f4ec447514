"""Sampler behaviour: DDIM(η=1) is DDPM, respacing, determinism, trajectories, guidance."""

import math

import pytest
import torch

from ddpm import GaussianDiffusion, cosine_betas, linear_betas, samplers
from ddpm.errors import UserError
from ddpm.samplers import ddim_sigma, ddim_step, ddpm_step
from ddpm.schedules import even_timesteps, space_timesteps


def wiggly_model(x, t):
    """An arbitrary smooth ε-predictor that depends on x and t (no training needed)."""
    return torch.tanh(0.7 * x + 0.001 * t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) - 0.2)


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(200)])
def test_ddim_with_eta_one_has_the_ddpm_posterior(betas):
    """[DDIM] eq. 16 with η = 1: σ_t² = β̃_t, and the step's mean is the posterior mean μ̃(x_t, x̂_0)."""
    d = GaussianDiffusion(betas)
    T = d.num_timesteps
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(16, 1, 3, 3, generator=g, dtype=torch.float64)
    for step in [1, 2, T // 2, T - 1]:
        t = torch.full((16,), step)
        p = d.p_mean_variance(wiggly_model, x_t, t)
        assert torch.allclose(ddim_sigma(d, t, x_t, 1.0).flatten() ** 2, d.posterior_variance[t], rtol=1e-10)
        zero, one = torch.zeros_like(x_t), torch.ones_like(x_t)
        mean_ddim = ddim_step(d, p, x_t, t, zero, 1.0)
        sd_ddim = ddim_step(d, p, x_t, t, one, 1.0) - mean_ddim
        assert torch.allclose(mean_ddim, ddpm_step(d, p, x_t, t, zero, 0.0), atol=1e-10)
        assert torch.allclose(sd_ddim, ddpm_step(d, p, x_t, t, one, 0.0) - mean_ddim, atol=1e-10)


def test_ddpm_last_step_adds_no_noise():
    """[DDPM] Algorithm 2: z = 0 at t = 1, so x_0 is the mean at t = 1, which for ε is x̂_0."""
    d = GaussianDiffusion(linear_betas(1000))
    x, traj = d.sample(wiggly_model, (4, 1, 4, 4), sampler="ddpm", steps=10,
                       generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert torch.equal(x, traj["pred_x0"][-1])
    # Respaced DDPM keeps both ends, 0 and T − 1 (improved-diffusion's respacing).
    assert traj["timesteps"].tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert traj["x_t"].shape == (10, 4, 1, 4, 4)
    _, every3 = d.sample(wiggly_model, (4, 1, 4, 4), sampler="ddpm", steps=10, return_trajectory=True,
                         trajectory_every=3)
    assert every3["timesteps"].tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_sampling_is_deterministic_given_a_generator(sampler, eta):
    d = GaussianDiffusion(linear_betas(1000))

    def run(seed):
        return d.sample(wiggly_model, (3, 2, 4, 4), sampler=sampler, steps=25, eta=eta,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_respaced_sampling_calls_the_model_with_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    d = GaussianDiffusion(linear_betas(1000))
    d.sample(model, (2, 1, 2, 2), sampler="ddim", steps=4)
    assert [s.tolist() for s in seen] == [[750, 750], [500, 500], [250, 250], [0, 0]]
    assert all(s.dtype == torch.int64 for s in seen)


def test_all_steps_equals_no_respacing():
    d = GaussianDiffusion(linear_betas(100), var_type="fixed_large")
    def run(**kwargs):
        return d.sample(wiggly_model, (2, 1, 3, 3), sampler="ddpm", generator=torch.Generator().manual_seed(5),
                        **kwargs)

    a, b, c = run(steps=100), run(steps=None), run(timesteps=range(100))
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)


def test_classifier_free_guidance_combines_conditional_and_null_predictions():
    """[CFG] eq. 6: ε̃ = ε(x, ∅) + w (ε(x, y) − ε(x, ∅)), with the null label −1."""
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return torch.ones_like(x) * y.reshape(-1, 1, 1, 1).to(x.dtype)

    d = GaussianDiffusion(linear_betas(1000))
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([5, 5, 5])
    y = torch.tensor([2, 4, 7])
    out = d.model_output(model, x, t, {"y": y, "guidance_scale": 3.0})
    assert calls[-1].tolist() == [2, 4, 7, -1, -1, -1]
    expected = -1 + 3.0 * (y.float() + 1)
    assert torch.allclose(out[:, 0, 0, 0], expected)
    # A scale of 1 is the conditional model alone, in one call.
    out1 = d.model_output(model, x, t, {"y": y, "guidance_scale": 1.0})
    assert calls[-1].tolist() == [2, 4, 7] and torch.allclose(out1[:, 0, 0, 0], y.float())
    with pytest.raises(UserError):
        d.model_output(model, x, t, {"guidance_scale": 2.0})
    # Guided sampling runs end to end.
    samples = d.sample(model, (3, 1, 2, 2), sampler="ddim", steps=5, model_kwargs={"y": y, "guidance_scale": 2.0})
    assert samples.shape == (3, 1, 2, 2)


def test_guidance_with_an_unconditional_embedding_uses_it_for_the_second_half():
    """Text guidance: the unconditional half sees ``uncond``'s embeddings (an empty or negative
    prompt's), every other per-example argument repeated; the result is uncond + w (cond − uncond)."""
    seen = []

    def model(x, t, encoder_hidden_states, encoder_attention_mask, scale):
        seen.append((encoder_hidden_states.clone(), encoder_attention_mask.clone(), scale.clone()))
        return torch.ones_like(x) * (encoder_hidden_states.sum((1, 2)) * scale).reshape(-1, 1, 1, 1)

    d = GaussianDiffusion(linear_betas(1000))
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([3, 3])
    cond, negative = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]), torch.full((2, 2, 1), 0.5)
    mask, scale = torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, 2.0])
    out = d.model_output(model, x, t, {"encoder_hidden_states": cond, "encoder_attention_mask": mask, "scale": scale,
                                       "guidance_scale": 4.0,
                                       "uncond": {"encoder_hidden_states": negative,
                                                  "encoder_attention_mask": torch.ones(2, 2, dtype=torch.bool)}})
    states, masks, scales = seen[-1]
    assert torch.equal(states, torch.cat([cond, negative])) and torch.equal(scales, torch.cat([scale, scale]))
    assert masks.tolist() == [[True, True], [True, False], [True, True], [True, True]]
    c, u = torch.tensor([3.0, 14.0]), torch.tensor([1.0, 2.0])  # sums times scale, by hand
    assert torch.allclose(out[:, 0, 0, 0], u + 4.0 * (c - u))


def test_guidance_repeats_other_per_example_arguments():
    seen = {}

    def model(x, t, y, scale):
        seen["scale"] = scale
        return x * scale.reshape(-1, 1, 1, 1)

    d = GaussianDiffusion(linear_betas(1000))
    d.model_output(model, torch.ones(3, 1, 2, 2), torch.tensor([1, 2, 3]),
                   {"y": torch.tensor([0, 1, 2]), "scale": torch.tensor([1.0, 2.0, 3.0]), "guidance_scale": 2.0})
    assert seen["scale"].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]


def test_guidance_keeps_the_conditional_variance_channels():
    def model(x, t, y):
        c = y.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.cat([c * torch.ones_like(x), 0.1 * c * torch.ones_like(x)], dim=1)

    d = GaussianDiffusion(linear_betas(1000), var_type="learned_range")
    out = d.model_output(model, torch.zeros(2, 1, 2, 2), torch.tensor([3, 3]),
                         {"y": torch.tensor([1, 5]), "guidance_scale": 2.0})
    assert torch.allclose(out[:, 1, 0, 0], torch.tensor([0.1, 0.5]))


def test_sampler_arguments_are_checked():
    d = GaussianDiffusion(linear_betas(100))
    with pytest.raises(UserError):
        d.sample(wiggly_model, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(UserError):
        d.sample(wiggly_model, (1, 1, 2, 2), sampler="ddim", eta=1.5)
    with pytest.raises(UserError):
        d.sample(wiggly_model, (1, 1, 2, 2), steps=101)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_a_seed_gives_the_same_ddpm_and_ddim_samples_as_before(sampler, eta):
    """The loop as it was before the ODE solvers, written out: respace onto DDPM's IDDPM steps or
    DDIM's floor(kT/K), draw x_T, then one z per step but the last (DDIM only when η > 0)."""
    d = GaussianDiffusion(linear_betas(1000))
    kept = space_timesteps(1000, [10]) if sampler == "ddpm" else even_timesteps(1000, 10)
    r = d.respace(kept)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 1, 4, 4, generator=g)
    for i in range(9, -1, -1):
        t = torch.full((3,), i)
        p = r.p_mean_variance(wiggly_model, x, t)
        draw = (sampler == "ddpm" or eta > 0) and i > 0
        z = torch.randn(x.shape, generator=g) if draw else torch.zeros_like(x)
        x = (ddpm_step if sampler == "ddpm" else ddim_step)(r, p, x, t, z, eta)
    new = d.sample(wiggly_model, (3, 1, 4, 4), sampler=sampler, steps=10, eta=eta,
                   generator=torch.Generator().manual_seed(21))
    assert torch.equal(new, x)


def _guided_ddim_moments(acp, kept, m, s, w):
    """Mean and variance of deterministic DDIM's output for x_T ~ N(0, 1) under the guided ε of two
    exact Gaussian models: the condition's N(m, s²) and the null label's N(0, 1). Both ε's are
    linear in x_t, so every step is affine and the output Gaussian: a float64 recursion of the
    DDIM update (DDIM eq. 12 with σ = 0) and CFG eq. 6, written from the papers, not the library."""
    scale, shift = 1.0, 0.0  # x = scale * x_T + shift
    for j in range(len(kept) - 1, -1, -1):
        a = acp[kept[j]]
        a_prev = acp[kept[j - 1]] if j else 1.0
        v_c = a * s * s + 1 - a  # the condition's noised variance; the null model's is 1
        e1 = math.sqrt(1 - a) * (w / v_c + (1 - w))  # ε̃ = e1 x + e0
        e0 = -w * math.sqrt(1 - a) * math.sqrt(a) * m / v_c
        # x̂0 = (x − √(1−a) ε̃) / √a, then x' = √a' x̂0 + √(1−a') ε̃.
        p = (1 - math.sqrt(1 - a) * e1) / math.sqrt(a) * math.sqrt(a_prev) + math.sqrt(1 - a_prev) * e1
        q = -math.sqrt(1 - a) * e0 / math.sqrt(a) * math.sqrt(a_prev) + math.sqrt(1 - a_prev) * e0
        scale, shift = p * scale, p * shift + q
    return shift, scale * scale


@pytest.mark.slow
def test_guidance_on_gaussians_is_the_affine_recursion_and_it_sharpens_and_narrows():
    """Guided DDIM on exact Gaussian models equals the closed-form recursion; w > 1 moves the
    samples beyond the condition's mean, away from the unconditional model's, and shrinks their
    spread (docs/theory.md, section 13)."""
    m, s, n, steps = 0.5, 0.5, 40_000, 200
    d = GaussianDiffusion(linear_betas(1000))
    acp = d.alphas_cumprod.double()

    def model(x, t, y):
        a = acp[t].reshape(-1, 1).to(x.dtype)
        conditional = (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s * s + 1 - a)
        return torch.where(y.reshape(-1, 1) >= 0, conditional, (1 - a).sqrt() * x)

    kept = samplers.kept_timesteps(d, "ddim", steps)
    moments = {}
    for w in (1.0, 3.0):
        mean, var = _guided_ddim_moments(acp.tolist(), kept, m, s, w)
        moments[w] = mean, var
        x = d.sample(model, (n, 1), sampler="ddim", steps=steps, clip_denoised=False, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(int(w)),
                     model_kwargs={"y": torch.ones(n, dtype=torch.long), "guidance_scale": w})
        # 5 standard errors of a mean and of a variance of n Gaussian draws.
        assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)
    (mean1, var1), (mean3, var3) = moments[1.0], moments[3.0]
    # w = 1 is the conditional model itself, up to DDIM's first-order error (0.007 in the variance at
    # 200 steps, 0.027 at 50); w = 3 moves the mean from 0.50 to 0.75, past the condition's, and cuts
    # the variance from 0.24 to 0.014 (more than the tilted p(x|c)^3 p(x)^-2 would: 0.10).
    assert abs(mean1 - m) < 0.01 and abs(var1 - s * s) < 0.01
    assert mean3 > mean1 + 0.2 and var3 < 0.1 * var1
