"""Denoising networks: the DDPM U-Net, its presets, and diffusers interop; the latent-diffusion
autoencoder."""

from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.presets import PRESETS, get_preset
from ddpm.models.unet import UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "AutoencoderKL", "AutoencoderKLConfig", "UNet", "UNetConfig", "get_preset", "timestep_embedding"]
