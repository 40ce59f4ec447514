"""Writing a trained model out: the diffusers layout (with a matching scheduler config) or ours.

A latent model is written as a pipeline's folders: ``unet/``, ``vae/`` (its autoencoder, with the
``scaling_factor`` it was trained with) and ``scheduler/``; :func:`ddpm.loading.load_model` reads
that back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ddpm.config import DiffusionConfig
from ddpm.errors import UserError
from ddpm.loading import LoadedModel
from ddpm.models import diffusers_io
from ddpm.models.diffusers_io import AUTOENCODER_KL, UNET2D


def export_model(loaded: LoadedModel, out_dir: str | Path, fmt: str = "diffusers") -> list[Path]:
    """Write the model in the diffusers layout (with a matching ``scheduler_config.json``) or ours."""
    out_dir = Path(out_dir)
    if fmt not in ("diffusers", "ddpm"):
        raise UserError(f"unknown export format {fmt!r}; choose diffusers or ddpm")
    if loaded.autoencoder is not None:
        if fmt != "diffusers":
            raise UserError("a latent model is exported in the diffusers layout only (unet/, vae/, scheduler/); "
                            "drop --format ddpm")
        unet, vae = out_dir / UNET2D.pipeline_folder, out_dir / AUTOENCODER_KL.pipeline_folder
        loaded.model.save_diffusers(unet)
        loaded.autoencoder.save_diffusers(vae)
        scheduler = diffusers_io.write_scheduler(out_dir, scheduler_config(loaded.diffusion, clip_sample=False),
                                                 pipeline=True)
        return [unet, vae, scheduler.parent]
    if fmt == "ddpm":
        loaded.model.save_pretrained(out_dir)
        return [out_dir]
    loaded.model.save_diffusers(out_dir)
    diffusers_io.write_scheduler(out_dir, scheduler_config(loaded.diffusion), pipeline=False)
    return [out_dir]


def scheduler_config(diffusion: DiffusionConfig, clip_sample: bool = True) -> dict[str, Any]:
    """diffusers' ``DDPMScheduler`` config for our diffusion (``clip_sample``: x̂_0 in [-1, 1], pixels only)."""
    return diffusers_io.scheduler_to_diffusers(**dataclasses.asdict(diffusion), clip_sample=clip_sample)
