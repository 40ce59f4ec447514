"""Denoising networks: the DDPM U-Net and its presets; the latent-diffusion autoencoder; the
text-conditional U-Net of latent diffusion (Stable Diffusion's). Shared layers are in
:mod:`ddpm.models.layers`, saving and loading (ours and diffusers' layout) in :mod:`ddpm.models.io`
and :mod:`ddpm.models.diffusers_io`."""

from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.layers import timestep_embedding
from ddpm.models.presets import PRESETS, get_preset
from ddpm.models.unet import UNet, UNetConfig
from ddpm.models.unet_2d_condition import ConditionalUNet, ConditionalUNetConfig

__all__ = ["PRESETS", "AutoencoderKL", "AutoencoderKLConfig", "ConditionalUNet", "ConditionalUNetConfig", "UNet",
           "UNetConfig", "get_preset", "timestep_embedding"]
