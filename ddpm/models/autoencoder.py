"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3 and appendix
G), in the layout and parameter names of diffusers' ``AutoencoderKL``.

An encoder maps an image ``[B, C, H, W]`` to a diagonal Gaussian over latents
``[B, latent_channels, H/f, W/f]`` with ``f = 2**(len(block_out_channels) - 1)``, and a decoder
maps latents back to images. Diffusion runs on ``z * scaling_factor`` (section 4.3.2: the factor
makes the latents roughly unit-variance); decoding divides by it again.

Layout, as diffusers' ``Encoder``/``Decoder`` (``DownEncoderBlock2D`` / ``UpDecoderBlock2D``):
``conv_in``; per level, ``layers_per_block`` residual blocks (``+ 1`` in the decoder) and a
resampler (a stride-2 3x3 convolution after one zero row and column at the bottom-right on the way
down, nearest x2 and a 3x3 convolution on the way up) at every level but the last; a middle of
resnet, single-head attention, resnet; ``conv_norm_out``, SiLU, ``conv_out``. GroupNorm eps is
1e-6 throughout. The encoder outputs ``2 * latent_channels`` channels (mean and log-variance),
followed by the 1x1 ``quant_conv``; the decoder starts with the 1x1 ``post_quant_conv``.

The state dict has diffusers' names exactly, so ``save_diffusers`` writes it unchanged; reading
also accepts the attention names of diffusers before 0.14 (``query``, ``key``, ``value``,
``proj_attn``), which checkpoints such as ``stabilityai/sd-vae-ft-mse`` may still carry
(:data:`ddpm.models.diffusers_io.AUTOENCODER_KL`). Tiling, slicing and other variants
(``shift_factor``, no attention in the middle) are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import UserError, is_int
from ddpm.losses import normal_kl, sum_flat
from ddpm.models.diffusers_io import AUTOENCODER_KL
from ddpm.models.io import ModelConfig, SavedModel
from ddpm.models.layers import Downsample, ResnetBlock2D, Upsample, conv3x3, group_norm, norm_silu

# diffusers (after the LDM code) clamps the log-variance so that exp() neither overflows nor
# underflows: std stays within [3e-7, 2.2e4].
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """The shape of an :class:`AutoencoderKL`, with diffusers' field names. The defaults are
    Stable Diffusion's KL-f8 autoencoder; :data:`PRESETS` names the others.

    Attributes:
        in_channels, out_channels: image channels in and out.
        block_out_channels: width of each level; ``len - 1`` downsamplings of 2.
        layers_per_block: residual blocks per encoder level (the decoder has one more).
        latent_channels: channels of the latent ``z``.
        norm_num_groups: GroupNorm groups; must divide every width.
        scaling_factor: ``z * scaling_factor`` is what diffusion sees (Rombach et al. 2022,
            section 4.3.2 and appendix D.1: one over the latents' standard deviation).
        sample_size: side of the training images, or ``(height, width)`` (informational, as in diffusers).
    """

    KIND: ClassVar[str] = "autoencoder"

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int | tuple[int, int] = 256

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "sample_size"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UserError(f"AutoencoderKLConfig.{name} must be a positive integer, got {value!r}")
        size = self.sample_size
        sides = size if isinstance(size, tuple) and len(size) == 2 else (size,)
        if not all(is_int(v) and v > 0 for v in sides):
            raise UserError(f"AutoencoderKLConfig.sample_size must be a positive integer or [height, width], "
                            f"got {size!r}")
        widths = self.block_out_channels
        if not isinstance(widths, tuple) or not widths or not all(is_int(w) and w > 0 for w in widths):
            raise UserError(
                f"AutoencoderKLConfig.block_out_channels must be a non-empty list of positive "
                f"integers, got {widths!r}"
            )
        if any(w % self.norm_num_groups for w in widths):
            raise UserError(
                f"block_out_channels {list(widths)} are not all divisible by the "
                f"{self.norm_num_groups} GroupNorm groups (norm_num_groups)"
            )
        scale = self.scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise UserError(f"AutoencoderKLConfig.scaling_factor must be a positive number, got {scale!r}")

    @property
    def downsampling_factor(self) -> int:
        """``f``: how many image pixels per side one latent pixel covers."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the training images."""
        size = self.sample_size
        return (size, size) if isinstance(size, int) else size





PRESETS: dict[str, AutoencoderKLConfig] = {
    # Stable Diffusion's KL-f8 (CompVis/stable-diffusion-v1-4's vae, stabilityai/sd-vae-ft-mse):
    # 83,653,863 parameters, the count of diffusers' AutoencoderKL with this config.
    "sd": AutoencoderKLConfig(),
    # Sized for 2 CPU cores, f = 4: MNIST 28 -> 14 -> 7 (7x7x4 latents), CIFAR-10 32 -> 8 (8x8x4),
    # or 32 -> 16 with cifar10-f2. scaling_factor 1 here; a trained model's is measured at the end
    # of its run (ddpm.train_autoencoder.latent_scale). Parameter counts equal diffusers' (tests);
    # speeds and reconstruction quality are in bench/RESULTS.md (python -m bench.latent).
    "mnist-f4": AutoencoderKLConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        norm_num_groups=16, scaling_factor=1.0, sample_size=28,
    ),
    "cifar10-f4": AutoencoderKLConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        scaling_factor=1.0, sample_size=32,
    ),
    "cifar10-f2": AutoencoderKLConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        scaling_factor=1.0, sample_size=32,
    ),
    # mnist-f4 for the two-digit captioned MNIST images, 28x56 to 7x14x4 latents.
    "mnist-pairs-f4": AutoencoderKLConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        norm_num_groups=16, scaling_factor=1.0, sample_size=(28, 56),
    ),
    # For tests: 8x8 grey images to 4x4x4 latents (f = 2), every kind of block at the least cost.
    "tiny": AutoencoderKLConfig(
        in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, scaling_factor=1.0, sample_size=8,
    ),
}
AutoencoderKLConfig.PRESETS = PRESETS


class DiagonalGaussian:
    """The encoder's posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` (Rombach et al. 2022,
    appendix G; Kingma and Welling 2014), from ``parameters`` ``[B, 2C, h, w]`` (mean first).

    ``logvar`` is clamped to [-30, 20] as in the LDM code and diffusers. ``kl`` and ``nll`` sum
    over all but the batch dimension and return ``[B]``.
    """

    def __init__(self, parameters: Tensor) -> None:
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps``, ``eps ~ N(0, I)`` drawn from ``generator`` (on its device, as
        diffusers' ``randn_tensor`` does, so a seeded CPU generator gives the same draw anywhere)."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The mean, the most likely latent."""
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per example, ``[B]``: ``0.5 * sum(mean^2 + var - 1 - logvar)``."""
        zero = self.mean.new_zeros(())
        return sum_flat(normal_kl(self.mean, self.logvar, zero, zero))

    def nll(self, z: Tensor) -> Tensor:
        """``-log q(z)`` per example in nats, ``[B]``."""
        return 0.5 * sum_flat(math.log(2 * math.pi) + self.logvar + (z - self.mean).square() / self.var)


class Attention(nn.Module):
    """Single-head self-attention over the ``H * W`` positions with a residual connection, in
    diffusers' ``Attention`` names (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``).
    ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, L, C]
        h = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return x + self.to_out[0](h).transpose(1, 2).reshape(b, c, height, width)


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` as the autoencoder uses it: resnet, attention, resnet."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Block(nn.Module):
    """One level: ``num_layers`` resnets, then ``downsamplers`` (``DownEncoderBlock2D``) or
    ``upsamplers`` (``UpDecoderBlock2D``) or nothing at the last level."""

    def __init__(self, c_in: int, c_out: int, num_layers: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(num_layers)]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: Tensor) -> Tensor:
        for module in (*self.resnets, *getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = module(x)
        return x


class Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` -> posterior parameters ``[B, 2 * latent_channels, H/f, W/f]``
    (before ``quant_conv``)."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv3x3(config.in_channels, widths[0])
        self.down_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], w, config.layers_per_block, groups,
                  "down" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = conv3x3(widths[-1], 2 * config.latent_channels)  # diffusers' double_z

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, self.mid_block(h)))


class Decoder(nn.Module):
    """Latents ``[B, latent_channels, h, w]`` (after ``post_quant_conv``) -> images
    ``[B, out_channels, h*f, w*f]``; ``up_blocks`` run from the lowest resolution up."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = conv3x3(config.latent_channels, widths[0])
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], w, config.layers_per_block + 1, groups,
                  "up" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = conv3x3(widths[-1], config.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))


class AutoencoderKL(SavedModel):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1).

    ``encode(x)`` gives the posterior :class:`DiagonalGaussian` over latents, ``decode(z)`` the
    images; diffusion runs on ``posterior.sample() * config.scaling_factor``. Initialised as
    PyTorch's defaults, as in the LDM code and diffusers.
    """

    CONFIG: ClassVar[type] = AutoencoderKLConfig
    FORMAT: ClassVar[str] = "ddpm-autoencoder-kl"
    WHAT: ClassVar[str] = "autoencoder"
    LAYOUT = AUTOENCODER_KL

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        if not isinstance(config, AutoencoderKLConfig):
            raise TypeError(f"AutoencoderKL takes an AutoencoderKLConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """``q(z | x)`` for images ``x`` ``[B, in_channels, H, W]`` (H, W divisible by ``f``); its
        mean and log-variance are ``[B, latent_channels, H/f, W/f]``."""
        self._check(x, self.config.in_channels, "x", self.config.downsampling_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Images ``[B, out_channels, h*f, w*f]`` for unscaled latents ``z`` ``[B, latent_channels,
        h, w]`` (divide diffusion's latents by ``scaling_factor`` first)."""
        self._check(z, self.config.latent_channels, "z", 1)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """The reconstruction of ``x`` from the posterior's mode (or a sample), and the posterior,
        as the LDM code's ``forward`` returns them for its loss."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    @staticmethod
    def _check(x: Tensor, channels: int, name: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"{name} is {x.shape[2]}x{x.shape[3]}; H and W must be divisible by {factor}")
