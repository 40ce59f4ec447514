"""Training a video model with the one training loop: the data, the condition, the preview and the presets.

:mod:`ddpm.train` trains any network of :data:`ddpm.models.NETWORKS` on batches of ``Batch(x, y, idx)``;
a video run differs in four pieces, all here:

1. the data: :func:`ddpm.video_data.load_videos` (``frames = model.frames``, ``size = model.image_size``,
   ``channels = model.in_channels``) gives a :class:`ddpm.video_data.VideoData`, whose ``batches`` has
   ImageData's signature and guarantees, plus ``image_frames``;
2. the condition: :func:`video_training_condition`, the run's own condition (class labels with their
   dropout, or none) plus, with joint training, :class:`ImageFrames`, the temporal attention mask of the
   ``image_frames`` independent frames that the batches append to every clip (VDM section 3);
3. the preview: :func:`video_preview`, a frame grid (a row per clip) and a GIF of EMA samples;
4. the presets: :data:`ddpm.config.VIDEO_RUN_PRESETS`, among the run presets, with ``data.image_frames``.

:mod:`ddpm.train` calls these when the run's network is a video U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm.conditioning import TrainingCondition, training_condition, unconditional
from ddpm.config import VIDEO_RUN_PRESETS
from ddpm.data import Batch
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import SamplerSettings
from ddpm.images import save_gif, save_image, video_frame_grid, video_frames
from ddpm.video_sampling import generate_video


@dataclass(frozen=True)
class ImageFrames:
    """VDM's joint video-image training: the last ``count`` frames of every clip are independent images
    (``VideoData.batches(..., image_frames=count)`` appends them), so the network gets ``images_mask``
    [B, T + count], True on them, and its temporal attention keeps them apart. ``inner`` is the run's
    other condition (class labels, or none), whose arguments are passed along."""

    count: int
    inner: TrainingCondition = unconditional

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        kwargs = dict(self.inner(batch, generator, device))
        clips, frames = batch.x.shape[0], batch.x.shape[2]
        if not 0 <= self.count < frames:
            raise ValueError(f"{self.count} image frames in clips of {frames} frames")
        mask = torch.zeros(clips, frames, dtype=torch.bool)
        mask[:, frames - self.count:] = True
        kwargs["images_mask"] = mask.to(device)
        return kwargs


def video_training_condition(config: Any, image_frames: int = 0) -> TrainingCondition:
    """The condition a video run trains with: the run's own (:func:`ddpm.conditioning.training_condition`),
    with :class:`ImageFrames` around it when ``image_frames`` > 0."""
    inner = training_condition(config)
    return ImageFrames(image_frames, inner) if image_frames else inner


@torch.no_grad()
def video_preview(ema: nn.Module, diffusion: GaussianDiffusion, config: Any, device: torch.device, bf16: bool,
                  path: str | Path) -> Path:
    """A fixed-seed frame grid of ``train.sample_count`` EMA clips at ``path`` (a row per clip, a column per
    frame; class-conditional: the classes in turn) and the same clips as a GIF beside it (``.gif``)."""
    cfg = config.train
    samples = generate_video(ema, diffusion, cfg.sample_count, SamplerSettings(cfg.sample_sampler, cfg.sample_steps),
                             seed=cfg.seed, batch_size=cfg.sample_count, device=device, bf16=bf16, progress=False)
    path = Path(path)
    save_gif(video_frames(samples.uint8()), path.with_suffix(".gif"), duration_ms=125)
    return save_image(video_frame_grid(samples.uint8()), path)


def run_sections(preset: str) -> dict[str, Any]:
    """A video preset as ``RunConfig.from_dict`` takes it: the model section with its ``arch``, the other
    sections' overrides."""
    spec = VIDEO_RUN_PRESETS[preset]
    return {"model": {"arch": spec["model"].ARCH, **spec["model"].to_dict()},
            **{key: dict(spec.get(key, {})) for key in ("diffusion", "data", "train")}}
