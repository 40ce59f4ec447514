"""ddpm: denoising diffusion probabilistic models (Ho, Jain and Abbeel, 2020) and their successors."""

from ddpm.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
