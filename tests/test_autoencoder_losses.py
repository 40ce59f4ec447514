"""The autoencoder objective: the hinge loss and the adaptive weight against closed forms, the KL
weight and the GAN schedule, the discriminator's shapes, and LPIPS's mechanism with random weights
(the real ones cannot be downloaded here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from ddpm.autoencoder_losses import (
    ADAPTIVE_MAX,
    LPIPS,
    AutoencoderLoss,
    AutoencoderLossConfig,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
)
from ddpm.errors import UserError
from ddpm.models import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.autoencoder import DiagonalGaussian

TINY = AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8)


# --- math ---------------------------------------------------------------------------------------


def test_hinge_loss_equals_its_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    loss = hinge_d_loss(real, fake)
    # relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2.5): 0.5 (2.5/3 + 3.5/3) = 1.
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()
    # Gradient -1/6 where the margin is violated, 0 where it is met.
    torch.testing.assert_close(real.grad, torch.tensor([0.0, -1.0, -1.0]) / 6)
    torch.testing.assert_close(fake.grad, torch.tensor([0.0, 1.0, 1.0]) / 6)


def test_adaptive_weight_equals_the_closed_form_gradient_ratio():
    # A last layer W [3, 4] applied to features h [N, 4]: y = h W^T. With L_rec = sum |y - t| and
    # L_GAN = -mean(y a) the gradients are sign(y - t)^T h and -(a 1^T)^T h / N: by hand.
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=generator)
    target = torch.randn(5, 3, generator=generator)
    a = torch.tensor([0.3, -1.0, 2.0])
    weight = torch.randn(3, 4, generator=generator, requires_grad=True)
    y = h @ weight.T
    rec, gan = (y - target).abs().sum(), -(y @ a).mean()
    rec_grad = torch.sign(y - target).detach().T @ h
    gan_grad = -a[:, None] * h.sum(0)[None, :] / 5
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    got = adaptive_weight(rec, gan, weight)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    # The graph is kept for the step's backward.
    (rec + got * gan).backward()
    torch.testing.assert_close(weight.grad, rec_grad + expected * gan_grad)


def test_adaptive_weight_is_clamped_when_the_gan_gradient_vanishes():
    weight = torch.ones(2, requires_grad=True)
    rec, gan = (3 * weight).sum(), (0 * weight).sum()  # ||grad|| = 3 * sqrt(2) / 1e-4 > 1e4.
    assert adaptive_weight(rec, gan, weight).item() == ADAPTIVE_MAX


def _batch(generator_seed: int = 0):
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    reconstruction = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4, generator=generator))
    return x, reconstruction, posterior


def test_generator_loss_is_l1_sum_plus_weighted_kl_before_disc_start():
    x, reconstruction, posterior = _batch()
    # Per example: the L1 distance summed over 3 * 16 * 16 values; then the batch mean.
    rec = (x - reconstruction).abs().flatten(1).sum(1).mean()
    kl = posterior.kl().mean()
    for kl_weight in (1e-6, 0.5):
        loss_fn = AutoencoderLoss(AutoencoderLossConfig(kl_weight=kl_weight, disc_weight=0.5, disc_start=10))
        loss, terms = loss_fn.generator_loss(x, reconstruction, posterior, step=9, last_layer=torch.zeros(1))
        torch.testing.assert_close(loss, rec + kl_weight * kl)
        assert set(terms) == {"loss", "rec", "kl"}
        torch.testing.assert_close(terms["kl"], kl)
    assert not loss_fn.gan_active(9) and loss_fn.gan_active(10)


def test_gan_term_from_disc_start_with_the_adaptive_weight():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY)
    config = AutoencoderLossConfig(disc_weight=0.5, disc_start=3, disc_channels=8, disc_layers=2)
    loss_fn = AutoencoderLoss(config)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, posterior = model(x)
    loss, terms = loss_fn.generator_loss(x, reconstruction, posterior, step=3, last_layer=model.last_layer)
    rec = (x - reconstruction).abs().flatten(1).sum(1).mean()
    gan = -loss_fn.discriminator(reconstruction).mean()
    rec_grad, = torch.autograd.grad(rec, model.last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan, model.last_layer, retain_graph=True)
    weight = 0.5 * rec_grad.norm() / (gan_grad.norm() + 1e-4)
    torch.testing.assert_close(terms["adaptive_weight"], weight)
    torch.testing.assert_close(loss, rec + 1e-6 * posterior.kl().mean() + weight * gan)
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None
    # Evaluation without gradients leaves the GAN term out.
    with torch.no_grad():
        _, terms = loss_fn.generator_loss(x, reconstruction, posterior, step=3, last_layer=model.last_layer)
    assert "gan" not in terms


def test_discriminator_loss_is_the_hinge_on_detached_reconstructions():
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_weight=1.0, disc_channels=8, disc_layers=2))
    x, reconstruction, _ = _batch()
    reconstruction.requires_grad_(True)
    loss, terms = loss_fn.discriminator_loss(x, reconstruction)
    disc = loss_fn.discriminator
    torch.testing.assert_close(loss, hinge_d_loss(disc(x), disc(reconstruction)))
    loss.backward()
    assert reconstruction.grad is None and disc.main[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="without a discriminator"):
        AutoencoderLoss(AutoencoderLossConfig()).discriminator_loss(x, reconstruction)


# --- networks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side, patches", [(256, 30), (32, 2), (28, 1)])
def test_patchgan_output_sizes(side, patches):
    disc = NLayerDiscriminator(in_channels=1)
    with torch.no_grad():
        assert disc(torch.zeros(1, 1, side, side)).shape == (1, 1, patches, patches)


def test_patchgan_has_taming_layout():
    # taming's NLayerDiscriminator(3, 64, 3) with BatchNorm: 4x4 convolutions 3->64 (bias),
    # 64->128, 128->256 (stride 2), 256->512 (stride 1), without biases, and 512->1 (bias).
    disc = NLayerDiscriminator(norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.bias is not None) for c in convs] == [
        (3, 64, 2, True), (64, 128, 2, False), (128, 256, 2, False), (256, 512, 1, False), (512, 1, 1, True)]
    # The same positions in one nn.Sequential called main, so taming's state dict loads as it is.
    assert [k for k in disc.state_dict() if k.endswith("weight")] == [
        f"main.{i}.weight" for i in (0, 2, 3, 5, 6, 8, 9, 11)]
    norms = sum(2 * c for c in (128, 256, 512))
    assert sum(p.numel() for p in disc.parameters()) == sum(c.weight.numel() for c in convs) + 64 + 1 + norms
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in NLayerDiscriminator().modules()) == 3


# The parameter names of the lpips package's LPIPS(net="vgg") (lpips/lpips.py and
# pretrained_networks.py): torchvision's VGG16 feature indices within five slices.
LPIPS_NAMES = [
    f"net.slice{k}.{i}.{p}"
    for k, indices in enumerate([(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)], 1)
    for i in indices for p in ("weight", "bias")
] + [f"lin{k}.model.1.weight" for k in range(5)]


def seeded_lpips_state() -> dict[str, torch.Tensor]:
    """LPIPS weights from a fixed seed: He-scaled convolutions (so that the deep features do not
    vanish), small biases, non-negative linear weights as LPIPS learns them."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, value in sorted(LPIPS().state_dict().items()):
        noise = torch.randn(value.shape, generator=generator)
        if name.startswith("lin"):
            state[name] = noise.abs() * 0.1
        elif name.endswith("weight"):
            state[name] = noise * (2 / value[0].numel()) ** 0.5
        else:
            state[name] = noise * 0.01
    return state


# lpips 0.1.4 (the package, with torchvision 0.28's VGG16) on seeded_lpips_state() and the inputs
# of test_lpips_equals_the_lpips_package: distances measured once with the package, which needs
# torchvision and is not installed here.
LPIPS_PACKAGE_DISTANCES = [0.120955668, 0.12229497, 0.120468847]


@pytest.fixture
def lpips_file(tmp_path):
    state = seeded_lpips_state()
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)  # The package saves its constants too,
    state |= {f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"].clone() for k in range(5)}  # and twice.
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(state, path)
    return path, state


def lpips_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))


@pytest.mark.slow
def test_lpips_equals_the_lpips_package(lpips_file):
    with torch.no_grad():
        distances = LPIPS.from_file(lpips_file[0])(*lpips_inputs())
    torch.testing.assert_close(distances, torch.tensor(LPIPS_PACKAGE_DISTANCES), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_lpips_names_and_mechanism(lpips_file):
    path, state = lpips_file
    assert sorted(LPIPS().state_dict()) == sorted(LPIPS_NAMES)
    lpips = LPIPS.from_file(path)
    x, y = lpips_inputs()
    with torch.no_grad():
        d = lpips(x, y)
        assert d.shape == (3,) and (d > 0).all()
        torch.testing.assert_close(lpips(y, x), d)
        torch.testing.assert_close(lpips(x, x), torch.zeros(3))
        # Linear in the learned weights.
        for k in range(5):
            getattr(lpips, f"lin{k}").model[1].weight.mul_(2)
        torch.testing.assert_close(lpips(x, y), 2 * d)
    assert not any(p.requires_grad for p in lpips.parameters())
    assert lpips(x[:, :1], y[:, :1]).shape == (3,)  # Grey images.
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips(x[:, :, :8], y[:, :, :8])


@pytest.mark.slow
def test_perceptual_term_counts_once_per_pixel(lpips_file):
    path, _ = lpips_file
    config = AutoencoderLossConfig(perceptual_weight=0.25, lpips_path=str(path))
    loss_fn = AutoencoderLoss(config)
    x, reconstruction, posterior = _batch()
    with torch.no_grad():
        loss, terms = loss_fn.generator_loss(x, reconstruction, posterior, step=0, last_layer=torch.zeros(1))
        l1 = (x - reconstruction).abs().flatten(1).sum(1)
        expected = (l1 + 0.25 * loss_fn.lpips(x, reconstruction) * 3 * 16 * 16).mean()
    torch.testing.assert_close(terms["rec"], expected)


# --- faults -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lpips_files_that_do_not_fit_are_user_errors(lpips_file, tmp_path):
    path, state = lpips_file
    with pytest.raises(UserError, match="nowhere.safetensors: no such file"):
        LPIPS.from_file(tmp_path / "nowhere.safetensors")
    del state["lin4.model.1.weight"]
    save_file(state, path)
    LPIPS.from_file(path)  # The package's second name for the layer is enough; no name is not.
    del state["lins.4.model.1.weight"]
    save_file(state, path)
    with pytest.raises(UserError, match=r"lpips_vgg.safetensors: .*1 missing \(lin4.model.1.weight\)"):
        LPIPS.from_file(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        LPIPS.from_file(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"perceptual_weight": 1.0}, "perceptual_weight > 0 needs lpips_path"),
        ({"kl_weight": -1e-6}, "kl_weight must be a number >= 0"),
        ({"disc_start": -1}, "disc_start must be an integer >= 0"),
        ({"disc_norm": "instance"}, "disc_norm must be one of"),
    ],
)
def test_bad_loss_configs_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(AutoencoderLossConfig(), **change)
