"""Run configuration: presets, typed overrides, validation, and documentation of every field."""

import dataclasses
import json

import pytest

from ddpm.config import RUN_PRESETS, SECTIONS, RunConfig, field_docs, get_config
from ddpm.errors import UserError
from ddpm.models.presets import get_preset


@pytest.mark.parametrize("name", list(RUN_PRESETS))
def test_every_preset_resolves_and_round_trips(name):
    config = get_config(name)
    model = RUN_PRESETS[name]["model"]
    assert config.model == (model if not isinstance(model, str) else get_preset(model))
    assert config.text == RUN_PRESETS[name].get("text")
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again == config


def test_paper_defaults():
    c = get_config("cifar10")
    assert (c.train.lr, c.train.batch_size, c.train.grad_clip, c.train.ema_decay, c.train.warmup_steps) == (
        2e-4, 128, 1.0, 0.9999, 5000)
    assert (c.diffusion.timesteps, c.diffusion.schedule, c.diffusion.mean_type) == (1000, "linear", "eps")
    assert c.train.loss_type == "simple" and c.data.flip
    assert not get_config("mnist").data.flip and not get_config("digits").data.flip


def test_overrides_are_parsed_by_type():
    c = get_config("tiny", {"train.lr": "1e-4", "train.ema_warmup": "no", "model.ch_mult": "1,2,2",
                            "model.image_size": "16", "diffusion.schedule": "cosine", "data.limit": "10"})
    assert c.train.lr == 1e-4 and c.train.ema_warmup is False and c.model.ch_mult == (1, 2, 2)
    assert c.diffusion.schedule == "cosine" and c.data.limit == 10


@pytest.mark.parametrize("overrides,message", [
    ({"train.nope": "1"}, "unknown option"),
    ({"nope.lr": "1"}, "unknown option"),
    ({"train.steps": "0"}, "train.steps"),
    ({"train.batch_size": "-4"}, "train.batch_size"),
    ({"train.lr": "0"}, "train.lr"),
    ({"train.ema_decay": "1.0"}, "train.ema_decay"),
    ({"train.lr": "fast"}, "cannot read"),
    ({"train.ema_warmup": "maybe"}, "cannot read"),
    ({"diffusion.timesteps": "0"}, "diffusion.timesteps"),
    ({"diffusion.schedule": "sigmoid"}, "diffusion.schedule"),
    ({"diffusion.var_type": "learned_range"}, "learned_sigma"),
    ({"model.learned_sigma": "true", "diffusion.var_type": "learned_range"}, "hybrid"),
    ({"model.ch": "48"}, "GroupNorm"),
    ({"train.device": "tpu"}, "train.device"),
    ({"data.split": "valid"}, "data.split"),
])
def test_bad_configuration_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        get_config("tiny", overrides)


def test_unknown_preset():
    with pytest.raises(UserError, match="digits"):
        get_config("imagenet")


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_is_documented(section):
    """--help shows each field's description, taken from the dataclass docstrings."""
    docs = field_docs(SECTIONS[section])
    missing = [f.name for f in dataclasses.fields(SECTIONS[section]) if not docs.get(f.name)]
    assert not missing


@pytest.mark.slow
def test_the_nfe_picks_the_default_sampler(monkeypatch):
    """Without a sampler, SamplerSettings, GaussianDiffusion.sample and ``ddpm sample --steps N`` take the
    entry of DEFAULT_SAMPLER_BY_NFE with the largest NFE not above N (below them all, the smallest's); a
    sampler given wins."""
    import torch

    from ddpm import samplers
    from ddpm.cli import build_parser
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.generate import SamplerSettings
    from ddpm.schedules import linear_betas

    default = samplers.DEFAULT_SAMPLER
    monkeypatch.setattr(samplers, "DEFAULT_SAMPLER_BY_NFE", {5: "unipc", 10: "dpm++2m", 20: default})
    expected = {3: "unipc", 5: "unipc", 7: "unipc", 10: "dpm++2m", 15: "dpm++2m", 20: default, 50: default,
                None: default}
    for nfe, name in expected.items():
        steps = [] if nfe is None else ["--steps", str(nfe)]
        args = build_parser().parse_args(["sample", "run", "--out", "o", *steps])
        assert SamplerSettings(steps=nfe).sampler == SamplerSettings(args.sampler, args.steps).sampler == name, nfe
    assert SamplerSettings("ddim", 5).sampler == "ddim" and SamplerSettings(timesteps=(0, 500, 999)).sampler == "unipc"
    d = GaussianDiffusion(linear_betas(100))

    def model(x, t):
        return torch.tanh(x + 0.01 * t.reshape(-1, 1).to(x.dtype))

    for nfe, name in ((7, "unipc"), (12, "dpm++2m")):
        picked = d.sample(model, (3, 1), steps=nfe, generator=torch.Generator().manual_seed(0))
        named = d.sample(model, (3, 1), sampler=name, steps=nfe, generator=torch.Generator().manual_seed(0))
        assert torch.equal(picked, named)


def test_one_default_sampler_everywhere():
    """The previews, SamplerSettings, GaussianDiffusion.sample and the command line all default to
    ddpm.samplers.DEFAULT_SAMPLER at its default NFE (the others through DEFAULT_SAMPLER_BY_NFE, whose entry
    at DEFAULT_NFE it is; test_the_nfe_picks_the_default_sampler)."""
    import torch

    from ddpm.cli import build_parser
    from ddpm.config import TrainConfig
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.generate import SamplerSettings
    from ddpm.samplers import DEFAULT_NFE, DEFAULT_SAMPLER, DEFAULT_SAMPLER_BY_NFE, default_sampler
    from ddpm.schedules import linear_betas

    args = build_parser().parse_args(["sample", "run", "--out", "o"])
    defaults = {
        "train previews": (TrainConfig().sample_sampler, TrainConfig().sample_steps),
        "SamplerSettings": (SamplerSettings().sampler, DEFAULT_NFE),
        "ddpm sample": (SamplerSettings(args.sampler, args.steps).sampler, DEFAULT_NFE),
        "the table": (DEFAULT_SAMPLER_BY_NFE[DEFAULT_NFE], DEFAULT_NFE),
        "default_sampler": (default_sampler(None), DEFAULT_NFE),
    }
    assert set(defaults.values()) == {(DEFAULT_SAMPLER, DEFAULT_NFE)}, defaults
    d = GaussianDiffusion(linear_betas(100))

    def model(x, t):
        return torch.tanh(x + 0.01 * t.reshape(-1, 1).to(x.dtype))

    plain = d.sample(model, (3, 1), generator=torch.Generator().manual_seed(0))
    told = d.sample(model, (3, 1), sampler=DEFAULT_SAMPLER, steps=DEFAULT_NFE,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, told)  # GaussianDiffusion.sample and samplers.sample
    for name in ("mnist", "digits", "mnist-latent", "cifar10"):
        assert get_config(name).train.sample_steps == DEFAULT_NFE, name
