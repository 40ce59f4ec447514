"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022, section 3.3, eq. 3),
in the layout and parameter names of diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x).

The DDPM U-Net's levels of residual blocks (diffusers' ``ResnetBlock2D``), where every residual
block of a cross-attention level is followed by a spatial transformer (the LDM code's
``SpatialTransformer``, diffusers' ``Transformer2DModel``): GroupNorm, a per-position projection
in (``proj_in``), ``transformer_layers_per_block`` transformer blocks, a projection out
(``proj_out``) and the input added back. Each transformer block (``BasicTransformerBlock``) is
LayerNorm and self-attention (``attn1``), LayerNorm and cross-attention (``attn2``: queries from the
image tokens, keys and values from the conditioning tokens ``encoder_hidden_states``, the
``tau_theta(y)`` of the paper's eq. 3), LayerNorm and a GEGLU feed-forward (``ff``; Shazeer 2020),
each with its residual. The middle is resnet, transformer, resnet (``UNetMidBlock2DCrossAttn``).

The timestep enters as in DDPM: a sinusoidal embedding of width ``block_out_channels[0]``
(``time_proj``; Stable Diffusion's puts the cosines first and uses ``freq_shift = 0``), then
Linear, SiLU, Linear to four times that width (``time_embedding``), added inside every residual
block. Optionally a second vector is added to it (``class_embedding``): a learned row per class
label (``num_class_embeds``), or an MLP of a given vector (``class_embed_type="projection"``), as
GLIDE (Nichol et al. 2022, section 4) uses the text transformer's final token embedding "in place of a
class embedding".

The state dict has diffusers' names exactly (:data:`ddpm.models.diffusers_io.UNET2D_CONDITION`
copies it unchanged both ways). What diffusers calls ``attention_head_dim`` in this class is the
number of heads of each level (a naming slip it keeps for its configs' sake), the heads' width being
the level's width divided by it; ``num_attention_heads``, when given, takes its place. Everything
Stable Diffusion 1.x/2.x does not use (SDXL's added embeddings, ControlNet residuals, attention
processors, LoRA, FreeU, gradient checkpointing) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import UserError, is_int
from ddpm.models.diffusers_io import UNET2D_CONDITION
from ddpm.models.io import ModelConfig, SavedModel
from ddpm.models.layers import (
    NORM_EPS,
    Downsample,
    ResnetBlock2D,
    Upsample,
    conv3x3,
    group_norm,
    labels_with_null,
    norm_silu,
    per_sample,
    timestep_embedding,
)

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
# diffusers turns the key mask into this additive bias, not -inf: a query whose keys are all masked
# then averages them instead of giving NaN. exp(-10000) is 0 in float32, so a masked key has no
# weight at all.
MASK_BIAS = -10000.0
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, the transformer blocks' in the LDM code and diffusers


@dataclass(frozen=True)
class ConditionalUNetConfig(ModelConfig):
    """The shape of a :class:`ConditionalUNet`, with the field names of diffusers'
    ``UNet2DConditionModel``. The defaults are Stable Diffusion 1.5's; :data:`PRESETS` names others.

    Attributes:
        sample_size: side of the training inputs, or ``(height, width)`` (informational, as in
            diffusers; sides must be divisible by ``2**(len(block_out_channels) - 1)``).
        in_channels, out_channels: channels of the input and of the prediction.
        down_block_types: per level, ``"CrossAttnDownBlock2D"`` (residual blocks with transformers)
            or ``"DownBlock2D"`` (residual blocks only); every level but the last ends with a
            stride-2 convolution.
        up_block_types: the same for the up path, lowest resolution first
            (``"CrossAttnUpBlock2D"`` or ``"UpBlock2D"``), each ending with nearest x2 and a
            convolution but the last.
        block_out_channels: width of each level.
        layers_per_block: residual blocks per down level (``+ 1`` per up level).
        downsample_padding: 1 pads the stride-2 convolution one pixel all round (Stable
            Diffusion); 0 pads one row and column at the bottom-right (DDPM's TF 'SAME').
        dropout: dropout in every residual block (not in the transformers, as in diffusers).
        norm_num_groups: GroupNorm groups; must divide every width.
        norm_eps: the residual blocks' and the output's GroupNorm epsilon (the transformers' is 1e-6).
        cross_attention_dim: width of the conditioning tokens (768 for CLIP ViT-L/14, SD 1.x;
            1024 for OpenCLIP ViT-H/14, SD 2.x).
        transformer_layers_per_block: transformer blocks in each spatial transformer.
        attention_head_dim: diffusers' name for the number of attention heads of each level (one
            number for all, or one per level; the middle takes the last level's).
        num_attention_heads: the number of heads under its own name; when given, it replaces
            ``attention_head_dim``.
        use_linear_projection: ``proj_in`` / ``proj_out`` as linear maps of the tokens (SD 2.x)
            instead of 1x1 convolutions (SD 1.x); the same function, differently stored weights.
        upcast_attention: compute the attention in float32 whatever the model's dtype (SD 2.1,
            whose attention overflows float16).
        flip_sin_to_cos, freq_shift: the sinusoidal timestep embedding's layout (cosines first, and
            ``f_i = exp(-log(10000) i / (half - freq_shift))``; see
            :func:`~ddpm.models.layers.timestep_embedding`).
        class_embed_type: ``None``, or ``"projection"``: ``class_labels`` is a vector of
            ``projection_class_embeddings_input_dim`` (a pooled text embedding, say), mapped by
            Linear, SiLU, Linear and added to the time embedding.
        projection_class_embeddings_input_dim: that vector's width (only with ``"projection"``).
        num_class_embeds: ``N`` adds a learned embedding of integer class labels with ``N`` rows;
            row ``N - 1`` is the null label (label ``-1`` or ``class_labels=None``) for
            classifier-free guidance, as :class:`ddpm.models.unet.UNet` reserves it.
    """

    KIND: ClassVar[str] = "conditional U-Net"

    #: The run configuration's name for this kind of network (``model.arch`` in config.json).
    ARCH: ClassVar[str] = "unet2d_condition"

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None
    num_class_embeds: int | None = None

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that configs compare and hash as values.
        for name in ("sample_size", "down_block_types", "up_block_types", "block_out_channels",
                     "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_counts()
        self._check_blocks()
        self._check_heads()
        self._check_class_embedding()
        self._check_sample_size()

    def _fail(self, name: str, must: str) -> UserError:
        return UserError(f"ConditionalUNetConfig.{name} must be {must}, got {getattr(self, name)!r}")

    def _check_counts(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim",
                     "transformer_layers_per_block"):
            if not _positive(getattr(self, name)):
                raise self._fail(name, "a positive integer")
        widths = self.block_out_channels
        if not isinstance(widths, tuple) or not widths or not all(_positive(w) for w in widths):
            raise self._fail("block_out_channels", "a non-empty list of positive integers")
        if any(w % self.norm_num_groups for w in widths):
            raise UserError(f"block_out_channels {list(widths)} are not all divisible by the "
                            f"{self.norm_num_groups} GroupNorm groups (norm_num_groups)")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise self._fail("downsample_padding", "0 or 1")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise self._fail("dropout", "in [0, 1)")
        if not _number(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise self._fail("norm_eps", "a number in (0, 1)")
        if not _number(self.freq_shift) or not math.isfinite(self.freq_shift):
            raise self._fail("freq_shift", "a number")
        for name in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                raise self._fail(name, "true or false")

    def _check_blocks(self) -> None:
        for name, allowed in (("down_block_types", (CROSS_ATTN_DOWN, DOWN)), ("up_block_types", (CROSS_ATTN_UP, UP))):
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != self.levels or not set(types) <= set(allowed):
                raise self._fail(name, f"a list of {self.levels} (one per block_out_channels) of "
                                       f"{' or '.join(allowed)}")

    def _check_heads(self) -> None:
        for name in ("attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if value is None and name == "num_attention_heads":
                continue
            if not (_positive(value) or isinstance(value, tuple) and len(value) == self.levels
                    and all(_positive(v) for v in value)):
                raise self._fail(name, f"a positive integer or a list of {self.levels}, one per level")
        # diffusers' head width is width // heads: at least one channel, at every level with
        # transformers on either path and in the middle (which takes the last level's heads).
        up = tuple(reversed([t == CROSS_ATTN_UP for t in self.up_block_types]))
        attended = [a or u or i == self.levels - 1 for i, (a, u) in enumerate(zip(self.attention_levels, up))]
        narrow = [(w, h) for w, h, a in zip(self.block_out_channels, self.heads, attended) if a and h > w]
        if narrow:
            raise UserError(f"attention heads exceed the width of their level (width, heads): {narrow}; "
                            "attention_head_dim (or num_attention_heads) is the number of heads")

    def _check_class_embedding(self) -> None:
        if self.class_embed_type not in (None, "projection"):
            raise self._fail("class_embed_type", "null or 'projection'")
        projection = self.projection_class_embeddings_input_dim
        if self.class_embed_type == "projection" and not _positive(projection):
            raise self._fail("projection_class_embeddings_input_dim", "a positive integer with class_embed_type "
                                                                        "'projection'")
        if self.class_embed_type is None and projection is not None:
            raise self._fail("projection_class_embeddings_input_dim", "null without class_embed_type 'projection'")
        classes = self.num_class_embeds
        if classes is not None and (not _positive(classes) or classes < 2 or self.class_embed_type is not None):
            raise self._fail("num_class_embeds", "null or an integer >= 2 (the last row is the null label), and "
                                                 "null with class_embed_type 'projection'")

    def _check_sample_size(self) -> None:
        size = self.sample_size
        if size is None:
            return
        sides = (size,) if _positive(size) else size if isinstance(size, tuple) and len(size) == 2 else None
        if sides is None or not all(_positive(s) for s in sides):
            raise self._fail("sample_size", "null, a positive integer or [height, width]")
        factor = self.downsampling_factor
        if any(s % factor for s in sides):
            raise UserError(f"sample_size {size!r} is not divisible by 2**(levels - 1) = {factor}; "
                            "use fewer levels or another size")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the network denoises at its training size (``sample_size``)."""
        size = self.sample_size
        if size is None:
            raise UserError("this conditional U-Net's config has no sample_size; set --model.sample_size H,W")
        h, w = (size, size) if isinstance(size, int) else size
        return self.in_channels, h, w

    @property
    def downsampling_factor(self) -> int:
        """``2**(levels - 1)``: what input sides must be divisible by."""
        return 2 ** (self.levels - 1)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each level, as diffusers reads them: ``num_attention_heads or
        attention_head_dim``, one number repeated for every level."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return heads if isinstance(heads, tuple) else (heads,) * self.levels

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether each down level's blocks are followed by transformers."""
        return tuple(t == CROSS_ATTN_DOWN for t in self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding, ``4 * block_out_channels[0]``."""
        return 4 * self.block_out_channels[0]





def _positive(value: object) -> bool:
    return is_int(value) and value > 0  # type: ignore[operator]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PRESETS: dict[str, ConditionalUNetConfig] = {
    # Stable Diffusion 1.x (CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5): 859,520,964
    # parameters, the count of diffusers' UNet2DConditionModel with this config (tests).
    "sd15": ConditionalUNetConfig(),
    # Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1, 768x768, v-prediction): heads of 64
    # channels everywhere (5, 10, 20, 20 of them), OpenCLIP's 1024-wide tokens, linear projections,
    # attention in float32. 865,910,724 parameters. stable-diffusion-2-base is the same network with
    # sample_size 64 and upcast_attention false.
    "sd2": ConditionalUNetConfig(
        sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True, upcast_attention=True,
    ),
    # Two-digit MNIST captions in pixel space: 28x56 grey images, levels 28x56 -> 14x28 -> 7x14 (28
    # allows two halvings), the pixel `mnist` U-Net preset's widths 16, 32, 32 and one block per
    # level. Transformers only at 7x14 (98 tokens, where a token still sees half a digit) and in the
    # middle: the 3x3 convolutions at full resolution already take most of a step, and
    # self-attention over 14x28's 392 tokens would cost more than the rest. cross_attention_dim is
    # the text encoder's width. Step times: bench/RESULTS.md.
    "mnist-pairs": ConditionalUNetConfig(
        sample_size=(28, 56), in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
        down_block_types=(DOWN, DOWN, CROSS_ATTN_DOWN), up_block_types=(CROSS_ATTN_UP, UP, UP),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=2,
    ),
    # The same captions on the 7x14x4 latents of an f=4 autoencoder (ddpm.models.autoencoder's
    # mnist-f4): one level at width 32, no resampling, as the `mnist-latent` U-Net preset. 7 is odd,
    # so a second level would need a padded 7 -> 4 halving and an upsampling cropped back to 7,
    # which this network does not do; at 98 tokens every block affords a transformer instead, which
    # shows every position the whole image and the caption.
    "mnist-pairs-latent": ConditionalUNetConfig(
        sample_size=(7, 14), in_channels=4, out_channels=4, block_out_channels=(32,),
        down_block_types=(CROSS_ATTN_DOWN,), up_block_types=(CROSS_ATTN_UP,),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=2,
    ),
    # For tests: both kinds of level, resamplers, transformers and the middle at the least cost.
    "tiny": ConditionalUNetConfig(
        sample_size=8, block_out_channels=(32, 64), down_block_types=(CROSS_ATTN_DOWN, DOWN),
        up_block_types=(UP, CROSS_ATTN_UP), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=2,
    ),
}
ConditionalUNetConfig.PRESETS = PRESETS


# ---------------------------------------------------------------------------- embeddings


class Timesteps(nn.Module):
    """diffusers' ``time_proj``: the sinusoidal embedding of timesteps ``[B]`` -> ``[B, dim]``, float32."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding``: Linear (``linear_1``), SiLU, Linear (``linear_2``)."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------- the transformer


class Attention(nn.Module):
    """Multi-head attention ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017; Rombach et al.
    2022, eq. 3) from the query tokens ``x`` to ``context`` (``x`` itself when None), in diffusers'
    ``Attention`` names: ``to_q``, ``to_k``, ``to_v`` without bias, ``to_out.0`` with one.

    Runs in :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU), whose
    default scale is ``d ** -0.5`` per head. ``bias`` is added to the scores (the key mask, from
    :func:`mask_bias`); ``upcast`` computes the attention in float32 at least. ``[B, L, dim] -> [B, L, dim]``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a dropout of 0

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, L, d]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast:  # at least float32 (float64 stays float64)
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](h.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim).to(x.dtype))


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive score bias ``[B, 1, 1, L]`` of a key mask ``[B, L]`` (1 keep, 0 discard), as
    diffusers makes it: 0 for a kept key, -10000 for a discarded one."""
    return ((1 - mask.to(dtype)) * MASK_BIAS)[:, None, None, :]


class GEGLU(nn.Module):
    """``a * gelu(b)`` for ``[a, b] = proj(x)`` (Shazeer 2020), diffusers' ``GEGLU`` (``proj``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c_in, 2 * c_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net.0`` (GEGLU to ``4 dim``), ``net.2`` (Linear back)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # net.1 is diffusers' dropout, 0 in the U-Net; Identity keeps the indices of the names.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward, each after a LayerNorm and with its residual
    (the LDM code's and diffusers' ``BasicTransformerBlock``). ``[B, L, dim] -> [B, L, dim]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The LDM code's ``SpatialTransformer`` (diffusers' ``Transformer2DModel``): GroupNorm (eps
    1e-6), ``proj_in`` to ``heads * (channels // heads)`` features per position, the
    ``transformer_blocks`` over the ``H * W`` tokens, ``proj_out``, plus the input.

    ``proj_in`` / ``proj_out`` are 1x1 convolutions, or with ``linear`` the same maps as
    ``nn.Linear`` (Stable Diffusion 2's weights). ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, heads: int, config: ConditionalUNetConfig) -> None:
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear = config.use_linear_projection
        self.norm = group_norm(channels, config.norm_num_groups, NORM_EPS)
        self.proj_in = nn.Linear(channels, inner) if self.linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, config.cross_attention_dim, config.upcast_attention)
            for _ in range(config.transformer_layers_per_block)
        )
        self.proj_out = nn.Linear(inner, channels) if self.linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        if self.linear:
            tokens = self.proj_in(h.flatten(2).transpose(1, 2))  # [B, L, inner]
        else:
            tokens = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, bias)
        if self.linear:
            h = self.proj_out(tokens).transpose(1, 2).reshape(b, c, height, width)
        else:
            h = self.proj_out(tokens.transpose(1, 2).reshape(b, -1, height, width))
        return h + x


# ---------------------------------------------------------------------------- the U-Net's blocks


class Level(nn.Module):
    """One level of the down or up path: ``resnets``, each followed by a transformer of
    ``attentions`` (the ``CrossAttn...`` blocks) or not, then ``downsamplers`` / ``upsamplers``
    when the level has them. ``widths_in`` are the residual blocks' input widths."""

    def __init__(self, widths_in: list[int], c_out: int, heads: int | None, resample: str | None,
                 config: ConditionalUNetConfig) -> None:
        super().__init__()
        temb_dim, groups = config.time_embed_dim, config.norm_num_groups
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c_out, groups, temb_dim, config.dropout, config.norm_eps) for c in widths_in
        )
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2DModel(c_out, heads, config) for _ in widths_in
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out, config.downsample_padding)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, h: Tensor, temb_act: Tensor, context: Tensor, bias: Tensor | None, skips: list[Tensor],
                up: bool) -> Tensor:
        """On the way down each block's output is pushed onto ``skips``; on the way up each block
        first takes the last one off, concatenated to its input."""
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1) if up else h, temb_act)
            if self.attentions is not None:
                h = self.attentions[j](h, context, bias)
            if not up:
                skips.append(h)
        for resample in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            h = resample(h)
            if not up:
                skips.append(h)
        return h


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, channels: int, heads: int, config: ConditionalUNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, config.norm_num_groups, config.time_embed_dim, config.dropout,
                          config.norm_eps) for _ in range(2)
        )
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, config)])

    def forward(self, h: Tensor, temb_act: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        h = self.attentions[0](self.resnets[0](h, temb_act), context, bias)
        return self.resnets[1](h, temb_act)


def _class_embedding(config: ConditionalUNetConfig) -> nn.Module | None:
    if config.class_embed_type == "projection":
        return TimestepEmbedding(config.projection_class_embeddings_input_dim, config.time_embed_dim)
    if config.num_class_embeds is not None:
        return nn.Embedding(config.num_class_embeds, config.time_embed_dim)
    return None


# ---------------------------------------------------------------------------- the U-Net


class ConditionalUNet(SavedModel):
    """The conditional noise-prediction network ``eps_theta(z_t, t, tau_theta(y))`` of latent
    diffusion (Rombach et al. 2022, eq. 3; Stable Diffusion's U-Net), diffusers'
    ``UNet2DConditionModel``.

    Build it from a :class:`ConditionalUNetConfig` (``ConditionalUNet(ConditionalUNetConfig.preset
    ("sd15"))``) and call it as ``unet(x, t, encoder_hidden_states)``. Initialised as PyTorch's
    defaults, as diffusers does.
    """

    CONFIG: ClassVar[type] = ConditionalUNetConfig
    FORMAT: ClassVar[str] = "ddpm-conditional-unet"
    WHAT: ClassVar[str] = "conditional U-Net"
    LAYOUT = UNET2D_CONDITION

    def __init__(self, config: ConditionalUNetConfig) -> None:
        super().__init__()
        if not isinstance(config, ConditionalUNetConfig):
            raise TypeError(f"ConditionalUNet takes a ConditionalUNetConfig, got {type(config).__name__}")
        self.config = config
        widths, heads, layers = config.block_out_channels, config.heads, config.layers_per_block
        self.conv_in = conv3x3(config.in_channels, widths[0])
        self.time_proj = Timesteps(widths[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], config.time_embed_dim)
        self.class_embedding = _class_embedding(config)

        skips, c_in = [widths[0]], widths[0]  # widths of the skip connections, as the down path pushes them
        self.down_blocks = nn.ModuleList()
        for i, (c_out, attended) in enumerate(zip(widths, config.attention_levels)):
            last = i == config.levels - 1
            self.down_blocks.append(Level([c_in] + [c_out] * (layers - 1), c_out, heads[i] if attended else None,
                                          None if last else "down", config))
            skips += [c_out] * (layers + (0 if last else 1))
            c_in = c_out
        self.mid_block = MidBlock(widths[-1], heads[-1], config)
        # Numbered in execution order, lowest resolution first, as diffusers does.
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            level = config.levels - 1 - i
            c_out, widths_in = widths[level], []
            for _ in range(layers + 1):
                widths_in.append(c_in + skips.pop())
                c_in = c_out
            self.up_blocks.append(Level(widths_in, c_out, heads[level] if block_type == CROSS_ATTN_UP else None,
                                        "up" if level else None, config))
        self.conv_norm_out = group_norm(widths[0], config.norm_num_groups, config.norm_eps)
        self.conv_out = conv3x3(widths[0], config.out_channels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the network denoises at its training size (``sample_size``)."""
        return self.config.sample_shape

    @property
    def num_classes(self) -> int:
        """Class labels it takes besides the text (0: none; the null row is not counted)."""
        return (self.config.num_class_embeds or 1) - 1

    def forward(self, x: Tensor, t: Tensor | int | float, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        """The network's prediction for ``x`` at ``t`` (epsilon, or v for Stable Diffusion 2.1).

        Args:
            x: noisy inputs ``[B, in_channels, H, W]``, H and W divisible by ``2**(levels - 1)``
                (diffusers' ``sample``).
            t: timesteps ``[B]`` or one scalar for the batch, integer or float (``timestep``).
            encoder_hidden_states: the conditioning tokens ``[B, L, cross_attention_dim]``.
            encoder_attention_mask: ``[B, L]``, 1 (or True) for a token to attend to, 0 for one to
                ignore (padding), as diffusers takes it; None attends to all.
            class_labels: with ``class_embed_type="projection"`` the vectors ``[B,
                projection_class_embeddings_input_dim]``; with ``num_class_embeds`` integer labels
                ``[B]`` (or a scalar), -1 or None for the null label; otherwise None.

        Returns:
            ``[B, out_channels, H, W]``.
        """
        batch = self._check_inputs(x, encoder_hidden_states, encoder_attention_mask)
        dtype = self.conv_in.weight.dtype
        temb = self.time_embedding(self.time_proj(per_sample(t, batch, x.device, "t")).to(dtype))
        class_emb = self._class_emb(class_labels, batch, x.device, dtype)
        if class_emb is not None:
            temb = temb + class_emb
        temb_act = F.silu(temb)  # every residual block starts with it (diffusers' nonlinearity(temb))
        bias = None if encoder_attention_mask is None else mask_bias(encoder_attention_mask, dtype)
        context = encoder_hidden_states

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb_act, context, bias, skips, up=False)
        h = self.mid_block(h, temb_act, context, bias)
        for block in self.up_blocks:
            h = block(h, temb_act, context, bias, skips, up=True)
        assert not skips
        return self.conv_out(norm_silu(self.conv_norm_out, h))

    def _class_emb(self, class_labels: Tensor | None, batch: int, device: torch.device,
                   dtype: torch.dtype) -> Tensor | None:
        config = self.config
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a ConditionalUNet without a class embedding "
                                 "(class_embed_type and num_class_embeds are null)")
            return None
        if config.class_embed_type == "projection":
            shape = (batch, config.projection_class_embeddings_input_dim)
            if class_labels is None or tuple(class_labels.shape) != shape:
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(f"class_labels must be {list(shape)} vectors (class_embed_type 'projection'), "
                                 f"got {got}")
            return self.class_embedding(class_labels.to(device, dtype))
        return self.class_embedding(labels_with_null(class_labels, batch, device, config.num_class_embeds - 1))

    def _check_inputs(self, x: Tensor, context: Tensor, mask: Tensor | None) -> int:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"x must be [B, {config.in_channels}, H, W], got {tuple(x.shape)}")
        factor = config.downsampling_factor
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x is {x.shape[2]}x{x.shape[3]}; H and W must be divisible by {factor}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [{batch}, L, {config.cross_attention_dim}], "
                             f"got {tuple(context.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"encoder_attention_mask must be {list(context.shape[:2])}, got {tuple(mask.shape)}")
        return batch
