"""The DDPM U-Net (Ho, Jain and Abbeel 2020, appendix B; their ``diffusion_tf/models/unet.py``).

A PixelCNN++-style wide-ResNet U-Net: ``len(ch_mult)`` resolution levels, ``num_res_blocks``
residual blocks per level on the way down and ``num_res_blocks + 1`` on the way up (each one eating
a skip connection), single-head self-attention after every block at the resolutions in
``attn_resolutions`` and in the middle (resblock, attention, resblock), GroupNorm(32, eps 1e-6) and
SiLU throughout, and the timestep fed to every residual block through a sinusoidal embedding and a
two-layer MLP.

Parameter names follow the TF code (``down.1.block.0.temb_proj``, ``mid.attn_1``, ``up.0.upsample``,
``norm_out``), ``up.i`` is the up path of level ``i`` as in the TF code, so ``self.up`` is run in
reverse. The one change is that the attention's q, k and v projections are one ``qkv`` matrix: one
matmul instead of three. :data:`ddpm.models.diffusers_io.UNET2D` maps these names onto diffusers'
``UNet2DModel``; the shared layers are in :mod:`ddpm.models.layers`.

Additions from later papers, all off by default: ``learned_sigma`` (Nichol and Dhariwal 2021,
section 3.1: a second output block for the variance interpolation ``v``), class conditioning with a
reserved null label (Ho and Salimans 2022, classifier-free guidance), ``num_heads``, and what a
super-resolution stage of a cascade needs (SR3, Saharia et al. 2021; Imagen, Saharia et al. 2022):
``low_res_channels`` (the low-resolution image, upsampled bilinearly to x_t's size and concatenated
to it as input channels) and ``noise_level_embedding`` (the augmentation level of that image,
embedded like a timestep and added to the time embedding; see :mod:`ddpm.superres`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import UserError, is_int
from ddpm.models.diffusers_io import UNET2D
from ddpm.models.io import ModelConfig, SavedModel
from ddpm.models.layers import (
    GROUPS,
    Downsample,
    Upsample,
    conv3x3,
    group_norm,
    labels_with_null,
    norm_silu,
    per_sample,
    timestep_embedding,
)

#: The timestep a super-resolution model's augmentation level s in [0, 1] is embedded as: s * 1000, so
#: that the levels span the frequencies of a 1000-step process's timesteps (Imagen embeds its
#: continuous augmentation time like the diffusion time). In diffusers' layout the model takes it as
#: ``class_labels`` (``class_embed_type="timestep"``).
NOISE_LEVEL_SCALE = 1000.0


@dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """The shape of a :class:`UNet`; presets are in :mod:`ddpm.models.presets`.

    The defaults are the paper's CIFAR-10 model (Ho et al. 2020, appendix B).

    Attributes:
        image_size: side of the square training images. It fixes which levels get attention
            (level ``i`` works at ``image_size / 2**i``) and must be divisible by
            ``2**(len(ch_mult) - 1)``. The network itself runs on any size the levels divide.
        in_channels: image channels (3 for RGB, 1 for grey).
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels, the time embedding ``4 * ch``.
        ch_mult: width multiplier per level; one level per entry.
        num_res_blocks: residual blocks per level on the way down (``+ 1`` on the way up).
        attn_resolutions: resolutions whose blocks are followed by self-attention.
        dropout: dropout rate inside every residual block (0.1 for CIFAR-10 in the paper).
        learned_sigma: output ``2 * in_channels`` channels: epsilon, then the variance
            interpolation ``v`` of Improved DDPM (Nichol and Dhariwal 2021, eq. 15).
        num_classes: ``C > 0`` adds a class embedding with ``C + 1`` rows; row ``C`` is the null
            label (label ``-1`` or ``y=None``) for classifier-free guidance.
        num_heads: attention heads (DDPM uses one).
        norm_groups: GroupNorm groups (DDPM: 32). Fewer allow narrower CPU-sized models (ch=16).
        low_res_channels: ``c > 0`` makes a super-resolution model: it takes a low-resolution image
            ``low_res`` of ``c`` channels, upsamples it bilinearly to x_t's size and concatenates it
            after x_t's ``in_channels`` (SR3; Imagen). ``in_channels`` stays x_t's.
        noise_level_embedding: the model takes ``noise_level`` in [0, 1], the augmentation level of its
            low-resolution input (Imagen's noise-conditioning augmentation), embedded as the timestep
            ``NOISE_LEVEL_SCALE * level`` by a second sinusoidal embedding and MLP and added to the
            time embedding (diffusers' ``class_embed_type="timestep"``).
    """

    KIND: ClassVar[str] = "U-Net"

    #: The run configuration's name for this kind of network (``model.arch`` in config.json).
    ARCH: ClassVar[str] = "unet"

    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    learned_sigma: bool = False
    num_classes: int = 0
    num_heads: int = 1
    norm_groups: int = GROUPS
    low_res_channels: int = 0
    noise_level_embedding: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that configs compare and hash as values.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        counts = ("image_size", "in_channels", "ch", "num_res_blocks", "num_classes", "num_heads", "norm_groups",
                  "low_res_channels")
        for name in counts:
            value = getattr(self, name)
            if not is_int(value) or value < (0 if name in ("num_classes", "low_res_channels") else 1):
                raise UserError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(is_int(v) and v > 0 for v in value):
                raise UserError(
                    f"UNetConfig.{name} must be a list of positive integers, got {value!r}"
                )
        if not self.ch_mult:
            raise UserError("UNetConfig.ch_mult must have at least one level")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("learned_sigma", "noise_level_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"UNetConfig.{name} must be true or false, got {getattr(self, name)!r}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise UserError(
                f"image_size {self.image_size} is not divisible by "
                f"2**(len(ch_mult)-1)={factor}; use fewer levels or another size"
            )
        for width in (self.ch, *self.level_channels):
            if width % self.norm_groups:
                raise UserError(
                    f"ch*mult={width} is not divisible by the {self.norm_groups} GroupNorm groups "
                    f"(ch={self.ch}, ch_mult={list(self.ch_mult)})"
                )
        resolutions = self.resolutions
        for res in self.attn_resolutions:
            if res not in resolutions:
                raise UserError(
                    f"attn_resolutions has {res}, which is no level's resolution; "
                    f"the levels are {', '.join(map(str, resolutions))}"
                )
        for width in self.attention_channels:
            if width % self.num_heads:
                raise UserError(f"num_heads {self.num_heads} does not divide {width} channels")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the network denoises at its training size."""
        return self.in_channels, self.image_size, self.image_size

    @property
    def out_channels(self) -> int:
        """``in_channels``, doubled by ``learned_sigma``."""
        return self.in_channels * (2 if self.learned_sigma else 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level, ``ch * ch_mult[i]``."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Side of the feature maps at each level for ``image_size`` inputs."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether each level's blocks are followed by self-attention."""
        return tuple(res in self.attn_resolutions for res in self.resolutions)

    @property
    def attention_channels(self) -> tuple[int, ...]:
        """Widths of all attention layers' levels, the middle's included."""
        attended = [c for c, a in zip(self.level_channels, self.attention_levels) if a]
        return (*attended, self.level_channels[-1])




class ResBlock(nn.Module):
    """DDPM's ``resnet_block``: GN, SiLU, conv, + time embedding, GN, SiLU, dropout, conv, + skip.

    The time embedding goes through SiLU and a per-block linear map and is added after the first
    convolution; a 1x1 convolution (``nin_shortcut``) matches widths on the skip path. It is
    :class:`~ddpm.models.layers.ResnetBlock2D` under the TF code's names, which every saved run of
    this U-Net carries (:data:`~ddpm.models.diffusers_io.UNET2D` maps them to diffusers').
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int = GROUPS) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = conv3x3(c_in, c_out)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        """``x`` [B, c_in, H, W] and ``temb_act = silu(temb)`` [B, 4ch] -> [B, c_out, H, W]."""
        h = self.conv1(norm_silu(self.norm1, x))
        # In place: neither the convolution nor the addition needs this tensor for backward.
        h += self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        h += x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h


class AttnBlock(nn.Module):
    """DDPM's ``attn_block``: x + proj_out(softmax(q k^T / sqrt(d)) v) over the H*W positions.

    q, k, v are per-position linear maps of GroupNorm(x) (DDPM's ``nin``, a 1x1 convolution), stored
    as one ``[3C, C]`` matrix. The product runs in
    :func:`torch.nn.functional.scaled_dot_product_attention`, whose default scale is DDPM's
    ``C ** -0.5`` per head.
    """

    def __init__(self, channels: int, num_heads: int = 1, groups: int = GROUPS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, C, H, W] -> [B, C, H, W]."""
        b, c, height, width = x.shape
        # Tokens last-dim-contiguous, [B, L, C]: the layout the linear maps and the attention kernel
        # want, and the one the output projection returns, so only the two ends transpose.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = self.qkv(tokens).view(b, height * width, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj_out(h.transpose(1, 2).reshape(b, height * width, c))
        return x + h.transpose(1, 2).view(b, c, height, width)


#: How the trunk applies an attention layer (an :class:`AttnBlock`, or ``nn.Identity`` where a level
#: has none) to the features: ``attend(layer, h)``. The image U-Net calls the layer; the video U-Net
#: (:mod:`ddpm.models.video_unet`) passes it the frames' temporal attention bias as well.
Attend = Callable[[nn.Module, Tensor], Tensor]


def apply_layer(layer: nn.Module, h: Tensor) -> Tensor:
    """``layer(h)``: the image U-Net's :data:`Attend`."""
    return layer(h)


class Level(nn.Module):
    """One resolution of the down or up path: residual blocks, each followed by ``attn[i]``
    (``attention_type`` or identity), then an optional resampling."""

    def __init__(
        self,
        widths_in: Sequence[int],
        c_out: int,
        temb_dim: int,
        dropout: float,
        attention: bool,
        num_heads: int,
        resample: nn.Module | None,
        groups: int = GROUPS,
        attention_type: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        attention_type = attention_type or AttnBlock
        self.block = nn.ModuleList(ResBlock(c, c_out, temb_dim, dropout, groups) for c in widths_in)
        self.attn = nn.ModuleList(
            attention_type(c_out, num_heads, groups) if attention else nn.Identity() for _ in widths_in
        )
        self.resample = resample


class Middle(nn.Module):
    """DDPM's middle: resblock, attention, resblock at the lowest resolution."""

    def __init__(self, channels: int, temb_dim: int, dropout: float, num_heads: int, groups: int = GROUPS,
                 attention_type: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, channels, temb_dim, dropout, groups)
        self.attn_1 = (attention_type or AttnBlock)(channels, num_heads, groups)
        self.block_2 = ResBlock(channels, channels, temb_dim, dropout, groups)

    def forward(self, x: Tensor, temb_act: Tensor, attend: Attend = apply_layer) -> Tensor:
        return self.block_2(attend(self.attn_1, self.block_1(x, temb_act)), temb_act)


class TimeEmbedding(nn.Module):
    """Timestep -> sinusoidal embedding of width ``ch`` -> Linear, SiLU, Linear to ``4 ch``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.dense0 = nn.Linear(ch, 4 * ch)
        self.dense1 = nn.Linear(4 * ch, 4 * ch)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.ch).to(self.dense0.weight.dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class UNet(SavedModel):
    """The DDPM noise-prediction network ``eps_theta(x_t, t)`` (Ho et al. 2020, appendix B).

    Build it from a :class:`UNetConfig` (``UNet(get_preset("cifar10"))``) and call it as
    ``unet(x_t, t, y=None)``. Initialisation follows the DDPM TF code: Xavier-uniform weights
    (TF's variance scaling, fan_avg, uniform), zero biases, and zero weights for the last
    convolution of every residual block, the attention output projections and the output
    convolution (``init_scale=0.``), so that every residual branch starts as the identity and the
    network starts by predicting 0.
    """

    CONFIG: ClassVar[type] = UNetConfig
    FORMAT: ClassVar[str] = "ddpm-unet"
    WHAT: ClassVar[str] = "U-Net"
    LAYOUT = UNET2D
    #: The attention layer at the attention resolutions and in the middle (the video U-Net's adds
    #: temporal attention to DDPM's).
    ATTENTION: ClassVar[type[nn.Module]] = AttnBlock

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet takes a UNetConfig, got {type(config).__name__}")
        self.config = config
        ch, temb_dim, drop, heads = config.ch, 4 * config.ch, config.dropout, config.num_heads
        groups = config.norm_groups
        widths = config.level_channels
        num_levels = len(widths)

        self.temb = TimeEmbedding(ch)
        # Row num_classes is the null label of classifier-free guidance (Ho and Salimans 2022).
        self.class_emb = (
            nn.Embedding(config.num_classes + 1, temb_dim) if config.num_classes else None
        )
        # A super-resolution model's augmentation level, embedded like t (Imagen); diffusers' class_embedding.
        self.level_emb = TimeEmbedding(ch) if config.noise_level_embedding else None
        self.conv_in = conv3x3(config.in_channels + config.low_res_channels, ch)

        # Widths of the skip connections, in the order the down path produces them.
        skips = [ch]
        self.down = nn.ModuleList()
        c_in = ch
        for i, (c_out, attn) in enumerate(zip(widths, config.attention_levels)):
            last = i == num_levels - 1
            blocks_in = [c_in] + [c_out] * (config.num_res_blocks - 1)
            resample = None if last else Downsample(c_out)
            self.down.append(Level(blocks_in, c_out, temb_dim, drop, attn, heads, resample, groups, self.ATTENTION))
            skips += [c_out] * (config.num_res_blocks + (0 if last else 1))
            c_in = c_out

        self.mid = Middle(c_in, temb_dim, drop, heads, groups, self.ATTENTION)

        up: list[Level] = []
        for i in reversed(range(num_levels)):
            c_out = widths[i]
            blocks_in = []
            for _ in range(config.num_res_blocks + 1):
                blocks_in.append(c_in + skips.pop())
                c_in = c_out
            resample = Upsample(c_out) if i else None
            up.append(Level(blocks_in, c_out, temb_dim, drop, config.attention_levels[i], heads,
                            resample, groups, self.ATTENTION))
        # Indexed by level as in the TF code (up.0 is the full-resolution level).
        self.up = nn.ModuleList(reversed(up))

        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv3x3(c_in, config.out_channels)
        self.reset_parameters()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the network denoises at its training size."""
        return self.config.sample_shape

    @property
    def num_classes(self) -> int:
        """Class labels it takes (0: unconditional)."""
        return self.config.num_classes

    def reset_parameters(self) -> None:
        """DDPM's initialisation (see the class docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.conv_out.weight)
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, AttnBlock):
                nn.init.zeros_(module.proj_out.weight)
                # Per block, so that the fused q, k, v get the fans of three separate maps.
                for weight in module.qkv.weight.chunk(3):
                    nn.init.xavier_uniform_(weight)

    def forward(self, x_t: Tensor, t: Tensor | int | float, y: Tensor | None = None, low_res: Tensor | None = None,
                noise_level: Tensor | float | None = None) -> Tensor:
        """Predict the noise (and, with ``learned_sigma``, ``v``) in ``x_t``.

        Args:
            x_t: noisy images ``[B, in_channels, H, W]``; H and W divisible by
                ``2**(len(ch_mult) - 1)``.
            t: 0-based timesteps ``[B]`` (index i is the paper's t = i + 1), integer or float, or
                one scalar for the whole batch. They enter the sinusoidal embedding as they are.
            y: class labels ``[B]`` in ``[0, num_classes)``, ``-1`` for "no label"; ``None`` means
                no label for every sample. Only for class-conditional models.
            low_res: a super-resolution model's low-resolution images ``[B, low_res_channels, h, w]``
                (any h, w), upsampled bilinearly to x_t's size; required when ``low_res_channels``.
            noise_level: the augmentation level in [0, 1] of ``low_res`` ``[B]`` or a scalar; required
                when ``noise_level_embedding``.

        Returns:
            ``[B, out_channels, H, W]``: epsilon, followed by ``v`` when ``learned_sigma``.
        """
        batch = self._check_input(x_t)
        return self.trunk(self._with_low_res(x_t, low_res), self.embed_time(t, y, batch, x_t.device, noise_level))

    def embed_time(self, t: Tensor | int | float, y: Tensor | None, batch: int, device: torch.device,
                   noise_level: Tensor | float | None = None) -> Tensor:
        """``silu(temb)`` [batch, 4ch]: the timestep embedding plus, for a class-conditional model, the
        label's and, for a super-resolution one, its augmentation level's (embedded as the timestep
        ``NOISE_LEVEL_SCALE * noise_level``), activated as every residual block takes it (DDPM's
        ``nonlinearity(temb)``)."""
        temb = self.temb(per_sample(t, batch, device, "t"))
        if self.class_emb is not None:
            temb = temb + self.class_emb(labels_with_null(y, batch, device, self.config.num_classes))
        elif y is not None:
            raise ValueError("y given to a U-Net without class conditioning (num_classes=0)")
        if self.level_emb is not None:
            if noise_level is None:
                raise ValueError("this U-Net is conditioned on the augmentation level: give noise_level")
            temb = temb + self.level_emb(per_sample(noise_level, batch, device, "noise_level") * NOISE_LEVEL_SCALE)
        elif noise_level is not None:
            raise ValueError("noise_level given to a U-Net without noise_level_embedding")
        return F.silu(temb)

    def trunk(self, x: Tensor, temb_act: Tensor, attend: Attend = apply_layer) -> Tensor:
        """The network from ``conv_in`` to ``conv_out`` on ``x`` [N, in_channels (+ low_res_channels), H, W]
        with the activated time embedding [N, 4ch]; ``attend(layer, h)`` applies each attention layer
        (:data:`Attend`)."""
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attend(attn, block(h, temb_act))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid(h, temb_act, attend)
        for level in reversed(self.up):
            for block, attn in zip(level.block, level.attn):
                h = attend(attn, block(torch.cat([h, skips.pop()], dim=1), temb_act))
            if level.resample is not None:
                h = level.resample(h)
        assert not skips and h.shape[1] == self.config.level_channels[0]
        return self.conv_out(norm_silu(self.norm_out, h))

    def _check_input(self, x_t: Tensor) -> int:
        config = self.config
        factor = 2 ** (len(config.ch_mult) - 1)
        if x_t.ndim != 4 or x_t.shape[1] != config.in_channels:
            raise ValueError(
                f"x_t must be [B, {config.in_channels}, H, W], got {tuple(x_t.shape)}"
            )
        if x_t.shape[2] % factor or x_t.shape[3] % factor:
            raise ValueError(
                f"x_t is {x_t.shape[2]}x{x_t.shape[3]}; H and W must be divisible by {factor}"
            )
        return x_t.shape[0]

    def _with_low_res(self, x_t: Tensor, low_res: Tensor | None) -> Tensor:
        """``x_t`` with a super-resolution model's low-resolution input, upsampled bilinearly, as extra channels."""
        c = self.config.low_res_channels
        if not c:
            if low_res is not None:
                raise ValueError("low_res given to a U-Net without low_res_channels")
            return x_t
        if low_res is None or low_res.ndim != 4 or low_res.shape[:2] != (x_t.shape[0], c):
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(f"this super-resolution U-Net needs low_res [{x_t.shape[0]}, {c}, h, w], got {got}")
        if low_res.shape[2:] != x_t.shape[2:]:
            low_res = F.interpolate(low_res.to(x_t.dtype), size=x_t.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([x_t, low_res.to(x_t.dtype)], dim=1)
