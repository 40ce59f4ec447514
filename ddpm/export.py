"""Writing a trained model out: the diffusers layout (with a matching scheduler config) or ours."""

from __future__ import annotations

from pathlib import Path

from ddpm import checkpoints
from ddpm.errors import UserError
from ddpm.loading import LoadedModel


def export_model(loaded: LoadedModel, out_dir: str | Path, fmt: str = "diffusers") -> list[Path]:
    """Write the model in the diffusers layout (with a matching ``scheduler_config.json``) or ours."""
    out_dir = Path(out_dir)
    if fmt == "ddpm":
        loaded.model.save_pretrained(out_dir)
        return [out_dir]
    if fmt != "diffusers":
        raise UserError(f"unknown export format {fmt!r}; choose diffusers or ddpm")
    loaded.model.save_diffusers(out_dir)
    d = loaded.diffusion
    # diffusers does not rescale the linear schedule with T; writing the scaled ends makes its
    # linspace(beta_start, beta_end, T) equal to ours.
    scale = 1000 / d.timesteps
    checkpoints.save_json(out_dir / "scheduler_config.json", {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.timesteps,
        "beta_schedule": "linear" if d.schedule == "linear" else "squaredcos_cap_v2",
        "beta_start": 1e-4 * scale,
        "beta_end": 0.02 * scale,
        "prediction_type": {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[d.mean_type],
        "variance_type": d.var_type,
        "clip_sample": True,
    })
    return [out_dir]
