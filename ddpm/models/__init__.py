"""Denoising networks: the DDPM U-Net and its presets; the latent-diffusion autoencoder; the
text-conditional U-Net of latent diffusion (Stable Diffusion's); the space-time U-Net of video
diffusion. Shared layers are in :mod:`ddpm.models.layers`, saving and loading (ours and diffusers'
layout) in :mod:`ddpm.models.io` and :mod:`ddpm.models.diffusers_io`.

A run's ``model`` section is the config of one of the :data:`NETWORKS`, named by its ``ARCH``;
:func:`build_network` makes the network a config describes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ddpm.errors import UserError
from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.layers import timestep_embedding
from ddpm.models.presets import PRESETS, get_preset
from ddpm.models.unet import UNet, UNetConfig
from ddpm.models.unet_2d_condition import ConditionalUNet, ConditionalUNetConfig
from ddpm.models.video_unet import VIDEO_PRESETS, VideoUNet, VideoUNetConfig, get_video_preset

#: The denoising networks a run can train, by their config's ``ARCH``: (config class, network class).
NETWORKS: dict[str, tuple[type, type[nn.Module]]] = {
    UNetConfig.ARCH: (UNetConfig, UNet),
    ConditionalUNetConfig.ARCH: (ConditionalUNetConfig, ConditionalUNet),
    VideoUNetConfig.ARCH: (VideoUNetConfig, VideoUNet),
}


def network_config_type(arch: str) -> type:
    """The config class of the network called ``arch``; :class:`UserError` for an unknown one."""
    if arch not in NETWORKS:
        raise UserError(f"unknown model.arch {arch!r}; this ddpm knows {', '.join(NETWORKS)}")
    return NETWORKS[arch][0]


def build_network(config: Any) -> nn.Module:
    """The network ``config`` (a config of :data:`NETWORKS`) describes, freshly initialised."""
    return NETWORKS[type(config).ARCH][1](config)


__all__ = ["NETWORKS", "PRESETS", "VIDEO_PRESETS", "AutoencoderKL", "AutoencoderKLConfig", "ConditionalUNet",
           "ConditionalUNetConfig", "UNet", "UNetConfig", "VideoUNet", "VideoUNetConfig", "build_network", "get_preset",
           "get_video_preset", "network_config_type", "timestep_embedding"]
