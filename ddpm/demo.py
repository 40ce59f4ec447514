"""``ddpm demo``: the whole workflow on scikit-learn's 8×8 digits, with no download.

Trains the ``digits`` preset for a few CPU minutes, then writes what a person wants to look at:
a grid of samples, the forward process on real digits, the noise schedules and the reverse
process (a grid of x_t and x̂_0 over time, and an animated GIF).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm.config import get_config
from ddpm.data import load_images
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate, write_samples
from ddpm.images import save_image
from ddpm.loading import load_model
from ddpm.runtime import resolve_device
from ddpm.train import train
from ddpm.viz import forward_process_strip, plot_schedules, reverse_process_pictures


def run_demo(out: Path, minutes: float = 4.0, steps: int | None = None, overwrite: bool = False,
             device: str = "auto", progress: bool = True, sample_steps: int | None = None) -> dict[str, Path]:
    """Train on the digits for at most ``minutes`` and write the pictures; returns name → path.

    Samples are drawn with DDPM's ancestral sampler over all T steps, or ``sample_steps``.
    """
    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}")
    overrides = {"train.time_limit": str(minutes), "train.device": device}
    if steps is not None:
        overrides["train.steps"] = str(steps)
    config = get_config("digits", overrides)
    run_dir = out / "run"
    train(config, run_dir, overwrite=overwrite, progress=progress)

    dev = resolve_device(device)
    loaded = load_model(run_dir, "ema", dev)
    diffusion = loaded.diffusion.build()
    paths: dict[str, Path] = {"run": run_dir}
    settings = SamplerSettings("ddpm", sample_steps)
    samples = generate(loaded.model, diffusion, 100, settings, batch_size=100, device=dev, progress=progress)
    paths["samples"] = write_samples(samples, out / "samples", nrow=10)[0]
    digits = load_images("digits", 8, split="test", limit=6)
    paths["forward"] = save_image(
        forward_process_strip(diffusion, digits.images, generator=torch.Generator().manual_seed(0)),
        out / "forward.png")
    try:
        paths["schedules"] = Path(plot_schedules(config.diffusion.timesteps, out / "schedules.png"))
    except UserError:
        pass  # matplotlib is an optional extra; the other pictures need only Pillow
    reverse = reverse_process_pictures(loaded.model, diffusion, out, settings, num_images=8, device=dev,
                                       progress=progress)
    paths["reverse"], paths["animation"] = reverse[0], reverse[1]
    paths["metrics"] = run_dir / "metrics.jsonl"
    return paths
