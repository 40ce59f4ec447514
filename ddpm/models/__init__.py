"""Denoising networks: the DDPM U-Net, its presets, and diffusers interop."""

from ddpm.models.presets import PRESETS, get_preset
from ddpm.models.unet import UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "UNet", "UNetConfig", "get_preset", "timestep_embedding"]
