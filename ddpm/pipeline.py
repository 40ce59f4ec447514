"""The Python face of ``ddpm sample``: a loaded model that is called with a prompt and returns images.

:func:`load_pipeline` reads anything :func:`ddpm.loading.load_model` reads (a Stable Diffusion
directory, a run, an exported pipeline, a checkpoint, a diffusers or ddpm model directory) and the
:class:`Pipeline` it returns draws as the command line does, through :func:`ddpm.generate.generate`:
the same sampler options and defaults, the same DDIM of a diffusers scheduler config
(:meth:`ddpm.loading.LoadedModel.sampler_settings`), and the same images for the same seed (image i
of a seed has its own generator, so it does not depend on the batch). A call returns uint8 images
``(N, H, W, C)`` as numpy; :meth:`Pipeline.generate` returns the float :class:`~ddpm.generate.Samples`.

    pipe = ddpm.load_pipeline("stable-diffusion-v1-5")
    images = pipe(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.5,
                  sampler="ddim", steps=50, seed=0)

``latents`` starts the chain from a given x_T (in the latent space for a latent model), e.g. from
:meth:`Pipeline.initial_latents`, which is the x_T a seed draws: an image is reproduced from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, Samples, generate, image_generators
from ddpm.loading import LoadedModel, load_model
from ddpm.runtime import resolve_device
from ddpm.samplers import randn


@dataclass
class Pipeline:
    """A loaded model (:class:`~ddpm.loading.LoadedModel`) on ``device``, called to draw images."""

    loaded: LoadedModel
    device: torch.device

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the images drawn."""
        return self.loaded.image_shape

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(c, h, w)`` of x_T: the network's sample shape (latents for a latent model, else pixels)."""
        return tuple(self.loaded.model.sample_shape)

    def initial_latents(self, num_images: int, seed: int = 0) -> Tensor:
        """x_T ``[num_images, *latent_shape]`` that a call with ``seed`` starts images 0.. from."""
        generators = image_generators(seed, 0, num_images, self.device)
        return randn((num_images, *self.latent_shape), generators, self.device, torch.float32)

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        num_images: int = 1,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        latents: Tensor | np.ndarray | None = None,
        label: int | None = None,
        eta: float | None = None,
        spacing: str | None = None,
        batch_size: int = 16,
        bf16: bool | None = None,
        progress: bool = False,
    ) -> Samples:
        """Draw images; returns the :class:`~ddpm.generate.Samples` (float images in [-1, 1],
        ``[N, C, H, W]``, with their prompts or labels). :meth:`__call__` is this as uint8 pixels.

        ``prompt`` (a text-to-image model's; one or a list) gets ``num_images`` images each, in the
        order of the list (diffusers' ``num_images_per_prompt``); ``negative_prompt`` (default the
        empty prompt) is the unconditional half of classifier-free guidance at ``guidance_scale``
        (None or 1: none; Stable Diffusion uses 7.5). A class-conditional model takes ``label``
        (None: the classes in turn), an unconditional one neither; both draw ``num_images`` in all.
        ``sampler``, ``steps`` (NFE), ``eta``, ``spacing``: as ``ddpm sample`` (:data:`ddpm.samplers.SAMPLERS`;
        ``sampler`` None: the one for the NFE, :func:`ddpm.samplers.default_sampler`).
        ``latents`` ``[N, *latent_shape]`` is x_T; ``seed`` draws it otherwise, and any noise of a
        stochastic sampler. A mistake (a prompt for an unconditional model, a label out of range,
        latents of the wrong shape) is one :class:`~ddpm.errors.UserError`.
        """
        prompts = None
        if prompt is not None:
            given = [prompt] if isinstance(prompt, str) else list(prompt)
            if not given:
                raise UserError("prompt is an empty list; give at least one prompt, or None")
            prompts = [p for p in given for _ in range(num_images)]  # num_images of each, in order
        total = num_images if prompts is None else len(prompts)
        if latents is not None:
            latents = torch.as_tensor(latents, dtype=torch.float32)
        settings = self.loaded.sampler_settings(SamplerSettings(sampler, steps, eta, spacing))
        return generate(self.loaded.model, self.loaded.diffusion.build(), total, settings, seed=seed, label=label,
                        guidance_scale=guidance_scale, prompts=prompts, negative_prompt=negative_prompt,
                        conditioning=self.loaded.conditioning, latents=latents, batch_size=batch_size,
                        device=self.device, bf16=bf16, progress=progress, autoencoder=self.loaded.autoencoder)

    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | None = None,
                 num_images: int = 1, **options: Any) -> np.ndarray:
        """uint8 images ``(N, H, W, C)``; the arguments are :meth:`generate`'s."""
        samples = self.generate(prompt, negative_prompt, num_images, **options)
        return samples.uint8().permute(0, 2, 3, 1).contiguous().numpy()


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> Pipeline:
    """A :class:`Pipeline` for the model at ``path`` (anything ``ddpm sample`` takes) on ``device``
    (``"auto"``: a GPU if there is one); ``weights``: a run's EMA (default) or raw weights."""
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return Pipeline(load_model(path, weights, device), device)
