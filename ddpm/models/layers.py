"""The layers every network here is built from: normalisation, 3x3 convolutions, resampling, the
sinusoidal timestep embedding, and diffusers' residual block.

The DDPM U-Net (:mod:`ddpm.models.unet`), the autoencoder (:mod:`ddpm.models.autoencoder`) and the
conditional U-Net share these; each network file only decides where the layers go.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32  # GroupNorm groups, as tf.contrib.layers.group_norm in the DDPM code (the default).
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon; also the autoencoder's in diffusers.


def group_norm(channels: int, groups: int = GROUPS, eps: float = NORM_EPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``silu(norm(x))``."""
    # SiLU in place on the normalised copy: one large allocation less per call (~2% of a CPU
    # step), and autograd supports it (GroupNorm's backward keeps its input, not its output).
    return F.silu(norm(x), inplace=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution, padded to keep the size at stride 1 (stride 2: see :class:`Downsample`)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1 if stride == 1 else 0)


def timestep_embedding(t: Tensor, dim: int, dtype: torch.dtype = torch.float32, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> Tensor:
    """Sinusoidal embedding of timesteps, DDPM's ``get_timestep_embedding`` (after Vaswani 2017).

    With ``half = dim // 2`` and ``f_i = exp(-log(10000) * i / (half - freq_shift))``, row ``b`` is
    ``[sin(t_b f_0), ..., sin(t_b f_{half-1}), cos(t_b f_0), ..., cos(t_b f_{half-1})]``,
    zero-padded when ``dim`` is odd. DDPM's is ``freq_shift = 1``; Stable Diffusion's U-Net uses
    ``freq_shift = 0`` with the cosines first (``flip_sin_to_cos``), as diffusers'
    ``get_timestep_embedding`` names them. ``t`` has shape ``[B]`` (integers or floats); the
    result ``[B, dim]``, computed in float32 as DDPM and diffusers do.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=t.device) / (half - freq_shift))
    args = t.to(dtype)[:, None] * freqs[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return F.pad(torch.cat(parts, dim=1), (0, dim % 2))


def per_sample(value: Tensor | int | float, batch: int, device: torch.device, name: str) -> Tensor:
    """``value`` as a ``[batch]`` tensor: a scalar or one-element tensor is repeated."""
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0 or value.shape == (1,):
        return value.reshape(1).expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(value.shape)}")
    return value


def labels_with_null(y: Tensor | int | None, batch: int, device: torch.device, null: int) -> Tensor:
    """Class labels ``[batch]`` (long) for an embedding whose row ``null`` is the null label of
    classifier-free guidance (Ho and Salimans 2022): ``y`` ``[batch]`` or a scalar, with ``-1``
    (any negative label) for "no label"; ``None`` is no label for every sample."""
    if y is None:
        return torch.full((batch,), null, dtype=torch.long, device=device)
    y = per_sample(y, batch, device, "y").long()
    return torch.where(y < 0, torch.full_like(y, null), y)


class Downsample(nn.Module):
    """3x3 convolution, stride 2, with TF 'SAME' padding: one zero row and column, bottom-right.

    diffusers' ``Downsample2D`` with ``padding=0`` (DDPM's U-Net, the autoencoder); with ``padding=1``
    (Stable Diffusion's U-Net, ``downsample_padding=1``) the convolution pads one pixel all round.
    """

    def __init__(self, channels: int, padding: int = 0) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


# Which 3x3 kernel taps land on the same input pixel after nearest upsampling: output row 2i + a
# sees input rows (i - 1, i) with taps (k0, k1 + k2) when a = 0, and rows (i, i + 1) with taps
# (k0 + k1, k2) when a = 1. Indexed [a, input row of the 2x2 window, tap]; the same for columns.
_UPSAMPLE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


#: Input pixels (batch x height x width) from which :class:`Upsample` takes its four 2x2 kernels.
UPSAMPLE_MIN_PIXELS = 2048


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution (DDPM's ``upsample``).

    Computed without the upsampled tensor: each output pixel's 3x3 window covers a 2x2 block of
    input pixels, so the layer is four 2x2 convolutions of the input, one per output-pixel parity,
    with kernels summed from the 3x3 one, interleaved. That is 16 instead of 36 multiply-adds per
    input pixel and channel pair (about 7% of a CIFAR-10 forward pass on CPU). The parameter is
    still the 3x3 kernel, as in diffusers' ``Upsample2D``. Building the four kernels costs about
    16 c^2 per call whatever the input, so below :data:`UPSAMPLE_MIN_PIXELS` pixels in the batch it
    upsamples and convolves instead: at SD's 1,280 channels and batch 1-4 the kernels cost more than
    they save (the layer's timings: bench/RESULTS.md, the second SD U-Net entry of 2026-12-02).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)
        # A buffer so that it follows the module's device; not saved (no parameter).
        self.register_buffer("taps", torch.tensor(_UPSAMPLE_TAPS), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if b * h * w < UPSAMPLE_MIN_PIXELS:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        weight = self.conv.weight
        taps = self.taps.to(weight.dtype)
        # kernels[a, a', o, i, p, q]: the 2x2 kernel of output parity (a, a') in rows and columns.
        kernels = torch.einsum("apk,oikl,bql->aboipq", taps, weight, taps)
        # Padding 1 and a 2x2 kernel give (h+1)x(w+1) outputs; parity a starts at row a.
        y = F.conv2d(x, kernels.reshape(4 * c, c, 2, 2), self.conv.bias.repeat(4), padding=1)
        y = y.view(b, 2, 2, c, h + 1, w + 1)
        rows = [
            torch.stack([y[:, a, a2, :, a : a + h, a2 : a2 + w] for a2 in (0, 1)], dim=-1)
            for a in (0, 1)
        ]
        return torch.stack(rows, dim=3).view(b, c, 2 * h, 2 * w)  # [b, c, h, a, w, a'].


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D``: GN, SiLU, conv, (+ the time embedding), GN, SiLU, dropout, conv,
    plus the input (through a 1x1 ``conv_shortcut`` when the width changes).

    Without ``temb_dim`` it is the autoencoder's block; with it, the conditional U-Net's, where the
    activated time embedding goes through a per-block linear map (``time_emb_proj``) and is added
    after the first convolution. ``[B, c_in, H, W] -> [B, c_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, groups: int, temb_dim: int | None = None, dropout: float = 0.0,
                 eps: float = NORM_EPS) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups, eps)
        self.conv1 = conv3x3(c_in, c_out)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim else None
        self.norm2 = group_norm(c_out, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb_act: Tensor | None = None) -> Tensor:
        """``x`` and, with a time embedding, ``temb_act = silu(temb)`` ``[B, temb_dim]``."""
        h = self.conv1(norm_silu(self.norm1, x))
        # In place: neither the convolution nor the addition needs this tensor for backward.
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        h += x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h
