"""Named U-Net sizes: the paper's models and small ones for CPUs and tests.

A preset is data, a :class:`~ddpm.models.unet.UNetConfig`; change a field with
``dataclasses.replace(get_preset("mnist"), num_classes=10)``. Parameter counts are checked in
``tests/test_unet.py``; the measurements that chose the small presets, and their speeds, are in
bench/RESULTS.md ("How the CPU presets were chosen", and ``python -m bench.preset_speed``).
"""

from __future__ import annotations

from ddpm.errors import UserError
from ddpm.models.unet import UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, appendix B: 35.7M parameters; exactly 35,746,307, the count of diffusers'
    # UNet2DModel for google/ddpm-cifar10-32.
    "cifar10": UNetConfig(
        image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1,
    ),
    # Appendix B's 256x256 models (114M parameters; 113,673,219 counted): six levels down to 8x8,
    # attention at 16x16, no dropout. google/ddpm-celebahq-256 has this layout.
    "celebahq256": UNetConfig(
        image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.0,
    ),
    # The LSUN church/bedroom/cat models: the same network (113,673,219 parameters).
    "lsun256": UNetConfig(
        image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.0,
    ),
    # MNIST at its native 28x28, sized for a CPU: levels must divide 28, so three of them,
    # 28 -> 14 -> 7, with widths 16, 32, 32 (8 GroupNorm groups) and one block per level;
    # attention at 7x7 (49 positions) and in the middle gives a global view for almost nothing.
    # Chosen by validation ε-MSE after 5 CPU minutes against wider and deeper variants: on a CPU,
    # steps matter more than width.
    "mnist": UNetConfig(
        image_size=28, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8,
    ),
    # scikit-learn's 8x8 digits (1,797 images, 17 grey levels) at native size: two levels, 8 -> 4,
    # widths 16 and 32, attention at 4x4 and in the middle: small enough that `ddpm demo` trains
    # it in a few CPU minutes and samples 100 digits with DDPM's 1000 steps.
    "digits": UNetConfig(
        image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0, norm_groups=8,
    ),
    # Latent diffusion's U-Nets (Rombach et al. 2022) on an autoencoder's 4-channel latents
    # (ddpm.models.autoencoder.PRESETS), sized for 2 CPU cores.
    # MNIST through mnist-f4 (f = 4): 7x7x4 latents, too small to halve (7 is odd), so one level at
    # 7x7 with attention and the middle block. Width 32 rather than 64: about three times the steps
    # per minute for a slightly worse step, and faster sampling.
    "mnist-latent": UNetConfig(
        image_size=7, in_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8,
    ),
    # CIFAR-10 through cifar10-f4: 8x8x4 latents, two levels 8 -> 4 with attention at 4x4. In a
    # fixed CPU budget the 8x8x4 latents (f = 4) see almost four times the images that cifar10-f2's
    # 16x16x4 would, for autoencoders of about the same speed.
    "cifar10-latent": UNetConfig(
        image_size=8, in_channels=4, ch=64, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0, norm_groups=8,
    ),
    # Cascades (ddpm.superres.CASCADES): a base model at half the side and a super-resolution stage (SR3,
    # Imagen) that doubles it. MNIST 14 -> 28: the base is the mnist preset's own 14x14 and 7x7 levels
    # (widths 32, 32, attention at 7x7 and in the middle) without its 28x28 one: about its parameters
    # (284,513 against 280,177) at about 2.6 times its forward speed (a quick timing on the shared 2-core
    # machine, 1,807 against 687 img/s at batch 64; bench.preset_speed has not measured it). The stage is
    # the mnist preset itself with the low-resolution digit as a second input channel and the augmentation
    # level embedded: its job (stroke detail around a digit the low-resolution image already fixes) is
    # easier than drawing a digit, so the network that draws digits well at 28x28 in CPU minutes should be
    # enough, and fewer steps may do (bench.cascade measures both: FD and images/s at 30 CPU minutes).
    "mnist-14": UNetConfig(
        image_size=14, in_channels=1, ch=32, ch_mult=(1, 1), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8,
    ),
    "mnist-sr": UNetConfig(
        image_size=28, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8, low_res_channels=1, noise_level_embedding=True,
    ),
    # CIFAR-10 16 -> 32: the base is the paper's CIFAR-10 network on its three lowest levels (16 -> 8 -> 4,
    # attention at 8x8, where the paper's 32x32 model has it at 16x16, one level down), the stage the
    # paper's 32x32 network at half the width (ch 64: a quarter of its cost), since the low-resolution
    # image already fixes the colours and the layout (Imagen's stages are smaller per pixel than its base).
    # GPU-sized, like the cifar10 preset.
    "cifar10-16": UNetConfig(
        image_size=16, in_channels=3, ch=128, ch_mult=(1, 2, 2), num_res_blocks=2,
        attn_resolutions=(8,), dropout=0.1,
    ),
    "cifar10-sr": UNetConfig(
        image_size=32, in_channels=3, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, low_res_channels=3, noise_level_embedding=True,
    ),
    # For tests: every kind of block (shortcut, down/upsampling, attention, middle) at the least cost;
    # tiny-latent is the same on the tiny autoencoder's 4x4x4 latents.
    "tiny": UNetConfig(
        image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0,
    ),
    "tiny-latent": UNetConfig(
        image_size=4, in_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0,
    ),
}


def get_preset(name: str) -> UNetConfig:
    """The :class:`UNetConfig` called ``name``; an unknown name raises :class:`UserError`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown U-Net preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
