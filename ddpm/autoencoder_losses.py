"""The training objective of latent diffusion's KL autoencoders (Rombach et al. 2022, section 3.1
and appendix G; the LDM code's ``LPIPSWithDiscriminator``), after Esser et al. 2021 (VQGAN).

For images ``x`` ``[B, C, H, W]``, reconstructions ``x_rec = D(z)``, ``z ~ q(z | x)``:

    L_rec = sum_pixels |x - x_rec| + perceptual_weight * LPIPS(x, x_rec) * C H W      (per example)
    L_G   = mean_B L_rec + kl_weight * mean_B KL(q(z | x) || N(0, I)) + lambda * disc_weight * L_GAN
    L_GAN = -mean D_phi(x_rec),   L_D = 0.5 (mean relu(1 - D_phi(x)) + mean relu(1 + D_phi(x_rec)))

with the adaptive weight of Esser et al. 2021, eq. 7, ``lambda = ||grad_{G_L} L_rec|| /
(||grad_{G_L} L_GAN|| + 1e-4)`` clamped to [0, 1e4], at the decoder's last layer ``G_L``. The GAN
terms count from step ``disc_start`` on. Sums over pixels, not means, are the LDM code's: they are
what makes a KL weight of 1e-6 the right size. The LDM loss also holds a learned ``logvar`` dividing
``L_rec``, but its optimiser never receives it, so it stays 0 and is left out here.

Kept apart from :mod:`ddpm.losses`, the diffusion objective: this one owns networks (the
discriminator, LPIPS) and no part of the diffusion math uses it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.checkpoints import load_state_dict
from ddpm.errors import UserError, is_int
from ddpm.losses import sum_flat
from ddpm.models.autoencoder import DiagonalGaussian
from ddpm.models.io import load_matching_weights

# Esser et al. 2021, eq. 7: the denominator's delta, and the LDM code's clamp.
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4
DISC_NORMS = ("group", "batch")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Weights of the autoencoder objective; the defaults are the LDM KL-f4/f8 recipe with the
    perceptual term and the discriminator off.

    Attributes:
        kl_weight: weight of the KL term (LDM: 1e-6).
        perceptual_weight: weight of LPIPS (LDM: 1.0); needs ``lpips_path``.
        lpips_path: a local safetensors file with LPIPS-VGG16's backbone and linear weights in the
            ``lpips`` package's names (see :class:`LPIPS`); nothing is downloaded.
        disc_weight: weight of the GAN term after the adaptive weight (LDM: 0.5); 0 turns the
            discriminator off.
        disc_start: first training step with the GAN terms (LDM: 50001).
        disc_layers, disc_channels: the PatchGAN's depth and base width (taming: 3, 64).
        disc_norm: ``"group"`` (default) or ``"batch"`` (taming's choice); see
            :class:`NLayerDiscriminator`.
    """

    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    lpips_path: str | None = None
    disc_weight: float = 0.0
    disc_start: int = 50001
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "group"

    def __post_init__(self) -> None:
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise UserError(f"AutoencoderLossConfig.{name} must be a number >= 0, got {value!r}")
        for name, least in (("disc_start", 0), ("disc_layers", 1), ("disc_channels", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise UserError(f"AutoencoderLossConfig.{name} must be an integer >= {least}, got {value!r}")
        if self.disc_norm not in DISC_NORMS:
            raise UserError(f"AutoencoderLossConfig.disc_norm must be one of {DISC_NORMS}, got {self.disc_norm!r}")
        if self.perceptual_weight > 0 and self.lpips_path is None:
            raise UserError(
                "perceptual_weight > 0 needs lpips_path, a local safetensors file with LPIPS-VGG16 "
                "weights (they cannot be downloaded here)"
            )


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The hinge discriminator loss (Lim and Ye 2017; Esser et al. 2021's code):
    ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))``, a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """Esser et al. 2021, eq. 7: ``||grad L_rec|| / (||grad L_GAN|| + 1e-4)`` at ``last_layer``,
    clamped to [0, 1e4] and detached (a scalar). Both losses must depend on ``last_layer``."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX).detach()


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix (Isola et al. 2017) as taming-transformers uses it
    (Esser et al. 2021): 4x4 convolutions, ``n_layers`` of them with stride 2 and widths
    ``channels * min(2**i, 8)``, one more with stride 1, LeakyReLU(0.2), and a 1-channel 4x4
    output. ``[B, C, H, W] -> [B, 1, h, w]`` logits, one per patch (30x30 for 256x256, 2x2 for
    32x32 with 3 layers).

    Normalisation: GroupNorm (32 groups) by default instead of taming's BatchNorm. The
    discriminator sees real and reconstructed batches in separate calls, so BatchNorm normalises
    each by its own statistics, which on our small CPU batches (8 to 32 images) are noisy and give
    away which batch is which; GroupNorm is per example, has no running statistics to keep in
    checkpoints for an exact resume, and behaves the same in train and eval mode. ``norm="batch"``
    gives taming's network, whose state dict (``main.0.weight``, ...) loads as it is. The
    initialisation is taming's: N(0, 0.02) convolution weights, norm scales N(1, 0.02), zero
    shifts.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(n_layers + 1)]

        def norm_layer(width: int) -> nn.Module:
            return nn.GroupNorm(math.gcd(32, width), width) if norm == "group" else nn.BatchNorm2d(width)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            # No bias: the normalisation's shift follows.
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False), norm_layer(widths[i]),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


# VGG16's convolutional widths ("M": 2x2 max-pooling), and where LPIPS reads features: after the
# ReLUs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision's features[0:4], [4:9], ...).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_SLICES = (0, 4, 9, 16, 23, 30)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """The LPIPS distance with a VGG16 backbone (Zhang et al. 2018, version 0.1), in plain torch.

    ``lpips(x, y)`` for images in [-1, 1] ``[B, C, H, W]`` (C = 1 or 3, grey repeated to RGB;
    H, W >= 16) returns ``[B]``: the sum over five VGG16 layers of the spatial mean of
    ``w_l . (f_l(x) - f_l(y))^2``, with ``f_l`` the channel-normalised features. The parameter
    names are those of the ``lpips`` package's ``LPIPS(net="vgg")`` (``net.slice1.0.weight``, ...,
    ``lin0.model.1.weight``), so its state dict saved as safetensors loads here: ``save_file({k:
    v.clone() for k, v in lpips.LPIPS(net="vgg").state_dict().items()}, path)`` (``clone``: the
    package's ``lins`` list shares tensors with ``lin0..lin4``, which ``save_file`` refuses). The
    weights are frozen.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
                c_in = int(v)
        net = nn.Module()
        for k, (lo, hi) in enumerate(zip(_LPIPS_SLICES, _LPIPS_SLICES[1:]), 1):
            net.add_module(f"slice{k}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(lo, hi))))
        self.net = net
        for k, c in enumerate(_LPIPS_CHANNELS):
            # Index 0 is the package's dropout, inactive at evaluation; the names keep its place.
            self.add_module(f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
        # The package's ScalingLayer constants: ImageNet's statistics in [-1, 1] units.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """LPIPS with the weights of a local safetensors file (never a pickle); :class:`UserError`
        for a missing file or weights that do not fit."""
        state = {}
        for key, value in load_state_dict(path).items():
            if key.startswith("scaling_layer."):
                continue  # The package's constants, which are ours too.
            # lpips 0.1.4 lists its linear layers twice, as lin0..lin4 and as lins.0..lins.4.
            key = re.sub(r"^lins\.(\d)\.", r"lin\1.", key)
            state.setdefault(key, value)
        model = cls()
        load_matching_weights(model, state, path, "LPIPS-VGG16")
        return model.eval()

    def _features(self, x: Tensor) -> list[Tensor]:
        if x.shape[-1] < 16 or x.shape[-2] < 16:
            # Four 2x2 poolings before the last layer read.
            raise ValueError(f"LPIPS-VGG16 needs images of at least 16x16, got {tuple(x.shape)}")
        h = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale
        features = []
        for k in range(1, len(_LPIPS_SLICES)):
            h = getattr(self.net, f"slice{k}")(h)
            # 1e-10 as the package: its normalize_tensor.
            features.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return features

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        distance = x.new_zeros(x.shape[0])
        # One pass over both batches: half the kernel launches.
        for k, f in enumerate(self._features(torch.cat([x, y]))):
            fx, fy = f.chunk(2)
            distance = distance + getattr(self, f"lin{k}").model((fx - fy).square()).mean(dim=(1, 2, 3))
        return distance


class AutoencoderLoss(nn.Module):
    """The LDM autoencoder objective (module docstring), with its discriminator when
    ``disc_weight > 0`` and LPIPS when ``perceptual_weight > 0``.

    A training step calls :meth:`generator_loss` for the autoencoder's update and then, when
    :meth:`gan_active`, :meth:`discriminator_loss` for the discriminator's (on reconstructions
    detached from the autoencoder). Both return the scalar loss and detached terms for logging.
    """

    def __init__(self, config: AutoencoderLossConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        self.discriminator = (
            NLayerDiscriminator(in_channels, config.disc_channels, config.disc_layers, config.disc_norm)
            if config.disc_weight > 0 else None
        )
        self.lpips = LPIPS.from_file(config.lpips_path) if config.perceptual_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether step ``step`` (0-based) trains with the GAN terms."""
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction_loss(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """``L_rec`` per example ``[B]``: the L1 distance summed over pixels, plus the weighted
        LPIPS distance counted once per pixel and channel as in the LDM code."""
        rec = sum_flat((x - reconstruction).abs())
        if self.lpips is not None:
            rec = rec + self.config.perceptual_weight * self.lpips(x, reconstruction) * x[0].numel()
        return rec

    def generator_loss(
        self, x: Tensor, reconstruction: Tensor, posterior: DiagonalGaussian, step: int, last_layer: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_G`` (a scalar) for images ``x``, their reconstructions and posterior, at training
        step ``step``; ``last_layer`` is :attr:`AutoencoderKL.last_layer`. Without gradients
        (evaluation) the adaptive weight cannot be computed and the GAN term is left out."""
        rec = self.reconstruction_loss(x, reconstruction).mean()
        kl = posterior.kl().mean()
        loss = rec + self.config.kl_weight * kl
        terms = {"rec": rec, "kl": kl}
        if self.gan_active(step) and torch.is_grad_enabled():
            assert self.discriminator is not None
            gan = -self.discriminator(reconstruction).mean()
            weight = adaptive_weight(rec, gan, last_layer) * self.config.disc_weight
            loss = loss + weight * gan
            terms |= {"gan": gan, "adaptive_weight": weight}
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The hinge loss ``L_D`` (a scalar) on real images and detached reconstructions."""
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called without a discriminator (disc_weight = 0)")
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(reconstruction.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "disc_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
