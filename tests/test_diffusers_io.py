"""Interop with diffusers' UNet2DModel: configs both ways without diffusers, and, with diffusers
installed, equal outputs for its randomly initialised models loaded into ours and for ours
exported to it."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm.errors import UserError
from ddpm.models import PRESETS, UNet, UNetConfig, get_preset
from ddpm.models.diffusers_io import UNET2D
from ddpm.runtime import num_parameters


def config_from_diffusers(values, source="config"):
    return UNET2D.build_config(UNetConfig, values, source)


config_to_diffusers = UNET2D.config_to

# config.json of google/ddpm-cifar10-32 and google/ddpm-cat-256 as published (diffusers 0.0.4).
GOOGLE_CIFAR10 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
GOOGLE_CAT256 = {
    **GOOGLE_CIFAR10, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
# A small model in the same layout: two levels, attention at the second.
SMALL = {
    **GOOGLE_CIFAR10, "block_out_channels": [32, 64], "sample_size": 8, "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def diffusers():
    # Offline before diffusers (and huggingface_hub) read the environment: nothing downloads.
    os.environ["HF_HUB_OFFLINE"] = "1"
    return pytest.importorskip(
        "diffusers", reason="diffusers is the reference for this interop test (ddpm[interop])"
    )


def reference(diffusers, config, jitter, seed=0):
    torch.manual_seed(seed)
    return jitter(diffusers.UNet2DModel.from_config(config), seed=seed).eval()


def assert_same_outputs(ours, theirs, config: UNetConfig, batch=2, labels=None, atol=1e-5):
    torch.manual_seed(1)
    side = config.image_size
    x = torch.randn(batch, config.in_channels, side, side)
    t = torch.randint(0, 1000, (batch,))
    sr, theirs_x = {}, x
    if config.low_res_channels:
        # SR3's input: the low-resolution image upsampled (by the caller, for diffusers) after x_t.
        sr["low_res"] = torch.randn(batch, config.low_res_channels, side // 2, side // 2)
        up = torch.nn.functional.interpolate(sr["low_res"], size=(side, side), mode="bilinear", align_corners=False)
        theirs_x = torch.cat([x, up], dim=1)
    if config.noise_level_embedding:
        sr["noise_level"] = torch.rand(batch)
        labels = sr["noise_level"] * 1000  # diffusers embeds class_labels like t (class_embed_type="timestep")
    with torch.no_grad():
        got = ours.eval()(x, t, None if sr.get("noise_level") is not None else labels, **sr)
        # diffusers has no null label: our -1 is its last row.
        theirs_labels = labels if labels is None or sr else labels.where(labels >= 0, config.num_classes)
        expected = theirs.eval()(theirs_x, t, class_labels=theirs_labels).sample
    assert got.shape == expected.shape == (batch, config.out_channels, side, side)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


# --- configs, no diffusers needed ---------------------------------------------------------------


def test_google_cifar10_config_is_the_cifar10_preset():
    # The published config leaves dropout at diffusers' default 0 (it is for sampling).
    expected = dataclasses.replace(get_preset("cifar10"), dropout=0.0)
    assert config_from_diffusers(GOOGLE_CIFAR10) == expected


def test_google_cat256_config_is_the_lsun256_preset():
    assert config_from_diffusers(GOOGLE_CAT256) == get_preset("lsun256")


@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trip(name):
    # A super-resolution stage's augmentation level takes diffusers' one class embedding (see below).
    classes = 0 if get_preset(name).noise_level_embedding else 10
    for config in (get_preset(name),
                   dataclasses.replace(get_preset(name), num_classes=classes, learned_sigma=True)):
        assert config_from_diffusers(json.loads(json.dumps(config_to_diffusers(config)))) == config


@pytest.mark.parametrize(
    "field, value",
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("attn_norm_num_groups", 8),
        ("norm_eps", 1e-5),
        ("act_fn", "gelu"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "identity"),
        ("center_input_sample", True),
        ("mid_block_type", None),
        ("add_attention", False),
        ("downsample_type", "resnet"),
        ("cross_attention_dim", 768),
        ("_class_name", "UNet2DConditionModel"),
        ("up_block_types", ["UpBlock2D", "UpBlock2D"]),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
        ("block_out_channels", [32, 48]),
        ("block_out_channels", []),
        ("attention_head_dim", 0),
        ("out_channels", 4),
        ("sample_size", [8, 16]),
        ("num_class_embeds", 1),
        ("attention_head_dim", 24),
    ],
)
def test_unsupported_fields_are_named(tmp_path, field, value):
    with pytest.raises(UserError, match=f"config.json: .*{field}"):
        config_from_diffusers({**SMALL, field: value}, source=tmp_path / "config.json")


def test_absent_fields_take_diffusers_defaults():
    # diffusers' default flip_sin_to_cos=True is not DDPM's embedding.
    values = {k: v for k, v in SMALL.items() if k != "flip_sin_to_cos"}
    with pytest.raises(UserError, match="flip_sin_to_cos=True"):
        config_from_diffusers(values)


def test_configs_diffusers_cannot_express_are_refused():
    with pytest.raises(UserError, match="ch_mult"):
        config_to_diffusers(UNetConfig(ch=32, ch_mult=(2, 2), image_size=8, attn_resolutions=()))
    # Two heads of 32 at 64 channels but of 64 at 128: diffusers fixes the head width.
    config = UNetConfig(image_size=8, ch=64, ch_mult=(1, 2), attn_resolutions=(8,), num_heads=2)
    with pytest.raises(UserError, match="num_heads=2"):
        config_to_diffusers(config)


@pytest.fixture
def small_dir(tmp_path):
    """A diffusers directory with a valid config and our tiny model's weights in its names."""
    config = config_from_diffusers(SMALL)
    UNet(config).save_diffusers(tmp_path)
    return tmp_path


def test_a_pickle_that_would_run_code_is_refused(small_dir):
    marker = small_dir / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (small_dir / "diffusion_pytorch_model.safetensors").unlink()
    payload = pickle.dumps({"w": Payload()}, protocol=2)
    (small_dir / "diffusion_pytorch_model.bin").write_bytes(payload)
    with pytest.raises(UserError, match="diffusion_pytorch_model.bin: not a loadable weights-only"):
        UNet.from_diffusers(small_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no weights", "neither diffusion_pytorch_model.safetensors nor"),
        ("garbage weights", "diffusion_pytorch_model.safetensors: not a readable safetensors"),
        ("other weights", r"weights do not fit.*missing.*unexpected \(down_blocks.0.resnets"),
        ("no dir", "not a diffusers model directory"),
        ("no config", "config.json: no such file"),
    ],
)
def test_damaged_diffusers_dirs_raise_user_errors(small_dir, damage, message):
    weights = small_dir / "diffusion_pytorch_model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "other weights":
        state = load_file(weights)
        state["down_blocks.0.resnets.0.bogus.weight"] = state.pop("conv_in.weight")
        save_file(state, weights)
    elif damage == "no config":
        (small_dir / "config.json").unlink()
    directory = small_dir / "nowhere" if damage == "no dir" else small_dir
    with pytest.raises(UserError, match=message):
        UNet.from_diffusers(directory)


# --- against diffusers --------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar10_parameter_count_equals_diffusers(diffusers):
    theirs = diffusers.UNet2DModel.from_config(GOOGLE_CIFAR10)
    count = sum(p.numel() for p in theirs.parameters())
    assert count == num_parameters(UNet(get_preset("cifar10"))) == 35_746_307


@pytest.mark.slow
def test_cifar10_layout_loads_with_equal_outputs_and_exports_back(diffusers, jitter, tmp_path):
    theirs = reference(diffusers, GOOGLE_CIFAR10, jitter)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = UNet.from_diffusers(tmp_path / "theirs")
    assert_same_outputs(ours, theirs, ours.config, batch=1)
    ours.save_diffusers(tmp_path / "ours")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours")
    assert_same_outputs(ours, back, ours.config, batch=1)


def _legacy(directory):
    path = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    save_file(renamed, path)


VARIANTS = {
    "plain": (SMALL, None),
    "legacy attention names": (SMALL, _legacy),
    "bin": (SMALL, "bin"),
    "classes": ({**SMALL, "num_class_embeds": 5}, None),
    "learned sigma": ({**SMALL, "out_channels": 6}, None),
    # SR3 / Imagen: x_t's 3 channels and a low-resolution image's 3 (inferred from out_channels), the
    # augmentation level as a timestep-embedded class label.
    "super-resolution": ({**SMALL, "in_channels": 6, "class_embed_type": "timestep"}, None),
    "four heads": ({**SMALL, "attention_head_dim": 16}, None),
    "eight groups": ({**SMALL, "norm_num_groups": 8}, None),
    "attention everywhere, grey": (
        {**SMALL, "in_channels": 1, "out_channels": 1, "layers_per_block": 2,
         "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
         "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"]},
        None,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_models_load_with_equal_outputs(diffusers, jitter, tmp_path, variant):
    config, change = VARIANTS[variant]
    theirs = reference(diffusers, config, jitter)
    theirs.save_pretrained(tmp_path, safe_serialization=change != "bin")
    if callable(change):
        change(tmp_path)
        # diffusers reads the legacy names too, into the same model.
        torch.testing.assert_close(
            diffusers.UNet2DModel.from_pretrained(tmp_path).state_dict(), theirs.state_dict()
        )
    if change == "bin":
        assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    ours = UNet.from_diffusers(tmp_path)
    labels = torch.tensor([3, -1]) if "num_class_embeds" in config else None
    assert_same_outputs(ours, theirs, ours.config, labels=labels)
    if variant == "super-resolution":
        c = ours.config
        assert (c.in_channels, c.low_res_channels, c.noise_level_embedding) == (3, 3, True)


EXPORTS = {
    "tiny": get_preset("tiny"),
    "classes and learned sigma": dataclasses.replace(
        get_preset("tiny"), num_classes=3, learned_sigma=True
    ),
    "two heads": dataclasses.replace(get_preset("tiny"), num_heads=2),
    "narrow, eight groups": dataclasses.replace(get_preset("tiny"), ch=16, norm_groups=8),
    "digits": get_preset("digits"),
    "super-resolution": dataclasses.replace(get_preset("tiny"), low_res_channels=3, noise_level_embedding=True),
    "super-resolution, learned sigma, grey low-res": dataclasses.replace(
        get_preset("tiny"), low_res_channels=1, learned_sigma=True),
    "super-resolution, as many low-res channels as x_t's, learned sigma": dataclasses.replace(
        get_preset("tiny"), low_res_channels=3, learned_sigma=True, noise_level_embedding=True),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_our_export_loads_in_diffusers_with_equal_outputs(diffusers, jitter, tmp_path, name):
    config = EXPORTS[name]
    torch.manual_seed(0)
    ours = jitter(UNet(config))
    ours.save_diffusers(tmp_path)
    theirs, info = diffusers.UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    labels = torch.tensor([2, -1]) if config.num_classes else None
    assert_same_outputs(ours, theirs, config, labels=labels)
    assert UNet.from_diffusers(tmp_path).config == config  # the low-res channels read back, however ambiguous


def test_a_class_conditional_super_resolution_model_has_no_diffusers_layout():
    # UNet2DModel has one class embedding: labels or, with class_embed_type="timestep", the augmentation level.
    config = dataclasses.replace(get_preset("tiny"), num_classes=3, low_res_channels=3, noise_level_embedding=True)
    with pytest.raises(UserError, match="class-conditional super-resolution"):
        config_to_diffusers(config)


@pytest.mark.parametrize("schedule,timesteps", [("linear", 1000), ("linear", 250), ("cosine", 1000),
                                                ("scaled_linear", 1000), ("scaled_linear", 100)])
def test_exported_scheduler_has_our_betas_in_diffusers_and_reads_back(diffusers, tmp_path, schedule, timesteps):
    from ddpm.config import DiffusionConfig
    from ddpm.export import scheduler_config
    from ddpm.loading import diffusion_from_diffusers

    ours = DiffusionConfig(timesteps=timesteps, schedule=schedule)
    config = scheduler_config(ours)
    theirs = diffusers.DDPMScheduler.from_config(config)
    assert torch.allclose(theirs.betas.double(), ours.build().betas, rtol=1e-6, atol=0)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    assert diffusion_from_diffusers(tmp_path) == ours


def test_a_scaled_linear_schedule_with_other_ends_is_refused(tmp_path):
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    from ddpm.loading import diffusion_from_diffusers

    with pytest.raises(UserError, match="scaled_linear schedule is supported"):
        diffusion_from_diffusers(tmp_path)
