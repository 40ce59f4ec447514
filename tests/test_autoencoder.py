"""The latent-diffusion autoencoder: its posterior against torch.distributions, its network against
diffusers' AutoencoderKL with random weights (names, parameter counts, encodings and decodings),
its diffusers and pretrained I/O, and user errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoints import malicious_pickle
from torch.distributions import Normal, kl_divergence

from ddpm.errors import UserError
from ddpm.models import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.autoencoder import PRESETS, DiagonalGaussian
from ddpm.models.diffusers_io import AUTOENCODER_KL
from ddpm.runtime import num_parameters


def config_from_diffusers(values, source="config"):
    return AUTOENCODER_KL.build_config(AutoencoderKLConfig, values, source)


config_to_diffusers = AUTOENCODER_KL.config_to

# Two levels at most, every kind of module (shortcut, resamplers, attention), 3 latent channels.
SMALL = AutoencoderKLConfig(
    in_channels=3, out_channels=2, block_out_channels=(16, 32, 32), layers_per_block=2,
    latent_channels=3, norm_num_groups=8, scaling_factor=0.5, sample_size=16,
)
# The form of stabilityai/sd-vae-ft-mse's config.json, written by an old diffusers: no
# scaling_factor, force_upcast, use_quant_conv... (each takes diffusers' default).
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Measured max |ours - diffusers| is below 1e-5 for outputs of size ~1 (float32 sums in another
# order; our upsampling is four 2x2 convolutions instead of nearest x2 and a 3x3 one).
ATOL = 5e-5


@pytest.fixture(scope="module")
def diffusers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # Before diffusers reads the environment: nothing downloads.
    return pytest.importorskip("diffusers", reason="diffusers is the reference for the autoencoder")


def reference(diffusers, config: AutoencoderKLConfig, jitter, seed: int = 0):
    torch.manual_seed(seed)
    return jitter(diffusers.AutoencoderKL.from_config(config_to_diffusers(config)), seed=seed).eval()


def assert_same_outputs(ours: AutoencoderKL, theirs, batch: int = 2, height: int = 16, width: int = 16) -> None:
    """Equal posterior mean and log-variance, decodings of the same latents, and samples from
    equally seeded generators."""
    x = torch.randn(batch, ours.config.in_channels, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours.eval().encode(x), theirs.eval().encode(x).latent_dist
        torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(got.logvar, expected.logvar, rtol=0, atol=ATOL)
        z = expected.sample(torch.Generator().manual_seed(2))
        torch.testing.assert_close(got.sample(torch.Generator().manual_seed(2)), z, rtol=0, atol=ATOL)
        decoded = ours.decode(z)
        torch.testing.assert_close(decoded, theirs.decode(z).sample, rtol=0, atol=ATOL)
    f = ours.config.downsampling_factor
    assert got.mean.shape == (batch, ours.config.latent_channels, height // f, width // f)
    assert decoded.shape == (batch, ours.config.out_channels, height, width)


# --- math: the posterior ------------------------------------------------------------------------


def test_kl_and_nll_equal_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    parameters = torch.randn(3, 8, 2, 5, generator=generator, dtype=torch.float64) * 2
    posterior = DiagonalGaussian(parameters)
    q = Normal(posterior.mean, posterior.std)
    expected_kl = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected_kl, rtol=1e-12, atol=1e-12)
    z = torch.randn(3, 4, 2, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(posterior.nll(z), -q.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    assert posterior.mode() is posterior.mean and posterior.kl().shape == (3,)


def test_logvar_is_clamped_as_diffusers_does():
    parameters = torch.tensor([0.0, 0.0, -100.0, 100.0]).view(1, 4, 1, 1)
    posterior = DiagonalGaussian(parameters)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(posterior.std.flatten(), torch.tensor([math.exp(-15), math.exp(10)]))


def test_sample_moments_match_the_distribution():
    # n draws per channel of N(mu, sigma^2). The sample mean has standard error sigma / sqrt(n) and
    # the sample variance sigma^2 sqrt(2 / (n - 1)); 4 standard errors fail a correct sampler with
    # probability 6e-5 per check (the seed is fixed, so the test is deterministic anyway).
    n = 20_000
    mu = torch.tensor([0.5, -1.0, 3.0])
    sigma = torch.tensor([0.5, 2.0, 1e-3])
    parameters = torch.cat([mu, 2 * sigma.log()]).view(1, 6, 1, 1).expand(n, 6, 1, 1)
    draws = DiagonalGaussian(parameters).sample(torch.Generator().manual_seed(0)).view(n, 3).double()
    mean_error = (draws.mean(0) - mu) / (sigma / math.sqrt(n))
    var_error = (draws.var(0) - sigma**2) / (sigma**2 * math.sqrt(2 / (n - 1)))
    assert mean_error.abs().max() < 4 and var_error.abs().max() < 4, (mean_error, var_error)
    # The same generator state gives the same draw; another seed another one.
    again = DiagonalGaussian(parameters).sample(torch.Generator().manual_seed(0)).view(n, 3).double()
    assert torch.equal(draws, again)
    other = DiagonalGaussian(parameters).sample(torch.Generator().manual_seed(1)).view(n, 3).double()
    assert not torch.equal(draws, other)


# --- the model against diffusers ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-f4", "cifar10-f4", "cifar10-f2"])  # sd: below.
def test_parameter_counts_equal_diffusers(diffusers, name):
    config = PRESETS[name]
    theirs = diffusers.AutoencoderKL.from_config(config_to_diffusers(config))
    assert num_parameters(AutoencoderKL(config)) == sum(p.numel() for p in theirs.parameters())


@pytest.fixture(scope="module")
def sd_pair(diffusers, jitter):
    """Stable Diffusion's autoencoder in diffusers, randomly perturbed, and ours with its weights."""
    theirs = reference(diffusers, PRESETS["sd"], jitter)
    ours = AutoencoderKL(PRESETS["sd"])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.slow
def test_stable_diffusion_config_has_diffusers_names_and_outputs(sd_pair):
    ours, theirs = sd_pair
    assert num_parameters(ours) == sum(p.numel() for p in theirs.parameters()) == 83_653_863
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # Both ways, as the next line.
    assert_same_outputs(ours, theirs, batch=1, height=32, width=32)


CONFIGS = {
    "small": SMALL,
    "mnist-f4": PRESETS["mnist-f4"],
    "cifar10-f2": PRESETS["cifar10-f2"],
    "one level": dataclasses.replace(SMALL, block_out_channels=(32,), layers_per_block=1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_equal_encodings_and_decodings_with_strict_loading_both_ways(diffusers, jitter, name):
    config = CONFIGS[name]
    theirs = reference(diffusers, config, jitter)
    ours = AutoencoderKL(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, height=28 if name == "mnist-f4" else 16, width=28 if name == "mnist-f4" else 24)
    # And a model of ours, perturbed, loaded into diffusers.
    torch.manual_seed(1)
    ours = jitter(AutoencoderKL(config), seed=1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, batch=1)


def test_save_diffusers_loads_in_diffusers(diffusers, jitter, tmp_path):
    ours = jitter(AutoencoderKL(SMALL))
    ours.save_diffusers(tmp_path)
    theirs, info = diffusers.AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert theirs.config.scaling_factor == SMALL.scaling_factor
    assert_same_outputs(ours, theirs)


def _legacy(directory, names: bool = True, conv_shaped: bool = False) -> None:
    path = directory / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for key, value in load_file(path).items():
        for new, old in LEGACY.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.") if names else key
                if conv_shaped and value.ndim == 2:
                    value = value[:, :, None, None]
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed) == names
    assert any(v.ndim == 4 and ".attentions." in k for k, v in renamed.items()) == conv_shaped
    save_file(renamed, path)


VARIANTS = {
    "plain": None,
    "legacy attention names": _legacy,
    "legacy names, 1x1-conv weights": lambda d: _legacy(d, conv_shaped=True),
    "1x1-conv weights": lambda d: _legacy(d, names=False, conv_shaped=True),
    "bin": "bin",
    "a pipeline's vae folder": "pipeline",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_diffusers_reads_diffusers_directories(diffusers, jitter, tmp_path, variant):
    change = VARIANTS[variant]
    theirs = reference(diffusers, SMALL, jitter)
    directory = tmp_path / "vae" if change == "pipeline" else tmp_path
    theirs.save_pretrained(directory, safe_serialization=change != "bin")
    if callable(change):
        change(tmp_path)
    if change == "bin":
        assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    ours = AutoencoderKL.from_diffusers(tmp_path)
    assert ours.config == SMALL
    assert_same_outputs(ours, theirs)


# --- configs and our own format -----------------------------------------------------------------


def test_diffusers_configs_map_both_ways():
    assert config_from_diffusers(SD_VAE_CONFIG) == PRESETS["sd"]
    for config in (*PRESETS.values(), SMALL):
        assert config_from_diffusers(json.loads(json.dumps(config_to_diffusers(config)))) == config
    assert config_from_diffusers({**SD_VAE_CONFIG, "sample_size": [64, 64]}).sample_size == 64
    # A rectangular training size (the two-digit MNIST images): diffusers' [height, width].
    wide = config_from_diffusers({**SD_VAE_CONFIG, "sample_size": [28, 56]})
    assert wide.sample_size == (28, 56) and wide.image_size == (28, 56)
    assert config_to_diffusers(wide)["sample_size"] == (28, 56)


@pytest.mark.parametrize(
    "field, value",
    [
        ("_class_name", "VQModel"),
        ("shift_factor", 0.0609),
        ("latents_mean", [0.0] * 4),
        ("use_quant_conv", False),
        ("mid_block_add_attention", False),
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D"] * 3),
        ("up_block_types", ["AttnUpDecoderBlock2D"] * 4),
        ("up_block_types", 4),
        ("norm_num_groups", 24),
        ("block_out_channels", []),
        ("sample_size", [64, 32, 16]),
        ("dropout", 0.1),
    ],
)
def test_unsupported_diffusers_fields_are_named(tmp_path, field, value):
    with pytest.raises(UserError, match=f"config.json: .*{field}"):
        config_from_diffusers({**SD_VAE_CONFIG, field: value}, source=tmp_path / "config.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_out_channels": (32, 40)}, "not all divisible by the 16 GroupNorm groups"),
        ({"block_out_channels": ()}, "block_out_channels must be a non-empty list"),
        ({"latent_channels": 0}, "latent_channels must be a positive integer"),
        ({"layers_per_block": 1.5}, "layers_per_block must be a positive integer"),
        ({"scaling_factor": 0.0}, "scaling_factor must be a positive number"),
        ({"scaling_factor": float("nan")}, "scaling_factor must be a positive number"),
    ],
)
def test_bad_configs_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(PRESETS["cifar10-f4"], **change)


def test_presets_by_name_and_their_latent_shapes():
    assert AutoencoderKLConfig.preset("sd") == AutoencoderKLConfig()
    with pytest.raises(UserError, match="unknown autoencoder preset 'f8'; choose one of sd, mnist-f4"):
        AutoencoderKLConfig.preset("f8")
    with pytest.raises(UserError, match="unknown autoencoder config key.*channels"):
        AutoencoderKLConfig.from_dict({**SMALL.to_dict(), "channels": 3})
    for name, side, latent_side in (("mnist-f4", 28, 7), ("cifar10-f4", 32, 8), ("cifar10-f2", 32, 16)):
        config = PRESETS[name]
        model = AutoencoderKL(config)
        x = torch.randn(1, config.in_channels, side, side)
        with torch.no_grad():
            reconstruction, posterior = model(x)
        assert posterior.mean.shape == (1, 4, latent_side, latent_side)
        assert reconstruction.shape == x.shape


def test_forward_decodes_the_mode_or_a_seeded_sample():
    model = AutoencoderKL(SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reconstruction, posterior = model(x)
        torch.testing.assert_close(reconstruction, model.decode(posterior.mean))
        sampled, _ = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
        z = posterior.sample(torch.Generator().manual_seed(5))
        torch.testing.assert_close(sampled, model.decode(z))
    assert model.last_layer is model.decoder.conv_out.weight


def test_bad_tensors_are_value_errors():
    model = AutoencoderKL(SMALL)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\], got \(2, 1, 16, 16\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="x is 16x18; H and W must be divisible by 4"):
        model.encode(torch.zeros(2, 3, 16, 18))
    with pytest.raises(ValueError, match=r"z must be \[B, 3, H, W\]"):
        model.decode(torch.zeros(2, 4, 4, 4))


def test_save_pretrained_round_trip(jitter, tmp_path):
    model = jitter(AutoencoderKL(SMALL))
    model.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == SMALL
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


# --- faults -------------------------------------------------------------------------------------


@pytest.fixture
def small_dir(tmp_path):
    AutoencoderKL(SMALL).save_diffusers(tmp_path)
    return tmp_path


def test_a_pickle_that_would_run_code_is_never_executed(small_dir):
    # test_checkpoints proves that this payload runs when unpickled plainly.
    marker = small_dir / "ran"
    (small_dir / "diffusion_pytorch_model.safetensors").unlink()
    (small_dir / "diffusion_pytorch_model.bin").write_bytes(malicious_pickle(marker))
    with pytest.raises(UserError, match="diffusion_pytorch_model.bin: not a loadable weights-only"):
        AutoencoderKL.from_diffusers(small_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no weights", "neither diffusion_pytorch_model.safetensors nor"),
        ("garbage weights", "diffusion_pytorch_model.safetensors: not a readable safetensors"),
        ("renamed weight", r"weights do not fit this autoencoder config: 1 missing \(encoder.conv_in.weight\); "
                           r"1 unexpected \(encoder.bogus.weight\)"),
        ("wrong width", r"1 shape mismatch \(encoder.conv_in.weight \[16, 3, 3, 3\] != \[16, 1, 3, 3\]"),
        ("no dir", "not a diffusers model directory"),
        ("no config", "config.json: no such file"),
        ("not json", "config.json: not valid JSON"),
        ("our format", "config.json: .*_class_name is None"),
    ],
)
def test_damaged_diffusers_dirs_raise_user_errors(small_dir, damage, message):
    weights, config = small_dir / "diffusion_pytorch_model.safetensors", small_dir / "config.json"
    directory = small_dir
    if damage == "no weights":
        weights.unlink()
    elif damage == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "renamed weight":
        state = load_file(weights)
        state["encoder.bogus.weight"] = state.pop("encoder.conv_in.weight")
        save_file(state, weights)
    elif damage == "wrong width":
        config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 1}))
    elif damage == "no dir":
        directory = small_dir / "nowhere"
    elif damage == "no config":
        config.unlink()
    elif damage == "not json":
        config.write_text("{")
    elif damage == "our format":
        AutoencoderKL(SMALL).save_pretrained(small_dir)
    with pytest.raises(UserError, match=message):
        AutoencoderKL.from_diffusers(directory)


def test_from_pretrained_points_a_diffusers_directory_to_from_diffusers(small_dir):
    with pytest.raises(UserError, match=r"not a ddpm autoencoder config .*AutoencoderKL.from_diffusers"):
        AutoencoderKL.from_pretrained(small_dir)
