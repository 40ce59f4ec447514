"""Named U-Net sizes: the paper's models and small ones for CPUs and tests.

A preset is data, a :class:`~ddpm.models.unet.UNetConfig`; change a field with
``dataclasses.replace(get_preset("mnist"), num_classes=10)``. Parameter counts are measured (and
checked in ``tests/test_unet.py``).
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
    # 280,177 parameters, ~260 MFLOP per image for a training step. Chosen by measurement: after 5
    # CPU minutes (2 cores) its validation ε-MSE (0.0293, lr 2e-3) beat widths 16-32-64 (0.0337),
    # two blocks per level (0.0326) and width 32 with two blocks (0.0380, the paper's layout
    # shrunk, 1.6M parameters at 21 images/s): on a CPU, steps matter more than width.
    "mnist": UNetConfig(
        image_size=28, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8,
    ),
    # scikit-learn's 8x8 digits (1,797 images, 17 grey levels) at native size: two levels, 8 -> 4,
    # widths 16 and 32, attention at 4x4 and in the middle. 176,849 parameters: small enough that
    # `ddpm demo` trains it in a few CPU minutes and samples 100 digits with DDPM's 1000 steps in
    # about half a minute (a forward pass of 100 images takes 31 ms on 2 cores).
    "digits": UNetConfig(
        image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0, norm_groups=8,
    ),
    # Latent diffusion's U-Nets (Rombach et al. 2022) on an autoencoder's 4-channel latents
    # (ddpm.models.autoencoder.PRESETS), sized for 2 CPU cores. Measured with one thread
    # (--train.threads 1) on the shared, loaded 2-core machine, 300 steps of batch 64.
    # MNIST through mnist-f4 (f = 4): 7x7x4 latents, too small to halve (7 is odd), so one level at
    # 7x7 with attention and the middle block. `ddpm train --preset mnist-latent --data mnist.npz
    # --autoencoder RUN --data.limit 10000`: width 32 trains at 709 img/s, width 64 (697,604
    # parameters) at 228 img/s; after 300 steps their losses were 0.107 and 0.090, so per minute
    # the narrow one takes three times the steps for a slightly worse step. Width 32 because of
    # sampling: DDIM with 50 NFE, batch 128, one thread, decoding included, draws 47 img/s against
    # 7.4 img/s for the pixel `mnist` preset (6.4x). At 20 NFE the decoder weighs more: 3.83x
    # (dpm++2m-sde, batch 250, 2 threads; `python -m bench.latent`, bench/RESULTS.md).
    "mnist-latent": UNetConfig(
        image_size=7, in_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
        attn_resolutions=(7,), dropout=0.0, norm_groups=8,
    ),
    # CIFAR-10 through cifar10-f4: 8x8x4 latents, two levels 8 -> 4 with attention at 4x4.
    # `ddpm train --preset cifar10-latent --data cifar10/train --data.limit 5000 --autoencoder RUN`:
    # 115 img/s. The same widths on cifar10-f2's 16x16x4 latents (three levels, attention at 8x8)
    # trained at 31 img/s, so in a fixed CPU budget the 8x8x4 latents (f = 4) see almost four times
    # the images; both autoencoders train at about the same speed (32 and 34 img/s).
    "cifar10-latent": UNetConfig(
        image_size=8, in_channels=4, ch=64, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0, norm_groups=8,
    ),
    # For tests: every kind of block (shortcut, down/upsampling, attention, middle) at the least
    # cost; forward and backward of a batch of 8 take about 70 ms on 2 CPU cores. 702,499
    # parameters.
    "tiny": UNetConfig(
        image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
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
