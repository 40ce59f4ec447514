"""The space-time U-Net of Video Diffusion Models (Ho, Salimans, Gritsenko, Chan, Norouzi and Fleet 2022,
section 3 and figure 1): the DDPM U-Net of :mod:`ddpm.models.unet` made space-time by factorisation.

* Every 3x3 convolution is applied to each frame on its own (a 1x3x3 space-only convolution), and so
  are the GroupNorms, the resamplings and the time embedding: the frames are folded into the batch,
  ``[B, C, T, H, W] -> [B*T, C, H, W]``, and the image U-Net's layers run on them unchanged.
* Each spatial attention layer (the attention resolutions and the middle) attends over the H*W
  positions of one frame (frames as batch), and is followed by a temporal attention layer that
  attends over the T frames at each position (positions as batch), with a relative position bias
  over frame distances (T5's bucketed bias, as in lucidrains' video-diffusion-pytorch and
  imagen-pytorch): no absolute frame index, so a trained network takes any number of frames.
* Joint training on videos and images (the paper's section 3 ablation): frames marked as
  independent images (``images_mask``) attend only to themselves in the temporal attention, and no
  other frame attends to them; since nothing else mixes frames, each such frame is denoised as an
  image by the same weights.

The layout is ``[B, C, T, H, W]``, VDM's (and PyTorch's ``Conv3d``'s): channels stay at dim 1, so
everything in :mod:`ddpm.diffusion` that splits or guides the channels (a learned variance's second
half, classifier-free guidance) works on videos unchanged, and a clip's frames are one tensor axis.

Parameter names are the image U-Net's, plus ``...attn.N.temporal.*`` for each temporal attention and
``frame_bias.*`` for the shared relative position bias, so :meth:`VideoUNet.from_image_unet` starts a
video model from an image model's weights with its temporal layers as the identity. There is no
diffusers layout for this network (diffusers has no VDM U-Net); it is saved in our format only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import UserError, is_int
from ddpm.models.layers import GROUPS
from ddpm.models.unet import AttnBlock, UNet, UNetConfig


@dataclass(frozen=True)
class VideoUNetConfig(UNetConfig):
    """The shape of a :class:`VideoUNet`: a :class:`~ddpm.models.unet.UNetConfig` (the spatial network,
    per frame) plus the clip length it is trained on and the relative position bias's buckets.

    Attributes:
        frames: T, frames per clip in training; the network itself takes any T >= 1, and sampling
            longer clips goes through autoregressive extension (:mod:`ddpm.video_sampling`).
        num_buckets: relative position buckets of the temporal bias (T5: half per direction; distances
            below a quarter of them are exact, larger ones share log-spaced buckets).
        max_distance: the frame distance from which all distances share the last bucket.
    """

    ARCH: ClassVar[str] = "video_unet"
    KIND: ClassVar[str] = "video U-Net"

    frames: int = 8
    num_buckets: int = 32
    max_distance: int = 32

    def _validate(self) -> None:
        super()._validate()
        if self.low_res_channels or self.noise_level_embedding:
            raise UserError("a video U-Net takes no super-resolution inputs (low_res_channels, noise_level_embedding)")
        for name in ("frames", "num_buckets", "max_distance"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UserError(f"VideoUNetConfig.{name} must be a positive integer, got {value!r}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise UserError(f"VideoUNetConfig.num_buckets must be an even number >= 4, got {self.num_buckets}")
        if self.max_distance < self.num_buckets // 4:
            raise UserError(f"VideoUNetConfig.max_distance {self.max_distance} is below the exact range "
                            f"(num_buckets / 4 = {self.num_buckets // 4})")

    @classmethod
    def from_image(cls, image: UNetConfig, **video: Any) -> VideoUNetConfig:
        """The video config with ``image``'s spatial network and the ``video`` fields given."""
        return cls(**{**image.to_dict(), **video})


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucket of each relative position ``key − query`` (Raffel et al. 2020).

    Half the buckets are for keys before the query, half for keys after it; within a half,
    distances below ``num_buckets / 4`` get a bucket each, larger ones log-spaced buckets up to
    ``max_distance``, beyond which all share the last.
    """
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    # Clamped below at 1 so the log of the exact range's distances (not used) stays finite.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """The attention bias ``b[h, i, j]`` of head ``h`` from frame ``i`` to frame ``j``: one learned
    scalar per head and :func:`relative_position_bucket` of ``j − i`` (shared by every temporal
    attention layer, as T5 shares one per stack). Zero at initialisation."""

    def __init__(self, heads: int, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        nn.init.zeros_(self.relative_attention_bias.weight)

    def forward(self, frames: int, device: torch.device) -> Tensor:
        """``[heads, frames, frames]``."""
        position = torch.arange(frames, device=device)
        bucket = relative_position_bucket(position[None, :] - position[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)


class TemporalAttention(AttnBlock):
    """Self-attention over the T frames at each position: ``x + proj_out(softmax(q k^T / sqrt(d) + bias) v)``.

    The same layers as the spatial :class:`~ddpm.models.unet.AttnBlock` (GroupNorm, one ``qkv`` map,
    ``proj_out``, zero-initialised so that the layer starts as the identity), with the tokens taken
    along time instead of space. The GroupNorm normalises each frame on its own, so that frames
    marked as images share nothing. Input ``[B*T, C, H, W]`` (frames folded into the batch, frame
    index fastest within a clip) and ``bias`` ``[B, 1, heads, T, T]``: the relative position bias plus
    −inf where a frame may not attend (:meth:`VideoUNet.temporal_bias`).
    """

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        n, c, height, width = x.shape
        b, frames = bias.shape[0], bias.shape[-1]
        positions = height * width
        # [B, H*W, T, C]: per clip and position, a sequence of T tokens.
        tokens = self.norm(x).view(b, frames, c, positions).permute(0, 3, 1, 2)
        qkv = self.qkv(tokens).view(b, positions, frames, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, H*W, heads, T, d]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        h = self.proj_out(h.transpose(2, 3).reshape(b, positions, frames, c))
        return x + h.permute(0, 2, 3, 1).reshape(n, c, height, width)


class SpaceTimeAttention(AttnBlock):
    """VDM's attention block: spatial attention over each frame (this :class:`AttnBlock`'s own layers,
    under the image U-Net's names), then :class:`TemporalAttention` (``temporal``) over the frames."""

    def __init__(self, channels: int, num_heads: int = 1, groups: int = GROUPS) -> None:
        super().__init__(channels, num_heads, groups)
        self.temporal = TemporalAttention(channels, num_heads, groups)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        """``x`` [B*T, C, H, W] and the temporal ``bias`` [B, 1, heads, T, T] -> [B*T, C, H, W]."""
        return self.temporal(super().forward(x), bias)


class VideoUNet(UNet):
    """The VDM space-time noise-prediction network ``eps_theta(z_t, t)`` on clips ``[B, C, T, H, W]``.

    Build it from a :class:`VideoUNetConfig` and call it as ``net(x_t, t, y=None, images_mask=None)``.
    Initialisation is DDPM's (see :class:`~ddpm.models.unet.UNet`); the temporal attention's output
    projections start at zero and the relative position bias at zero, so a fresh network, or one made
    by :meth:`from_image_unet`, treats every frame as an image until training teaches it time.
    """

    CONFIG: ClassVar[type] = VideoUNetConfig
    FORMAT: ClassVar[str] = "ddpm-video-unet"
    WHAT: ClassVar[str] = "video U-Net"
    ATTENTION: ClassVar[type[nn.Module]] = SpaceTimeAttention

    def __init__(self, config: VideoUNetConfig) -> None:
        if not isinstance(config, VideoUNetConfig):
            raise TypeError(f"VideoUNet takes a VideoUNetConfig, got {type(config).__name__}")
        super().__init__(config)
        self.frame_bias = RelativePositionBias(config.num_heads, config.num_buckets, config.max_distance)

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:  # type: ignore[override]
        """``(C, T, H, W)`` of the clips it was trained on."""
        c = self.config
        return c.in_channels, c.frames, c.image_size, c.image_size

    @classmethod
    def from_image_unet(cls, unet: UNet, frames: int = 8, **video: Any) -> VideoUNet:
        """A video U-Net whose spatial layers are ``unet``'s weights and whose temporal attention is the
        identity (zero output projections): on every frame it computes exactly what ``unet`` computes on
        that frame, the starting point for training time into an image model."""
        net = cls(VideoUNetConfig.from_image(unet.config, frames=frames, **video))
        state = net.state_dict()
        missing = [k for k in unet.state_dict() if k not in state]
        assert not missing, missing  # the spatial names are the image U-Net's
        state.update(unet.state_dict())
        net.load_state_dict(state)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, TemporalAttention):
                    module.proj_out.weight.zero_()
                    module.proj_out.bias.zero_()
        return net.to(next(unet.parameters()).device)

    def forward(self, x_t: Tensor, t: Tensor | int | float, y: Tensor | None = None,  # type: ignore[override]
                images_mask: Tensor | None = None) -> Tensor:
        """Predict the noise (and, with ``learned_sigma``, ``v``) in the clips ``x_t``.

        Args:
            x_t: noisy clips ``[B, in_channels, T, H, W]``, any T >= 1; H and W divisible by
                ``2**(len(ch_mult) - 1)``.
            t: 0-based timesteps ``[B]`` (index i is the paper's t = i + 1), one per clip, or a scalar.
            y: class labels ``[B]`` (class-conditional models; ``-1`` or None: no label).
            images_mask: bool ``[B, T]`` (or ``[B]`` for whole clips): True marks a frame that is an
                independent image, not part of its clip's video; its temporal attention sees only itself
                and no other frame sees it (VDM's joint video-image training). None: all video.

        Returns:
            ``[B, out_channels, T, H, W]``.
        """
        b, c, frames, height, width = self._check_video(x_t)
        temb_act = self.embed_time(t, y, b, x_t.device).repeat_interleave(frames, dim=0)
        h = x_t.transpose(1, 2).reshape(b * frames, c, height, width)
        bias = self.temporal_bias(frames, images_mask, b, x_t.device)

        def attend(layer: nn.Module, h: Tensor) -> Tensor:
            return layer(h, bias) if isinstance(layer, SpaceTimeAttention) else layer(h)

        out = self.trunk(h, temb_act, attend)
        return out.view(b, frames, -1, height, width).transpose(1, 2)

    def temporal_bias(self, frames: int, images_mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The temporal attention's additive bias ``[B, 1, heads, T, T]``: the relative position bias,
        and −inf from and to every image frame of ``images_mask`` except on the diagonal."""
        bias = self.frame_bias(frames, device)[None, None].expand(batch, 1, -1, -1, -1)
        if images_mask is None:
            return bias
        video = ~_frames_mask(images_mask, batch, frames, device)  # [B, T]
        allowed = (video[:, :, None] & video[:, None, :]) | torch.eye(frames, dtype=torch.bool, device=device)
        return bias.masked_fill(~allowed[:, None, None], float("-inf"))

    def _check_video(self, x_t: Tensor) -> tuple[int, ...]:
        config = self.config
        factor = 2 ** (len(config.ch_mult) - 1)
        if x_t.ndim != 5 or x_t.shape[1] != config.in_channels:
            raise ValueError(f"x_t must be [B, {config.in_channels}, T, H, W], got {tuple(x_t.shape)}")
        if x_t.shape[3] % factor or x_t.shape[4] % factor:
            raise ValueError(f"x_t frames are {x_t.shape[3]}x{x_t.shape[4]}; H and W must be divisible by {factor}")
        return tuple(x_t.shape)

    def save_diffusers(self, path: Any) -> None:
        raise UserError("a video U-Net has no diffusers layout (diffusers has no Video Diffusion Models U-Net); "
                        "export it in ours with --format ddpm")

    @classmethod
    def from_diffusers(cls, path: Any, device: Any = "cpu") -> VideoUNet:
        raise UserError("a video U-Net has no diffusers layout to load from; load our format with from_pretrained")


def _frames_mask(mask: Tensor, batch: int, frames: int, device: torch.device) -> Tensor:
    """``images_mask`` as bool ``[batch, frames]`` (a ``[batch]`` mask covers whole clips)."""
    mask = torch.as_tensor(mask, device=device).bool()
    if mask.shape == (batch,):
        mask = mask[:, None].expand(batch, frames)
    if mask.shape != (batch, frames):
        raise ValueError(f"images_mask must be [{batch}, {frames}] or [{batch}], got {tuple(mask.shape)}")
    return mask


#: Named sizes. ``moving-mnist``: Moving MNIST with one digit at 32x32 and 8 frames on our 2 CPU cores
#: (the ``mnist`` image preset's widths, three levels 32 -> 16 -> 8, attention and temporal attention at
#: 8x8 and in the middle: the temporal layers add about 10% to the per-frame cost; spatial attention at
#: 16x16 as well would double a step); ``tiny-video``: every kind of block at the least cost, for tests.
VIDEO_PRESETS: dict[str, VideoUNetConfig] = {
    "moving-mnist": VideoUNetConfig(
        image_size=32, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
        dropout=0.0, norm_groups=8, frames=8,
    ),
    "tiny-video": VideoUNetConfig(
        image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
        dropout=0.0, norm_groups=8, frames=4,
    ),
}


VideoUNetConfig.PRESETS = VIDEO_PRESETS


def get_video_preset(name: str) -> VideoUNetConfig:
    """The :class:`VideoUNetConfig` called ``name``; an unknown name raises :class:`UserError`."""
    return VideoUNetConfig.preset(name)
