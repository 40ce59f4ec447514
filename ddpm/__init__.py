"""ddpm: denoising diffusion probabilistic models (Ho, Jain and Abbeel, 2020) and their successors.

The math lives in :mod:`ddpm.schedules` (β_t), :mod:`ddpm.diffusion` (the process),
:mod:`ddpm.losses` (KL, decoder, L_simple / L_vlb / L_hybrid, bits/dim) and :mod:`ddpm.samplers`
(DDPM's Algorithm 2, DDIM, DPM-Solver++ 2M / 3M / 2M SDE, UniPC, Heun, an adaptive solver; the
default is :data:`ddpm.samplers.DEFAULT_SAMPLER`). Timesteps are 0-based everywhere: index i is
the paper's t = i + 1.

:func:`load_pipeline` is the Python face of ``ddpm sample``: any model ddpm loads (a Stable
Diffusion directory, a run, an exported pipeline) called with a prompt returns images.
"""

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.pipeline import Pipeline, load_pipeline
from ddpm.schedules import cosine_betas, even_timesteps, get_betas, linear_betas, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "GaussianDiffusion",
    "Pipeline",
    "UserError",
    "__version__",
    "cosine_betas",
    "even_timesteps",
    "get_betas",
    "linear_betas",
    "load_pipeline",
    "space_timesteps",
]
