"""Drawing images from a model: the one place that does it.

``ddpm sample``, ``ddpm eval --fid``, the training run's preview grids, ``ddpm viz reverse`` and
the demo all call :func:`generate`. It makes the batches (labels for a class-conditional model,
prompts for a text-conditional one, classifier-free guidance), runs any sampler of
:data:`ddpm.samplers.SAMPLERS`, decodes a latent model's samples to pixels, counts the network
evaluations it spent, and keeps the draws reproducible: image ``i`` of a call has its own random
generator, seeded from ``(seed, i)``, from which its x_T and every noise draw of its chain come,
so a seed gives the same images whatever the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.checkpoints import atomic_write
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.images import auto_scale, labelled_rows, make_grid, save_image, save_npz, save_pngs, to_uint8
from ddpm.latent import decode_latents
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.runtime import autocast, derive_seed, resolve_bf16
from ddpm.samplers import check_dynamic_threshold, check_sampler_arguments, default_sampler, default_steps


@dataclass(frozen=True)
class SamplerSettings:
    """How to run the reverse process.

    The defaults are :data:`ddpm.samplers.DEFAULT_SAMPLER` at its default NFE; with ``steps`` and no
    ``sampler``, the sampler for that NFE (:func:`ddpm.samplers.default_sampler`, filled in on creation).

    Attributes:
        sampler: a name from :data:`ddpm.samplers.SAMPLERS` (``None``: the one for ``steps``).
        steps: network evaluations (``None``: :func:`ddpm.samplers.default_steps`, all T for ``ddpm``).
        eta: DDIM's η (0: deterministic) or the SDE solvers' noise amount (1: the reverse SDE, 0: their ODE);
            ``None``: the sampler's own (:data:`ddpm.samplers.DEFAULT_ETA`).
        spacing: which timesteps the chain visits (``None``: the sampler's default,
            :data:`ddpm.samplers.DEFAULT_SPACING`).
        rtol: ``dpm-adaptive``'s relative tolerance (it picks its own steps).
        clip_denoised: clip x̂_0 to [-1, 1] (pixels; off for latents, which have no such range).
        dynamic_threshold: Imagen's dynamic thresholding of x̂_0 at this percentile (e.g. 0.995, Imagen's)
            in place of the clip (:func:`ddpm.diffusion.dynamic_thresholding`; pixels only).
        timesteps: the 0-based timesteps to visit, given explicitly (instead of ``spacing``).
        final_alpha_cumprod: the ᾱ the last step lands at (None: 1, the data; DDIM and the multistep solvers).
        order: UniPC's order, 1 to 3 (``None``: 3).
        lower_order_final: the multistep solvers' lower orders at their last steps
            (:class:`ddpm.samplers.Multistep`).
        final_step: ``"denoise"`` (x̂_0 of the last evaluation) or ``"sigma-min"``
            (:data:`ddpm.samplers.FINAL_STEPS`).

    A diffusers model's scheduler config fills ``timesteps`` and ``final_alpha_cumprod`` in for DDIM
    (:meth:`ddpm.loading.LoadedModel.sampler_settings`).
    """

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    rtol: float | None = None
    clip_denoised: bool = True
    dynamic_threshold: float | None = None
    timesteps: tuple[int, ...] | None = None
    final_alpha_cumprod: float | None = None
    order: int | None = None
    lower_order_final: bool = True
    final_step: str = "denoise"

    def __post_init__(self) -> None:
        if self.sampler is None:
            nfe = len(self.timesteps) if self.steps is None and self.timesteps is not None else self.steps
            object.__setattr__(self, "sampler", default_sampler(nfe))

    def describe(self, T: int) -> str:
        if self.sampler == "dpm-adaptive":
            return f"dpm-adaptive, rtol {self.rtol or DEFAULT_RTOL:g}"
        spacing = f", {self.spacing} spacing" if self.spacing else ""
        if self.timesteps is not None:
            spacing = f", timesteps {self.timesteps[-1]} to {self.timesteps[0]}"
        if self.final_alpha_cumprod is not None and self.final_alpha_cumprod != 1.0:
            spacing += f", ending at alpha-bar {self.final_alpha_cumprod:.6g}"
        options = [f"eta {self.eta:g}" if self.eta else "", f"order {self.order}" if self.order else "",
                   "" if self.lower_order_final else "no lower-order final steps",
                   "" if self.final_step == "denoise" else f"final step {self.final_step}",
                   f"dynamic threshold {self.dynamic_threshold:g}" if self.dynamic_threshold else ""]
        steps = default_steps(self.sampler, T) if self.steps is None else self.steps
        return ", ".join([f"{self.sampler}, {steps} NFE{spacing}", *filter(None, options)])

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`GaussianDiffusion.sample` these settings fill in."""
        kwargs = {"sampler": self.sampler, "steps": self.steps, "eta": self.eta, "spacing": self.spacing,
                  "clip_denoised": self.clip_denoised, "dynamic_threshold": self.dynamic_threshold}
        if self.sampler == "dpm-adaptive":
            kwargs["rtol"] = self.rtol or DEFAULT_RTOL
        extra = {"timesteps": self.timesteps, "final_alpha_cumprod": self.final_alpha_cumprod, "order": self.order,
                 "lower_order_final": None if self.lower_order_final else False,
                 "final_step": None if self.final_step == "denoise" else self.final_step}
        return {**kwargs, **{key: value for key, value in extra.items() if value is not None}}

    def check(self, T: int) -> None:
        """:class:`UserError` unless these settings are valid for a process of T steps."""
        check_sampler_arguments(T, self.sampler, self.steps, self.eta, self.spacing, self.rtol, self.order,
                                self.lower_order_final, self.final_step)


#: dpm-adaptive's tolerance when none is given.
DEFAULT_RTOL = 0.05


@dataclass
class Samples:
    """What :func:`generate` drew.

    Attributes:
        images: float32 [N, C, H, W] in [-1, 1] (clamped), on the CPU.
        labels: int64 [N], the class of each image (−1 for an unconditional model).
        nfe: network evaluations per image (a guided evaluation, conditional and unconditional
            together, counts once).
        trajectory: with ``trajectory_every``, the first batch's chain (see
            :func:`ddpm.samplers.sample`), else ``None``; for a latent model its ``x_t`` and
            ``pred_x0`` are decoded to pixels (what the decoder makes of the noisy latents, and of
            the predicted clean ones).
        prompts: the prompt of each image, for a text-conditional model.
    """

    images: Tensor
    labels: Tensor
    nfe: float
    trajectory: dict[str, Tensor] | None = None
    prompts: list[str] | None = None

    def uint8(self) -> Tensor:
        return to_uint8(self.images)


class _CountingModel(nn.Module):
    """The model, counting its calls (one call is one network evaluation of the batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.model(*args, **kwargs)


def image_generators(seed: int, first: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image, for images ``first, ..., first + count − 1`` of a seed."""
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, i)) for i in range(first, first + count)]


def class_labels(first: int, count: int, num_classes: int, label: int | None) -> Tensor:
    """``label`` for every image, or the classes in turn by the images' place in the whole call."""
    if label is not None:
        return torch.full((count,), label, dtype=torch.long)
    return torch.arange(first, first + count) % num_classes


class Conditioning(Protocol):
    """What turns prompts into a text-conditional model's keyword arguments (token ids for a text
    encoder trained with the model, a frozen encoder's embeddings otherwise)."""

    def model_kwargs(self, prompts: Sequence[str], device: torch.device) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class Condition:
    """What the images are asked to show: a class ``label`` (or the classes in turn) or ``prompts``
    (in turn; with ``negative_prompt`` as the unconditional half), and the guidance scale."""

    label: int | None = None
    prompts: Sequence[str] | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None

    def check(self, num_classes: int, conditioning: Conditioning | None) -> None:
        """One :class:`UserError` line for a condition the model cannot take."""
        kind = "class-conditional" if num_classes else "text-conditional" if conditioning else "unconditional"
        if self.label is not None and not num_classes:
            raise UserError(f"--label needs a class-conditional model; this one is {kind}")
        if self.label is not None and not 0 <= self.label < num_classes:
            raise UserError(f"--label {self.label} is out of range: the model has classes 0..{num_classes - 1}")
        if (self.prompts is not None or self.negative_prompt is not None) and conditioning is None:
            raise UserError(f"--prompt needs a text-conditional model; this one is {kind}")
        if self.prompts is not None and not self.prompts:
            raise UserError("no prompts given (an empty --prompts-file?)")
        if self.guidance_scale is not None and not (num_classes or conditioning):
            raise UserError("--guidance-scale needs a class- or text-conditional model; this one is unconditional")

    def batch(self, first: int, n: int, num_classes: int, conditioning: Conditioning | None,
              device: torch.device) -> tuple[dict[str, Any], Tensor, list[str] | None]:
        """The model's keyword arguments for images ``first .. first + n - 1``, their labels and prompts."""
        kwargs: dict[str, Any] = {}
        y, prompts = torch.full((n,), -1), None
        if num_classes:
            y = class_labels(first, n, num_classes, self.label)
            kwargs["y"] = y.to(device)
        elif conditioning is not None:
            given = self.prompts or [""]
            prompts = [given[i % len(given)] for i in range(first, first + n)]
            kwargs.update(conditioning.model_kwargs(prompts, device))
            if self.guidance_scale is not None:
                kwargs["uncond"] = conditioning.model_kwargs([self.negative_prompt or ""] * n, device)
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return kwargs, y, prompts


#: ``prepare(first, n, generators, device) -> dict``: what an image-to-image method changes in the chain of
#: images ``first .. first + n - 1`` (their generators are ``generators``; anything drawn from them comes
#: before the chain's own draws): keyword arguments of the chain, e.g. ``noise`` (x at the first kept step),
#: ``timesteps``, ``after_step`` (:func:`ddpm.samplers.sample`), and ``model_kwargs`` added to the condition's
#: (a super-resolution model's ``low_res``).
Prepare = Callable[[int, int, list[torch.Generator], torch.device], Mapping[str, Any]]


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    num_images: int,
    settings: SamplerSettings | None = None,
    *,
    seed: int = 0,
    label: int | None = None,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    conditioning: Conditioning | None = None,
    latents: Tensor | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
    progress: bool = True,
    trajectory_every: int = 0,
    autoencoder: AutoencoderKL | None = None,
    prepare: Prepare | None = None,
    chain: Callable[..., Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Samples:
    """Draw ``num_images`` images from ``model`` (a network with ``sample_shape`` and ``num_classes``)
    under ``diffusion``.

    With ``autoencoder`` the model is a latent one: the chain runs on latents without clipping x̂_0
    (latents have no [-1, 1] range) and its end is decoded (:func:`ddpm.latent.decode_latents`).

    A class-conditional model gets ``label`` for every image or the classes in turn; a
    text-conditional one (``conditioning`` given) ``prompts`` in turn (the empty prompt if none),
    with ``negative_prompt`` (default empty) as the unguided half. A ``guidance_scale`` w ≠ 1 applies
    classifier-free guidance. ``latents`` ``[num_images, *sample_shape]`` is x_T to start from (to
    reproduce an image). ``bf16`` is bfloat16 autocast (``None``: the device's measured default,
    :func:`ddpm.runtime.default_bf16`). ``settings`` defaults to :data:`ddpm.samplers.DEFAULT_SAMPLER`.
    ``trajectory_every`` > 0 also records the first batch's chain every that many steps. ``callback`` hears each
    step (``"event": "step"``, :func:`ddpm.samplers.heard`'s keys) and batch (``"event": "batch"``, its
    ``"images"``), with its ``"first"`` image and size ``"batch"``; an exception it raises stops the drawing.
    Image-to-image methods steer each batch's chain with ``prepare`` (:data:`Prepare`) and may run their
    own ``chain``, a function called as :meth:`GaussianDiffusion.sample` is (the default).
    """
    settings = _settings_for(settings or SamplerSettings(), autoencoder, diffusion.num_timesteps)
    condition = Condition(label, prompts, negative_prompt, guidance_scale)
    shape = _check_request(num_images, batch_size, latents, model, prepare)
    condition.check(model.num_classes, conditioning)
    device = torch.device(device)
    use_bf16 = resolve_bf16(bf16, device)
    counted, was_training = _CountingModel(model), model.training
    model.eval()
    images, labels, all_prompts, trajectory, batches = [], [], [], None, 0
    desc = f"sampling ({settings.describe(diffusion.num_timesteps)})"
    try:
        with tqdm(total=num_images, desc=desc, unit="img", disable=not progress) as bar:
            for first in range(0, num_images, batch_size):
                n = min(batch_size, num_images - first)
                kwargs, y, batch_prompts = condition.batch(first, n, model.num_classes, conditioning, device)
                generators = image_generators(seed, first, n, device)
                extra = _chain_arguments(settings, prepare, first, n, generators, device, latents, kwargs)
                record = trajectory_every > 0 and first == 0
                on_step, on_batch = _listeners(callback, first, n)
                with autocast(device, use_bf16):
                    out = (chain or diffusion.sample)(
                        counted, (n, *shape), generator=generators, device=device, model_kwargs=kwargs,
                        progress=progress and num_images <= n, return_trajectory=record, callback=on_step,
                        **({"trajectory_every": trajectory_every} if record else {}), **extra)
                if record:
                    out, trajectory = out
                if autoencoder is not None:
                    out = decode_latents(autoencoder, out)
                    trajectory = _decoded(autoencoder, trajectory) if record else trajectory
                images.append(out.float().clamp(-1, 1).cpu())
                on_batch(images[-1])
                labels.append(y)
                all_prompts += batch_prompts or []
                batches += 1
                bar.update(n)
    finally:
        model.train(was_training)
    return Samples(torch.cat(images), torch.cat(labels), counted.calls / batches, trajectory,
                   all_prompts if conditioning is not None else None)


def _chain_arguments(settings: SamplerSettings, prepare: Prepare | None, first: int, n: int,
                     generators: list[torch.Generator], device: torch.device, latents: Tensor | None,
                     model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of one batch's chain: the settings', then ``prepare``'s (its ``model_kwargs``
    added to ``model_kwargs`` in place), and the batch's ``latents`` as x_T unless ``prepare`` gave one."""
    extra = {**settings.sample_kwargs(), **(prepare(first, n, generators, device) if prepare else {})}
    model_kwargs.update(extra.pop("model_kwargs", {}))
    if latents is not None:
        extra.setdefault("noise", latents[first:first + n].to(device))
    return extra


def _settings_for(settings: SamplerSettings, autoencoder: AutoencoderKL | None, T: int) -> SamplerSettings:
    """``settings``, checked against a process of T steps, for a latent model (no clip: latents have no
    [-1, 1] range) or as they are."""
    settings.check(T)
    check_dynamic_threshold(settings.dynamic_threshold)
    if autoencoder is None:
        return settings
    if settings.dynamic_threshold is not None:
        raise UserError("--dynamic-threshold is for pixel models: a latent model's x̂_0 has no [-1, 1] range")
    return dataclasses.replace(settings, clip_denoised=False)


def _listeners(callback: Callable[[dict[str, Any]], None] | None, first: int,
               n: int) -> tuple[Callable[[dict[str, Any]], None] | None, Callable[[Tensor], None]]:
    """:func:`generate`'s ``callback`` as the step callback of the batch of images ``first .. first + n − 1``
    and as what hears its images."""
    if callback is None:
        return None, lambda images: None
    where = {"first": first, "batch": n}
    return (lambda step: callback({"event": "step", **where, **step}),
            lambda images: callback({"event": "batch", **where, "images": images}))


def _check_request(num_images: int, batch_size: int, latents: Tensor | None, model: nn.Module,
                   prepare: Prepare | None) -> tuple[int, ...]:
    """The model's sample shape, after one :class:`UserError` line for a request it cannot serve."""
    shape = tuple(model.sample_shape)
    if num_images < 1 or batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    if latents is not None and tuple(latents.shape) != (num_images, *shape):
        raise UserError(f"latents must be [{num_images}, {', '.join(map(str, shape))}] (x_T of every image), "
                        f"got {list(latents.shape)}")
    if getattr(getattr(model, "config", None), "low_res_channels", 0) and prepare is None:
        raise UserError("this is a super-resolution model: it enlarges a base model's images rather than drawing "
                        "its own ('ddpm sample BASE --upsampler SR', ddpm.superres.upsample)")
    return shape


def _decoded(autoencoder: AutoencoderKL, trajectory: dict[str, Tensor]) -> dict[str, Tensor]:
    """A latent chain's ``x_t`` and ``pred_x0`` ``[n, B, c, h, w]`` decoded to ``[n, B, C, H, W]``."""
    out = dict(trajectory)
    for key in ("x_t", "pred_x0"):
        z = trajectory[key]
        images = decode_latents(autoencoder, z.flatten(0, 1))
        out[key] = images.reshape(*z.shape[:2], *images.shape[1:]).clamp(-1, 1).to(z.device)
    return out


def write_samples(samples: Samples, out_dir: str | Path, grid: bool = True, pngs: bool = False, npz: bool = False,
                  grid_max: int = 100, nrow: int | None = None) -> list[Path]:
    """Write a PNG grid (the first ``grid_max`` images), individual PNGs and/or an .npz; return the paths."""
    out_dir = Path(out_dir)
    images = samples.uint8()
    written: list[Path] = []
    if grid:
        picture = grid_image(images[:grid_max], nrow) if samples.prompts is None else prompt_rows(
            images[:grid_max], samples.prompts[:grid_max])
        written.append(save_image(picture, out_dir / "grid.png"))
    if pngs:
        written.extend(save_pngs(images, out_dir / "images"))
    if npz:
        has_labels = bool((samples.labels >= 0).any())
        written.append(save_npz(images, out_dir / "samples.npz", labels=samples.labels if has_labels else None))
    if samples.prompts is not None and (pngs or npz):
        path = out_dir / "prompts.txt"
        with atomic_write(path, "w", durable=False) as f:
            f.write("".join(prompt.replace("\n", " ") + "\n" for prompt in samples.prompts))
        written.append(path)
    return written


def prompt_rows(images: Tensor, prompts: Sequence[str], per_row: int = 10) -> Any:
    """The images grouped by prompt, a labelled row per prompt (in the order they first appear)."""
    order = list(dict.fromkeys(prompts))
    groups = [[i for i, p in enumerate(prompts) if p == prompt][:per_row] for prompt in order]
    width = min(len(g) for g in groups)
    return labelled_rows([(images[g[:width]], prompt or "(no prompt)") for g, prompt in zip(groups, order)])


def grid_image(images: Tensor, nrow: int | None = None) -> Any:
    """A grid of images scaled up for small sizes (as every sample grid of the project is drawn)."""
    return make_grid(images, nrow=nrow, scale=auto_scale(images.shape[-1]))

