"""Sampler behaviour: DDIM(η=1) is DDPM, respacing, determinism, trajectories, guidance."""

import pytest
import torch

from ddpm import GaussianDiffusion, cosine_betas, linear_betas
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
