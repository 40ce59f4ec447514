"""The U-Net against the paper: parameter counts, the timestep embedding formula, attention by
brute force, shapes, conditioning, and the configs it refuses."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch

from ddpm.errors import UserError
from ddpm.models import PRESETS, UNet, UNetConfig, get_preset, timestep_embedding
from ddpm.models.layers import UPSAMPLE_MIN_PIXELS
from ddpm.models.unet import AttnBlock, Upsample
from ddpm.runtime import num_parameters

# Measured once and cross-checked: cifar10 against diffusers' UNet2DModel of google/ddpm-cifar10-32
# (tests/test_diffusers_io.py) and the paper's "35.7M"; the 256 models against its "114M".
PARAM_COUNTS = {
    "cifar10": 35_746_307,
    "celebahq256": 113_673_219,
    "lsun256": 113_673_219,
    "mnist": 280_177,
    "digits": 176_849,
    "mnist-latent": 176_772,
    "cifar10-latent": 2_796_740,
    "tiny": 702_499,
    "tiny-latent": 665_636,
    "mnist-14": 284_513,
    "mnist-sr": 285_569,
    "cifar10-16": 25_838_595,
    "cifar10-sr": 9_036_227,
}
# Building a 114M-parameter model takes seconds: those presets are left to the slow set.
PRESET_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if PARAM_COUNTS.get(n, 0) > 100_000_000 else n
                 for n in PRESETS]


def count_ddpm_parameters(c: UNetConfig) -> int:
    """Parameters of DDPM's TF model, counted layer by layer from ``diffusion_tf/models/unet.py``
    (its loops over ``hs``), independently of our modules."""

    def conv(c_in, c_out, k=3):
        return c_out * c_in * k * k + c_out

    def dense(c_in, c_out):
        return c_in * c_out + c_out

    def resnet(c_in, c_out):
        n = 2 * c_in + conv(c_in, c_out) + dense(4 * c.ch, c_out) + 2 * c_out + conv(c_out, c_out)
        return n + (conv(c_in, c_out, 1) if c_in != c_out else 0)

    def attn(ch):
        return 2 * ch + 4 * dense(ch, ch)

    n = dense(c.ch, 4 * c.ch) + dense(4 * c.ch, 4 * c.ch) + conv(c.in_channels + c.low_res_channels, c.ch)
    if c.noise_level_embedding:  # a second timestep MLP for the augmentation level (Imagen)
        n += dense(c.ch, 4 * c.ch) + dense(4 * c.ch, 4 * c.ch)
    if c.num_classes:
        n += (c.num_classes + 1) * 4 * c.ch
    hs, h = [c.ch], c.ch
    for level, mult in enumerate(c.ch_mult):
        res = c.image_size // 2**level
        for _ in range(c.num_res_blocks):
            n += resnet(h, c.ch * mult) + (attn(c.ch * mult) if res in c.attn_resolutions else 0)
            h = c.ch * mult
            hs.append(h)
        if level != len(c.ch_mult) - 1:
            n += conv(h, h)
            hs.append(h)
    n += 2 * resnet(h, h) + attn(h)
    for level in reversed(range(len(c.ch_mult))):
        res = c.image_size // 2**level
        for _ in range(c.num_res_blocks + 1):
            out = c.ch * c.ch_mult[level]
            n += resnet(h + hs.pop(), out) + (attn(out) if res in c.attn_resolutions else 0)
            h = out
        if level != 0:
            n += conv(h, h)
    return n + 2 * h + conv(h, c.out_channels)


# --- parameter counts ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar10_has_the_papers_35_7m_parameters(preset_model):
    assert num_parameters(preset_model("cifar10")) == 35_746_307


@pytest.fixture(scope="module")
def preset_model(jitter):
    """``preset_model(name)``: the preset's model, seeded and jittered, built once per module
    (the 256 ones take seconds)."""

    @functools.cache
    def build(name: str) -> UNet:
        torch.manual_seed(0)
        return jitter(UNet(get_preset(name))).eval()

    return build


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_preset_parameter_counts(name, preset_model):
    model = preset_model(name)
    assert num_parameters(model) == PARAM_COUNTS[name] == count_ddpm_parameters(model.config)


@pytest.mark.slow
def test_parameter_count_with_options_matches_the_layer_by_layer_count():
    config = UNetConfig(image_size=16, in_channels=2, ch=64, ch_mult=(1, 2, 3),
                        num_res_blocks=3, attn_resolutions=(16, 4), learned_sigma=True,
                        num_classes=5, num_heads=2, low_res_channels=3, noise_level_embedding=True)
    assert num_parameters(UNet(config)) == count_ddpm_parameters(config)


# --- shapes, determinism ------------------------------------------------------------------------

# A small input for each preset: the 256 models run at 32x32, the least their six levels divide
# (the network is convolutional and keeps its attention levels), 1/64 of the cost.
SIDES = {"cifar10": 32, "celebahq256": 32, "lsun256": 32, "mnist": 28, "digits": 8, "tiny": 8, "mnist-latent": 7,
         "cifar10-latent": 8, "tiny-latent": 4, "mnist-14": 14, "mnist-sr": 28, "cifar10-16": 16, "cifar10-sr": 32}


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_presets_shapes_and_determinism(name, preset_model):
    model = preset_model(name)
    config = model.config
    torch.manual_seed(0)
    x = torch.randn(2, config.in_channels, SIDES[name], SIDES[name])
    t = torch.tensor([0, 999])
    sr = {}
    if config.low_res_channels:  # a super-resolution stage: the image at half the side, and its level
        sr = {"low_res": torch.randn(2, config.low_res_channels, SIDES[name] // 2, SIDES[name] // 2),
              "noise_level": torch.tensor([0.2, 0.9])}
    with torch.no_grad():
        out = model(x, t, **sr)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert torch.equal(out, model(x, t, **sr))


@pytest.mark.parametrize("name", ["mnist", "digits", "tiny"])
def test_same_seed_same_model(name):
    torch.manual_seed(0)
    a = UNet(get_preset(name))
    torch.manual_seed(0)
    b = UNet(get_preset(name))
    torch.manual_seed(1)
    c = UNet(get_preset(name))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_fresh_model_predicts_zero_as_ddpm_initialises():
    # init_scale=0. on the output convolution (Ho et al.'s TF code).
    model = UNet(get_preset("tiny"))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]))
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(model.down[0].block[0].conv2.weight) == 0
    assert torch.count_nonzero(model.mid.attn_1.proj_out.weight) == 0
    assert torch.count_nonzero(model.down[0].block[0].conv1.weight) > 0


def test_dropout_is_active_in_training_only(jitter):
    config = dataclasses.replace(get_preset("tiny"), dropout=0.5)
    model = jitter(UNet(config))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.equal(model.train()(x, t), model(x, t))
        assert torch.equal(model.eval()(x, t), model(x, t))


def test_every_parameter_gets_a_gradient(jitter):
    config = dataclasses.replace(get_preset("tiny"), num_classes=3, learned_sigma=True)
    model = jitter(UNet(config))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2]))
    out.square().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unused


def test_non_square_inputs(jitter):
    model = jitter(UNet(get_preset("tiny"))).eval()
    assert model(torch.randn(1, 3, 8, 16), torch.tensor([10])).shape == (1, 3, 8, 16)


# --- timesteps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [128, 33, 2 * 5])
def test_timestep_embedding_is_ddpms_formula(dim):
    t = np.array([0, 1, 17, 500, 999])
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    expected = np.pad(expected, ((0, 0), (0, dim % 2)))
    got64 = timestep_embedding(torch.from_numpy(t), dim, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-12)
    # float32, as DDPM and diffusers: t * f_i is rounded at t = 999 to about 1e-4.
    got32 = timestep_embedding(torch.from_numpy(t), dim).numpy()
    np.testing.assert_allclose(got32, expected, rtol=0, atol=5e-4)


def test_timestep_forms_agree(jitter):
    model = jitter(UNet(get_preset("tiny"))).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.tensor([42, 42, 42]))
        for t in (torch.tensor(42), torch.tensor([42]), torch.tensor([42.0] * 3), 42, 42.0):
            assert torch.equal(model(x, t), ref)
        assert not torch.equal(model(x, torch.tensor([43, 43, 43])), ref)
        with pytest.raises(ValueError, match="shape"):
            model(x, torch.tensor([1, 2]))


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_matches_ddpm_formula_in_float64(heads, jitter):
    torch.manual_seed(0)
    block = jitter(AttnBlock(64, num_heads=heads)).double()
    x = torch.randn(2, 64, 4, 6, dtype=torch.float64)
    # DDPM's attn_block, by hand: softmax over positions of q.k / sqrt(C_head).
    h = torch.nn.functional.group_norm(x, 32, block.norm.weight, block.norm.bias, eps=1e-6)
    tokens = h.flatten(2).transpose(1, 2)  # [B, L, C]
    wq, wk, wv = block.qkv.weight.chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    d = 64 // heads
    outs = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        q, k, v = (tokens @ w[s].T + b[s] for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ v)
    proj = torch.cat(outs, dim=-1) @ block.proj_out.weight.T + block.proj_out.bias
    expected = x + proj.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (6, 16, 19, 21)], ids=["upsampled", "four-kernels"])
def test_upsample_equals_nearest_upsampling_then_conv_in_float64(shape):
    # Below UPSAMPLE_MIN_PIXELS it upsamples and convolves; above it, the four 2x2 kernels must agree.
    assert (shape[0] * shape[2] * shape[3] >= UPSAMPLE_MIN_PIXELS) == (shape[2] == 19)
    torch.manual_seed(0)
    up = Upsample(16).double()
    x = torch.randn(*shape, dtype=torch.float64)
    plain = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), plain, rtol=1e-12, atol=1e-12)


# --- options ------------------------------------------------------------------------------------


def test_learned_sigma_doubles_output_channels():
    config = dataclasses.replace(get_preset("tiny"), learned_sigma=True)
    assert config.out_channels == 6
    assert UNet(config)(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])).shape == (2, 6, 8, 8)


def test_class_conditioning(jitter):
    config = dataclasses.replace(get_preset("tiny"), num_classes=10)
    model = jitter(UNet(config)).eval()
    assert model.class_emb.weight.shape == (11, 4 * config.ch)
    x, t = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1), torch.tensor([100])
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 7, -1]))
        assert not torch.allclose(out[0], out[1])
        assert not torch.allclose(out[0], out[2])
        assert torch.equal(out, model(x, t, torch.tensor([0, 7, 10])))  # Row C is the null.
        null = model(x, t, None)
        assert torch.equal(out[2], null[2])
        assert torch.equal(model(x, t, torch.tensor(7)), model(x, t, torch.tensor([7, 7, 7])))
        sevens = model(x, t, torch.tensor([7, 7, 7]))
        torch.testing.assert_close(sevens, out[1].expand(3, -1, -1, -1))


def test_labels_for_an_unconditional_model_are_a_bug():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(get_preset("tiny"))(torch.randn(1, 3, 8, 8), torch.tensor([0]), torch.tensor([1]))


def bilinear_2x(image: np.ndarray) -> np.ndarray:
    """2x bilinear upsampling [C, h, w] -> [C, 2h, 2w] with half-pixel centres (align_corners=False),
    written from the definition: output pixel i samples the input at (i + 0.5) / 2 - 0.5, clamped."""
    c, h, w = image.shape

    def weights(n):
        pos = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        return lo, hi, pos - lo

    (r0, r1, fr), (c0, c1, fc) = weights(h), weights(w)
    rows = image[:, r0, :] * (1 - fr)[None, :, None] + image[:, r1, :] * fr[None, :, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


def test_a_super_resolution_unet_reads_the_low_res_image_upsampled_bilinearly(jitter):
    config = dataclasses.replace(get_preset("tiny"), low_res_channels=3)
    model = jitter(UNet(config)).double().eval()
    assert model.conv_in.weight.shape == (32, 6, 3, 3)
    seen = []
    model.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 70])
    low_res = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        got = model(x, t, low_res=low_res)
        up = torch.from_numpy(np.stack([bilinear_2x(im) for im in low_res.numpy()]))
        torch.testing.assert_close(seen[0], torch.cat([x, up], 1), rtol=0, atol=1e-12)  # x_t first, as diffusers'
        assert torch.equal(model(x, t, low_res=seen[0][:, 3:]), got)  # at x_t's size it is taken as it is


def test_the_noise_level_is_embedded_like_a_timestep_of_1000_steps(jitter):
    config = dataclasses.replace(get_preset("tiny"), noise_level_embedding=True)
    model = jitter(UNet(config)).eval()
    x, t = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1), torch.tensor([40])
    with torch.no_grad():
        out = model(x, t, noise_level=torch.tensor([0.0, 0.2, 0.2]))
        assert not torch.allclose(out[0], out[1]) and torch.equal(out[1], out[2])
        torch.testing.assert_close(model(x, t, noise_level=0.2), out[1:2].expand(3, -1, -1, -1))
        emb = model.level_emb.dense1(torch.nn.functional.silu(model.level_emb.dense0(
            timestep_embedding(torch.tensor([200.0]), config.ch))))
        torch.testing.assert_close(model.level_emb(torch.tensor([0.2 * 1000])), emb)


@pytest.mark.parametrize("change, kwargs, message", [
    ({"low_res_channels": 3}, {}, "needs low_res"),
    ({"low_res_channels": 3}, {"low_res": torch.zeros(1, 1, 4, 4)}, r"low_res \[1, 3, h, w\]"),
    ({}, {"low_res": torch.zeros(1, 3, 4, 4)}, "without low_res_channels"),
    ({"noise_level_embedding": True}, {}, "give noise_level"),
    ({}, {"noise_level": 0.2}, "without noise_level_embedding"),
])
def test_super_resolution_inputs_that_do_not_fit_are_bugs(change, kwargs, message):
    model = UNet(dataclasses.replace(get_preset("tiny"), **change))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 8, 8), torch.tensor([0]), **kwargs)


def test_configs_saved_before_super_resolution_load_unchanged():
    old = {k: v for k, v in get_preset("tiny").to_dict().items() if k not in ("low_res_channels",
                                                                               "noise_level_embedding")}
    assert UNetConfig.from_dict(old) == get_preset("tiny")


@pytest.mark.parametrize(
    "shape, message",
    [((1, 1, 8, 8), r"\[B, 3, H, W\]"), ((1, 3, 8, 7), "divisible by 2"), ((3, 8, 8), "B, 3")],
)
def test_bad_inputs_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        UNet(get_preset("tiny"))(torch.randn(shape), torch.tensor([0]))


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 30}, r"image_size 30 is not divisible by 2\*\*\(len\(ch_mult\)-1\)=8"),
        ({"ch": 48}, "not divisible by the 32 GroupNorm groups"),
        ({"ch": 16, "norm_groups": 6}, "not divisible by the 6 GroupNorm groups"),
        ({"norm_groups": 0}, "norm_groups must be a positive integer"),
        ({"ch": 32, "ch_mult": (1, 1.5)}, "ch_mult must be a list of positive integers"),
        ({"ch_mult": ()}, "at least one level"),
        ({"attn_resolutions": (12,)}, "no level's resolution; the levels are 32, 16, 8, 4"),
        ({"num_heads": 3}, "num_heads 3 does not divide 256"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"num_res_blocks": 0}, "num_res_blocks must be a positive integer"),
        ({"num_classes": -1}, "num_classes"),
        ({"in_channels": True}, "in_channels"),
        ({"learned_sigma": 1}, "learned_sigma"),
    ],
)
def test_invalid_configs_raise_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(get_preset("cifar10"), **change)


def test_config_json_round_trip():
    config = dataclasses.replace(get_preset("mnist"), num_classes=10, learned_sigma=True)
    text = json.dumps(dataclasses.asdict(config))
    assert UNetConfig.from_dict(json.loads(text)) == config
    assert UNet(UNetConfig.from_dict(json.loads(text))).config == config


def test_config_rejects_unknown_keys():
    values = {**get_preset("tiny").to_dict(), "channels": 3}
    with pytest.raises(UserError, match="unknown U-Net config key.*channels.*valid keys"):
        UNetConfig.from_dict(values)


def test_unknown_preset_lists_the_valid_names():
    names = ("cifar10, celebahq256, lsun256, mnist, digits, mnist-latent, cifar10-latent, mnist-14, mnist-sr, "
             "cifar10-16, cifar10-sr, tiny")
    with pytest.raises(UserError, match=names):
        get_preset("imagenet")


def test_presets_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("cifar10").ch = 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="comparing the GPU with the CPU needs a CUDA device")
def test_gpu_forward_agrees_with_the_cpu_in_float32_channels_last_and_bf16():
    torch.manual_seed(0)
    cpu = UNet(dataclasses.replace(get_preset("tiny"), image_size=16, attn_resolutions=(8,)))
    with torch.no_grad():  # off the zero initialisation, so that the output depends on every layer
        for p in cpu.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpu.eval()
    gpu = UNet(cpu.config).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        reference = cpu(x, t)
        scale = reference.norm().item()
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fp32 = gpu(x.cuda(), t.cuda()).cpu()
            gpu.to(memory_format=torch.channels_last)
            last = gpu(x.cuda().contiguous(memory_format=torch.channels_last), t.cuda()).cpu()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(x.cuda(), t.cuda()).float().cpu()
    # float32 on both sides: only summation order differs (relative ~1e-6 per layer).
    assert (fp32 - reference).norm().item() <= 1e-4 * scale
    assert (last - reference).norm().item() <= 1e-4 * scale
    # bf16 keeps 8 bits of mantissa (relative 2^-9 per rounding); a few dozen roundings in a row
    # stay well inside 5% of the output's norm, while a wrong kernel or layout is off by O(1).
    assert (bf16 - reference).norm().item() <= 5e-2 * scale
