"""The text-conditional U-Net against diffusers' UNet2DConditionModel with random weights: parameter
counts (Stable Diffusion 1.5's and 2's on the meta device), names, outputs with and without a key
mask, class embeddings, non-square inputs; the diffusers directory both ways; configs; the mask's
effect; user errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from ddpm.errors import UserError
from ddpm.models import ConditionalUNet, ConditionalUNetConfig, UNet, get_preset
from ddpm.models.diffusers_io import UNET2D_CONDITION
from ddpm.models.unet_2d_condition import PRESETS
from ddpm.runtime import num_parameters

# Measured max |ours - diffusers| is at most 2.0e-6 for outputs of size ~1 over these configs in
# float32 (sums in another order; our upsampling is four 2x2 convolutions instead of nearest x2 and
# a 3x3 one; exactly 0 for the one-level mnist-pairs-latent); at most 4.2e-15 in float64.
ATOL = 1e-5
ATOL_FLOAT64 = 1e-12

DOWN3 = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP3 = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# Stable Diffusion 1's form shrunk: 1x1-convolution projections, one head count for all levels,
# its block pattern, two blocks per level, padded downsampling, norm_eps 1e-5.
SD1_STYLE = ConditionalUNetConfig(
    sample_size=16, block_out_channels=(32, 64, 64), down_block_types=DOWN3, up_block_types=UP3,
    layers_per_block=2, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
)
# Stable Diffusion 2's: linear projections, a head count per level (heads of 16 channels here),
# attention upcast, and two transformer blocks per transformer.
SD2_STYLE = dataclasses.replace(
    SD1_STYLE, layers_per_block=1, attention_head_dim=(2, 4, 4), use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=2,
)
CONFIGS = {
    "sd1-style": SD1_STYLE,
    "sd2-style": SD2_STYLE,
    # A pooled text embedding added to the time embedding (GLIDE), DDPM's embedding and padding.
    "projection": dataclasses.replace(
        SD2_STYLE, class_embed_type="projection", projection_class_embeddings_input_dim=12,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=0.1,
    ),
    "class labels": dataclasses.replace(SD1_STYLE, num_class_embeds=5, in_channels=3, out_channels=6),
    "mnist-pairs": PRESETS["mnist-pairs"],  # 28x56: not square
    "mnist-pairs-latent": PRESETS["mnist-pairs-latent"],  # 7x14, one level
    "tiny": PRESETS["tiny"],
}
# The fields of runwayml/stable-diffusion-v1-5's and stabilityai/stable-diffusion-2-1's
# unet/config.json (written by diffusers 0.6 and 0.10; absent fields take diffusers' defaults).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}


@pytest.fixture(scope="module")
def diffusers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # Before diffusers reads the environment: nothing downloads.
    return pytest.importorskip("diffusers", reason="diffusers is the reference for the conditional U-Net")


def reference(diffusers, config: ConditionalUNetConfig, jitter, seed: int = 0):
    torch.manual_seed(seed)
    return jitter(diffusers.UNet2DConditionModel.from_config(UNET2D_CONDITION.config_to(config)), seed=seed).eval()


def side(config: ConditionalUNetConfig) -> tuple[int, int]:
    size = config.sample_size
    return (size, size) if isinstance(size, int) else size


def inputs(config: ConditionalUNetConfig, batch: int = 2, tokens: int = 7, dtype=torch.float32) -> dict:
    """Random inputs for ``config``: x, t, encoder_hidden_states, and class labels if it has them."""
    generator = torch.Generator().manual_seed(1)
    height, width = side(config)
    values = {
        "x": torch.randn(batch, config.in_channels, height, width, generator=generator, dtype=dtype),
        "t": torch.tensor([3, 901, 500, 0][:batch]),
        "encoder_hidden_states": torch.randn(batch, tokens, config.cross_attention_dim, generator=generator,
                                             dtype=dtype),
    }
    if config.class_embed_type == "projection":
        values["class_labels"] = torch.randn(batch, config.projection_class_embeddings_input_dim,
                                             generator=generator, dtype=dtype)
    elif config.num_class_embeds:
        values["class_labels"] = torch.arange(batch) % config.num_class_embeds
    return values


# Token 3 and the last two of the first sample are padding; the second sample attends to all.
MASK = torch.tensor([[1, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])


def assert_same_outputs(ours: ConditionalUNet, theirs, mask=None, atol=ATOL, dtype=torch.float32) -> float:
    """Equal predictions of ours and diffusers' for the same inputs; returns the max difference."""
    values = inputs(ours.config, dtype=dtype)
    with torch.no_grad():
        got = ours.eval()(**values, encoder_attention_mask=mask)
        expected = theirs.eval()(values["x"], values["t"], values["encoder_hidden_states"],
                                 class_labels=values.get("class_labels"), encoder_attention_mask=mask).sample
    assert got.shape == expected.shape == (2, ours.config.out_channels, *side(ours.config))
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    return (got - expected).abs().max().item()


# --- the model against diffusers ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("sd15", 859_520_964), ("sd2", 865_910_724)])
def test_stable_diffusion_parameter_counts_and_names_equal_diffusers(diffusers, name, expected):
    config = PRESETS[name]
    with torch.device("meta"):  # no memory: 860M float32 parameters would be 3.4 GB per side
        ours = ConditionalUNet(config)
        theirs = diffusers.UNet2DConditionModel.from_config(UNET2D_CONDITION.config_to(config))
    assert num_parameters(ours) == num_parameters(theirs) == expected
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_equal_outputs_with_strict_loading_both_ways(diffusers, jitter, name):
    config = CONFIGS[name]
    theirs = reference(diffusers, config, jitter)
    ours = ConditionalUNet(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert num_parameters(ours) == num_parameters(theirs)
    assert_same_outputs(ours, theirs)
    assert_same_outputs(ours, theirs, mask=MASK)
    # And a model of ours, perturbed, loaded into diffusers.
    torch.manual_seed(1)
    ours = jitter(ConditionalUNet(config), seed=1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, mask=MASK)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd2-style", "projection"])
def test_equal_outputs_in_float64(diffusers, jitter, name):
    # Also that upcast_attention computes in at least float32: it must not round float64 down.
    theirs = reference(diffusers, CONFIGS[name], jitter).double()
    ours = ConditionalUNet(CONFIGS[name]).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, mask=MASK, atol=ATOL_FLOAT64, dtype=torch.float64)


@pytest.mark.slow
def test_save_diffusers_loads_in_diffusers_without_missing_or_unexpected_keys(diffusers, jitter, tmp_path):
    config = CONFIGS["projection"]
    ours = jitter(ConditionalUNet(config))
    ours.save_diffusers(tmp_path)
    theirs, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert theirs.config.use_linear_projection and theirs.config.attention_head_dim == [2, 4, 4]
    assert_same_outputs(ours, theirs, mask=MASK)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [False, True])
def test_from_diffusers_reads_their_directory(diffusers, jitter, tmp_path, pipeline):
    # load_weights refuses any missing or unexpected key, so loading at all proves there are none.
    config = CONFIGS["class labels"]
    theirs = reference(diffusers, config, jitter)
    theirs.save_pretrained(tmp_path / "unet" if pipeline else tmp_path)
    ours = ConditionalUNet.from_diffusers(tmp_path)
    assert ours.config == config
    assert_same_outputs(ours, theirs)


def test_num_attention_heads_is_written_as_diffusers_reads_it(diffusers, jitter, tmp_path):
    # diffusers itself refuses num_attention_heads; the same network has its head counts in
    # attention_head_dim.
    with pytest.raises(ValueError, match="num_attention_heads"):
        diffusers.UNet2DConditionModel.from_config({**UNET2D_CONDITION.config_to(SD2_STYLE),
                                                    "num_attention_heads": [2, 4, 4]})
    config = dataclasses.replace(SD2_STYLE, attention_head_dim=64, num_attention_heads=(2, 4, 4))
    assert config.heads == SD2_STYLE.heads == (2, 4, 4)
    ours = jitter(ConditionalUNet(config))
    ours.save_diffusers(tmp_path)
    assert UNET2D_CONDITION.build_config(ConditionalUNetConfig, json.loads((tmp_path / "config.json").read_text())) \
        == SD2_STYLE
    assert_same_outputs(ours, diffusers.UNet2DConditionModel.from_pretrained(tmp_path))


# --- the conditioning ---------------------------------------------------------------------------


def test_a_masked_token_does_not_change_the_output(jitter):
    model = jitter(ConditionalUNet(SD2_STYLE)).eval()
    values = inputs(SD2_STYLE)
    changed = values["encoder_hidden_states"].clone()
    changed[0, 3] += 10 * torch.randn(SD2_STYLE.cross_attention_dim)  # masked in sample 0 (MASK)
    with torch.no_grad():
        before = model(**values, encoder_attention_mask=MASK)
        after = model(**{**values, "encoder_hidden_states": changed}, encoder_attention_mask=MASK)
        unmasked = model(**{**values, "encoder_hidden_states": changed})
        all_kept = model(**values, encoder_attention_mask=torch.ones_like(MASK, dtype=torch.bool))
        plain = model(**values)
    assert torch.equal(after, before)
    assert (unmasked[0] - before[0]).abs().max() > 1e-2  # without the mask the token counts
    torch.testing.assert_close(unmasked[1], plain[1], rtol=0, atol=0)  # samples do not mix
    torch.testing.assert_close(all_kept, plain, rtol=0, atol=1e-6)


def test_the_conditioning_changes_the_prediction(jitter):
    model = jitter(ConditionalUNet(PRESETS["tiny"])).eval()
    values = inputs(PRESETS["tiny"])
    with torch.no_grad():
        a = model(**values)
        b = model(**{**values, "encoder_hidden_states": values["encoder_hidden_states"].flip(0)})
        c = model(**{**values, "t": values["t"].flip(0)})
    assert (a - b).abs().amin(dim=(1, 2, 3)).max() > 0 and (a - b).abs().max() > 1e-2
    assert (a - c).abs().max() > 1e-2


def test_scalar_t_and_null_class_labels():
    config = CONFIGS["class labels"]
    model = ConditionalUNet(config).eval()
    values = inputs(config)
    null = config.num_class_embeds - 1
    with torch.no_grad():
        scalar = model(**{**values, "t": 7, "class_labels": None})
        expected = model(**{**values, "t": torch.tensor([7, 7]), "class_labels": torch.tensor([null, null])})
        minus_one = model(**{**values, "t": 7.0, "class_labels": torch.tensor([-1, null])})
    torch.testing.assert_close(scalar, expected, rtol=0, atol=0)
    torch.testing.assert_close(minus_one, expected, rtol=0, atol=0)


def test_non_square_inputs_of_every_divisible_size():
    model = ConditionalUNet(PRESETS["tiny"]).eval()
    context = torch.randn(3, 5, 16)
    with torch.no_grad():
        for height, width in ((8, 16), (6, 4), (2, 2)):
            assert model(torch.randn(3, 4, height, width), 10, context).shape == (3, 4, height, width)
    with pytest.raises(ValueError, match="x is 7x8; H and W must be divisible by 2"):
        model(torch.randn(3, 4, 7, 8), 10, context)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.zeros(2, 3, 8, 8)}, r"x must be \[B, 4, H, W\]"),
        ({"encoder_hidden_states": torch.zeros(2, 5, 8)}, r"encoder_hidden_states must be \[2, L, 16\]"),
        ({"encoder_hidden_states": torch.zeros(1, 5, 16)}, r"encoder_hidden_states must be \[2, L, 16\]"),
        ({"encoder_attention_mask": torch.ones(2, 4)}, r"encoder_attention_mask must be \[2, 5\]"),
        ({"class_labels": torch.zeros(2)}, "class_labels given to a ConditionalUNet without a class embedding"),
        ({"t": torch.zeros(3)}, r"t must be a scalar or have shape \[2\]"),
    ],
)
def test_bad_tensors_are_value_errors(change, message):
    values = {"x": torch.zeros(2, 4, 8, 8), "t": 1, "encoder_hidden_states": torch.zeros(2, 5, 16), **change}
    with pytest.raises(ValueError, match=message):
        ConditionalUNet(PRESETS["tiny"])(**values)


def test_projection_needs_its_vectors():
    model = ConditionalUNet(CONFIGS["projection"])
    values = inputs(CONFIGS["projection"])
    for labels in (None, torch.zeros(2, 11)):
        with pytest.raises(ValueError, match=r"class_labels must be \[2, 12\] vectors"):
            model(**{**values, "class_labels": labels})


# --- configs ------------------------------------------------------------------------------------


def config_from_diffusers(values, source="config"):
    return UNET2D_CONDITION.build_config(ConditionalUNetConfig, values, source)


def test_stable_diffusion_configs_are_the_presets():
    assert config_from_diffusers(SD15_CONFIG) == PRESETS["sd15"] == ConditionalUNetConfig()
    assert config_from_diffusers(SD21_CONFIG) == PRESETS["sd2"]
    assert config_from_diffusers({**SD15_CONFIG, "sample_size": [64, 96]}).sample_size == (64, 96)


@pytest.mark.parametrize("config", [*PRESETS.values(), *CONFIGS.values()])
def test_config_round_trips(config, tmp_path):
    assert config_from_diffusers(json.loads(json.dumps(UNET2D_CONDITION.config_to(config)))) == config
    assert ConditionalUNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_every_field_current_diffusers_writes_is_read(diffusers, tmp_path):
    diffusers.UNet2DConditionModel.from_config(UNET2D_CONDITION.config_to(PRESETS["tiny"])).save_pretrained(tmp_path)
    assert config_from_diffusers(json.loads((tmp_path / "config.json").read_text())) == PRESETS["tiny"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("_class_name", "UNet2DModel"),
        ("act_fn", "gelu"),
        ("center_input_sample", True),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("mid_block_type", None),
        ("only_cross_attention", True),
        ("only_cross_attention", [False, True, False, False]),
        ("dual_cross_attention", True),
        ("addition_embed_type", "text_time"),
        ("encoder_hid_dim", 1024),
        ("class_embed_type", "timestep"),
        ("class_embeddings_concat", True),
        ("time_embedding_type", "fourier"),
        ("time_embedding_dim", 512),
        ("time_cond_proj_dim", 256),
        ("resnet_time_scale_shift", "scale_shift"),
        ("conv_in_kernel", 1),
        ("attention_type", "gated"),
        ("transformer_layers_per_block", [1, 2, 10, 10]),
        ("layers_per_block", [2, 2, 2, 2]),
        ("cross_attention_dim", [768, 768, 768, 768]),
        ("norm_num_groups", None),
        ("norm_num_groups", 24),
        ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D"] * 3),
        ("attention_head_dim", [8, 8]),
        ("attention_head_dim", 0),
        ("downsample_padding", 2),
        ("sample_size", [64, 60]),
        ("upcast_attention", "yes"),
        ("num_class_embeds", 1),
        ("some_future_field", 1),
    ],
)
def test_unsupported_diffusers_fields_are_named(tmp_path, field, value):
    with pytest.raises(UserError, match=f"config.json: .*{field}"):
        config_from_diffusers({**SD15_CONFIG, field: value}, source=tmp_path / "config.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_out_channels": (32, 36)}, "not all divisible by the 8 GroupNorm groups"),
        ({"block_out_channels": ()}, "block_out_channels must be a non-empty list"),
        ({"down_block_types": ("CrossAttnDownBlock2D",)}, "down_block_types must be a list of 2"),
        ({"up_block_types": ("UpBlock2D", "CrossAttnDownBlock2D")}, "up_block_types must be a list of 2"),
        ({"attention_head_dim": (2, 2, 2)}, "attention_head_dim must be a positive integer or a list of 2"),
        ({"attention_head_dim": 33}, r"heads exceed the width of their level \(width, heads\): \[\(32, 33\)\]"),
        ({"attention_head_dim": (1, 65)}, r"\(width, heads\): \[\(64, 65\)\]"),  # the middle's
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"cross_attention_dim": 0}, "cross_attention_dim must be a positive integer"),
        ({"layers_per_block": 1.0}, "layers_per_block must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"norm_eps": 0}, r"norm_eps must be a number in \(0, 1\)"),
        ({"use_linear_projection": 1}, "use_linear_projection must be true or false"),
        ({"class_embed_type": "projection"}, "projection_class_embeddings_input_dim must be a positive integer"),
        ({"projection_class_embeddings_input_dim": 8}, "projection_class_embeddings_input_dim must be null without"),
        ({"num_class_embeds": 1}, r"num_class_embeds must be null or an integer >= 2"),
        ({"sample_size": (8, 9)}, r"sample_size \(8, 9\) is not divisible by 2\*\*\(levels - 1\) = 2"),
        ({"sample_size": (8, 8, 8)}, "sample_size must be null, a positive integer or"),
    ],
)
def test_bad_configs_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(PRESETS["tiny"], **change)


def test_presets_by_name():
    assert ConditionalUNetConfig.preset("sd15") == ConditionalUNetConfig()
    with pytest.raises(UserError, match="unknown conditional U-Net preset 'sdxl'; choose one of sd15, sd2"):
        ConditionalUNetConfig.preset("sdxl")
    with pytest.raises(UserError, match="unknown conditional U-Net config key.*heads"):
        ConditionalUNetConfig.from_dict({**PRESETS["tiny"].to_dict(), "heads": 2})


@pytest.mark.parametrize("name", ["mnist-pairs", "mnist-pairs-latent", "tiny"])
def test_small_preset_parameter_counts_equal_diffusers(diffusers, name):
    theirs = diffusers.UNet2DConditionModel.from_config(UNET2D_CONDITION.config_to(PRESETS[name]))
    assert num_parameters(ConditionalUNet(PRESETS[name])) == num_parameters(theirs)


# --- our format ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_pretrained_round_trip(jitter, tmp_path):
    model = jitter(ConditionalUNet(CONFIGS["projection"]))
    model.save_pretrained(tmp_path)
    loaded = ConditionalUNet.from_pretrained(tmp_path)
    assert loaded.config == CONFIGS["projection"]
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_the_other_u_nets_directories_are_told_apart(tmp_path):
    ConditionalUNet(PRESETS["tiny"]).save_diffusers(tmp_path / "conditional")
    UNet(get_preset("tiny")).save_diffusers(tmp_path / "ddpm")
    with pytest.raises(UserError, match=r"not a ddpm conditional U-Net config .*ConditionalUNet.from_diffusers"):
        ConditionalUNet.from_pretrained(tmp_path / "conditional")
    with pytest.raises(UserError, match="_class_name is 'UNet2DModel', not 'UNet2DConditionModel'"):
        ConditionalUNet.from_diffusers(tmp_path / "ddpm")
    with pytest.raises(UserError, match="_class_name is 'UNet2DConditionModel', not 'UNet2DModel'"):
        UNet.from_diffusers(tmp_path / "conditional")
