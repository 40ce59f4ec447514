"""Writing a trained model out: the diffusers layout (with a matching scheduler config) or ours.

A latent model is written as a pipeline's folders: ``unet/``, ``vae/`` (its autoencoder, with the
``scaling_factor`` it was trained with) and ``scheduler/``; :func:`ddpm.loading.load_model` reads
that back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm import checkpoints
from ddpm.config import DiffusionConfig
from ddpm.errors import UserError
from ddpm.loading import LoadedModel
from ddpm.schedules import SCALED_LINEAR_ENDS


def export_model(loaded: LoadedModel, out_dir: str | Path, fmt: str = "diffusers") -> list[Path]:
    """Write the model in the diffusers layout (with a matching ``scheduler_config.json``) or ours."""
    out_dir = Path(out_dir)
    if fmt not in ("diffusers", "ddpm"):
        raise UserError(f"unknown export format {fmt!r}; choose diffusers or ddpm")
    if loaded.autoencoder is not None:
        if fmt != "diffusers":
            raise UserError("a latent model is exported in the diffusers layout only (unet/, vae/, scheduler/); "
                            "drop --format ddpm")
        loaded.model.save_diffusers(out_dir / "unet")
        loaded.autoencoder.save_diffusers(out_dir / "vae")
        scheduler = scheduler_config(loaded.diffusion, clip_sample=False)
        checkpoints.save_json(out_dir / "scheduler" / "scheduler_config.json", scheduler)
        return [out_dir / "unet", out_dir / "vae", out_dir / "scheduler"]
    if fmt == "ddpm":
        loaded.model.save_pretrained(out_dir)
        return [out_dir]
    loaded.model.save_diffusers(out_dir)
    checkpoints.save_json(out_dir / "scheduler_config.json", scheduler_config(loaded.diffusion))
    return [out_dir]


def scheduler_config(d: DiffusionConfig, clip_sample: bool = True) -> dict[str, Any]:
    """diffusers' ``DDPMScheduler`` config for our diffusion (``clip_sample``: x̂_0 in [-1, 1], pixels only)."""
    # diffusers does not rescale the linear schedule with T; writing the scaled ends makes its
    # linspace(beta_start, beta_end, T) equal to ours.
    scale = 1000 / d.timesteps
    ends = SCALED_LINEAR_ENDS if d.schedule == "scaled_linear" else (1e-4 * scale, 0.02 * scale)
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.timesteps,
        "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(d.schedule, d.schedule),
        "beta_start": ends[0],
        "beta_end": ends[1],
        "prediction_type": {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[d.mean_type],
        "variance_type": d.var_type,
        "clip_sample": clip_sample,
    }
