"""The Edit view's work: inpainting (:func:`ddpm.inpaint.inpaint`: RePaint, or replacement with any sampler)
and img2img (:func:`ddpm.img2img.img2img`: SDEdit) of one image, drawn as ``ddpm inpaint`` and
``ddpm img2img`` draw them, with the Sample view's one request per model, progress and cancel
(:mod:`ddpm.ui.sampling`).

The image (an upload, or one of ``--data``'s) is made the model's size and channels once, as the data loader
makes training images (:func:`ddpm.data.prepare_image`: bicubic resize to cover, centre crop), and kept; the
page shows it and offers it as ``image.png``. The page draws the mask over it and sends it as a bitmap, base64,
one bit per pixel row by row, most significant bit first: 1 keeps the pixel, 0 has it generated (the library's
convention); it comes back as ``mask.png`` (white keeps). ``ddpm inpaint MODEL --image image.png --mask
mask.png`` with the options :func:`command_line` writes draws the same images for the same seed.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddpm.data import Fit, prepare_image
from ddpm.generate import SamplerSettings, Samples
from ddpm.images import make_grid
from ddpm.img2img import check_images, img2img, results_grid, strength_timesteps
from ddpm.inpaint import JUMP_LENGTH, REPAINT_STEPS, RESAMPLES, check_mask, inpaint, masked_preview, repaint_schedule
from ddpm.inpaint import METHODS as INPAINT_METHODS
from ddpm.samplers import DEFAULT_SAMPLER, check_sampler_arguments
from ddpm.ui import NotFound, RequestError
from ddpm.ui.sampling import (
    Cancelled,
    Emit,
    ModelSlot,
    Progress,
    check_condition,
    check_seed,
    condition_arguments,
    images_event,
    parse_fields,
    png_bytes,
    prompts_of,
    shell_line,
)

#: What the view does: RePaint, replacement (both inpainting) or img2img.
METHODS = (*INPAINT_METHODS, "img2img")
#: The most results of one request (one batch), and the largest RePaint jump length and resamples.
MAX_SAMPLES = 16
MAX_REPAINT = 1000
#: The request's body: its options and a mask of up to 1024x1024 pixels (128 KiB, in base64).
MAX_EDIT_BYTES = 256 * 1024
MAX_INPUTS = 16
#: What the page names the files the command line reads.
IMAGE_FILE, MASK_FILE = "image.png", "mask.png"


@dataclass(frozen=True)
class EditRequest:
    """What the page asks to edit: ``input`` (a key of :class:`EditInputs`) with ``method``; ``mask`` (the
    bitmap) for inpainting only, ``strength`` for img2img only. ``sampler`` ``None``: ddpm for RePaint (its
    only one), else the default; ``steps`` ``None``: the method's default."""

    model: int = 0
    input: str = ""
    method: str = "repaint"
    mask: str | None = None
    sampler: str | None = None
    steps: int | None = None
    jump_length: int = JUMP_LENGTH
    resamples: int = RESAMPLES
    strength: float = 0.5
    seed: int = 0
    num_samples: int = 1
    label: int | None = None
    guidance_scale: float | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    @classmethod
    def parse(cls, body: Any) -> EditRequest:
        """The request in a JSON object (:func:`ddpm.ui.sampling.parse_fields`), its ranges checked."""
        values = parse_fields(cls, body, ints=("model", "steps", "jump_length", "resamples", "seed", "num_samples",
                                               "label"),
                              strings=("input", "method", "sampler", "prompt", "negative_prompt"),
                              numbers=("strength", "guidance_scale"),
                              optional=("sampler", "steps", "label", "guidance_scale", "prompt", "negative_prompt"))
        if values["mask"] is not None and not isinstance(values["mask"], str):
            raise RequestError("mask must be a string (base64, one bit per pixel) or null")
        request = cls(**values)
        if request.method not in METHODS:
            raise RequestError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
        if not 1 <= request.num_samples <= MAX_SAMPLES:
            raise RequestError(f"num_samples must be between 1 and {MAX_SAMPLES}")
        if not (1 <= request.jump_length <= MAX_REPAINT and 1 <= request.resamples <= MAX_REPAINT):
            raise RequestError(f"jump_length and resamples must be between 1 and {MAX_REPAINT}")
        if request.method == "repaint" and request.sampler not in (None, "ddpm"):
            raise RequestError("RePaint's steps are DDPM's: send sampler null (or choose the replacement method)")
        if request.method == "img2img" and request.mask is not None:
            raise RequestError("img2img takes no mask: send mask null (or inpaint)")
        check_seed(request.seed)
        return request

    @property
    def sampler_name(self) -> str:
        return "ddpm" if self.method == "repaint" else self.sampler or DEFAULT_SAMPLER


class EditInputs:
    """The images the view edits, each at a model's size and channels, by key ``e<token>`` (the last
    :data:`MAX_INPUTS` are kept)."""

    def __init__(self) -> None:
        self.images: OrderedDict[str, Tensor] = OrderedDict()

    def add(self, image: Image.Image, shape: tuple[int, ...]) -> dict[str, Any]:
        """Keep ``image`` made ``shape`` ``(C, H, W)`` as the data loader makes training images; what the page hears."""
        channels, height, width = shape
        if channels not in (1, 3):
            raise RequestError(f"the model draws {channels}-channel images; the Edit view takes grey or RGB models")
        pixels, upscaled = prepare_image(image, Fit((height, width), channels, None, False))
        key = "e" + secrets.token_urlsafe(9)
        self.images[key] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
        while len(self.images) > MAX_INPUTS:
            self.images.popitem(last=False)
        return {"input": key, "url": f"/api/edit/inputs/{key}/{IMAGE_FILE}", "width": width, "height": height,
                "channels": channels, "source_size": [image.width, image.height], "upscaled": upscaled}

    def get(self, key: str) -> Tensor:
        if key not in self.images:
            raise NotFound(f"no image {key!r} to edit (the last {MAX_INPUTS} are kept): choose it again")
        return self.images[key]


def as_pil(image: Tensor) -> Image.Image:
    """A uint8 [C, H, W] image (grey or RGB) as a Pillow image of its size."""
    return make_grid(image[None], padding=0)


def decode_mask(data: str | None, height: int, width: int) -> Tensor:
    """The page's bitmap (module docstring) as float [1, 1, H, W], 1 keeping a pixel; a :class:`RequestError`
    unless it has exactly one bit per pixel of the ``height`` x ``width`` image (rounded up to whole bytes)."""
    if data is None:
        raise RequestError("inpainting needs a mask: draw on the image what to generate")
    need = math.ceil(height * width / 8)
    try:
        bits = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the mask is not base64") from None
    if len(bits) != need:
        raise RequestError(f"the mask has {len(bits)} bytes; a {width}x{height} image's has {need} "
                           "(one bit per pixel, row by row)")
    keep = np.unpackbits(np.frombuffer(bits, np.uint8))[: height * width].reshape(height, width)
    return torch.from_numpy(keep.astype(np.float32))[None, None]


def mask_image(mask: Tensor) -> Image.Image:
    """A mask [1, 1, H, W] as ``ddpm inpaint --mask`` reads it: white keeps, black is generated."""
    return Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), "L")


def edit_settings(slot: ModelSlot, request: EditRequest) -> SamplerSettings:
    """The sampler settings the CLI verbs make of the same options (the loaded model's, e.g. diffusers' DDIM)."""
    return slot.loaded.sampler_settings(SamplerSettings(request.sampler_name, request.steps))


def check_edit(slot: ModelSlot, request: EditRequest, image: Tensor) -> Tensor | None:
    """The mask (``None`` for img2img), after the one-line error the library would raise, before anything starts."""
    check_images(image[None], slot.loaded.image_shape, "the image")
    T = slot.diffusion.num_timesteps
    settings = edit_settings(slot, request)
    check_sampler_arguments(T, settings.sampler, settings.steps, 0.0)
    check_condition(slot, request)
    if request.method == "img2img":
        strength_timesteps(slot.diffusion, settings, request.strength)
        return None
    if request.method == "repaint":
        repaint_schedule(settings.steps or min(REPAINT_STEPS, T), request.jump_length, request.resamples)
    mask = decode_mask(request.mask, *image.shape[1:])
    check_mask(mask, image[None], "the mask")
    return mask


@dataclass
class EditResult:
    """What one edit drew, kept (the model's latest only) for the downloads."""

    id: str
    request: EditRequest
    samples: Samples
    image: Tensor
    mask: Tensor | None
    command: str

    def png(self, name: str) -> bytes:
        """``image`` (the input), ``mask`` or ``grid`` (what the CLI verb writes as grid.png)."""
        inputs = self.image[None]
        if name == "image":
            return png_bytes(as_pil(self.image))
        if name == "mask" and self.mask is not None:
            return png_bytes(mask_image(self.mask))
        if name == "grid":
            shown = [] if self.mask is None else [(masked_preview(inputs, self.mask), "masked")]
            return png_bytes(results_grid(inputs, self.samples.images, self.request.num_samples, shown))
        raise NotFound(f"no {name}.png in this result")

    def output_png(self, i: int) -> bytes:
        """Output ``i``, as ``images/00000i.png`` of the CLI verb."""
        if not 0 <= i < len(self.samples.images):
            raise NotFound(f"no output {i} in this result")
        return png_bytes(make_grid(self.samples.images[i:i + 1], padding=0))

    def summary(self) -> dict[str, Any]:
        """The ``done`` event: where to fetch what was drawn, and the command that draws it again."""
        base, count = f"/api/edit/results/{self.id}", len(self.samples.images)
        return {"result": self.id, "method": self.request.method, "nfe": self.samples.nfe, "command": self.command,
                "count": count, "labels": self.samples.labels.tolist(),
                "image": f"{base}/{IMAGE_FILE}", "mask": None if self.mask is None else f"{base}/{MASK_FILE}",
                "grid": f"{base}/grid.png", "outputs": [f"{base}/outputs/{i}.png" for i in range(count)]}


def run_edit(slot: ModelSlot, request: EditRequest, image: Tensor, mask: Tensor | None, emit: Emit,
             cancel: Any, device: str | torch.device = "cpu") -> EditResult:
    """Edit ``image`` as ``ddpm inpaint`` / ``ddpm img2img`` would, telling ``emit`` the progress and the results."""
    loaded = slot.loaded
    common = {"num_samples": request.num_samples, "seed": request.seed, "label": request.label,
              "guidance_scale": request.guidance_scale, "prompts": prompts_of(request),
              "negative_prompt": request.negative_prompt, "conditioning": slot.conditioning,
              "batch_size": request.num_samples, "device": device, "bf16": slot.bf16, "progress": False,
              "autoencoder": loaded.autoencoder,
              # The images are told at the end: a latent model's get the image's own pixels put back after decoding.
              "callback": Progress(request.num_samples, emit, cancel, preview=loaded.autoencoder is None, images=False)}
    settings = edit_settings(slot, request)
    if request.method == "img2img":
        samples = img2img(loaded.model, slot.diffusion, image[None], request.strength, settings, **common)
    else:
        samples = inpaint(loaded.model, slot.diffusion, image[None], mask, request.method, settings,
                          jump_length=request.jump_length, resamples=request.resamples, **common)
    if cancel.is_set():  # img2img at strength 0 runs no step that would have heard it
        raise Cancelled
    emit("images", images_event(0, samples.images))
    emit("progress", {"fraction": 1.0})
    slot.edited = EditResult(secrets.token_urlsafe(12), request, samples, image, mask, command_line(slot, request))
    return slot.edited


def command_line(slot: ModelSlot, request: EditRequest, out: str = "edit") -> str:
    """The ``ddpm inpaint`` or ``ddpm img2img`` command that draws the same images from image.png (and mask.png)."""
    if request.method == "img2img":
        args = ["ddpm", "img2img", slot.source, "--image", IMAGE_FILE, "--strength", str(request.strength)]
    else:
        args = ["ddpm", "inpaint", slot.source, "--image", IMAGE_FILE, "--mask", MASK_FILE, "--method", request.method]
    args += ["--out", out]
    if request.method != "repaint":
        args += ["--sampler", request.sampler_name]
    if request.steps is not None:
        args += ["--steps", str(request.steps)]
    if request.method == "repaint":
        args += ["--jump-length", str(request.jump_length), "--resamples", str(request.resamples)]
    args += ["--seed", str(request.seed)]
    if request.num_samples > 1:
        args += ["--num-samples", str(request.num_samples)]
    return shell_line(args + condition_arguments(slot, request))


def edit_info() -> dict[str, Any]:
    """What the page's Edit view needs to draw its controls."""
    return {"methods": list(METHODS), "max_samples": MAX_SAMPLES, "max_repaint": MAX_REPAINT,
            "max_edit_bytes": MAX_EDIT_BYTES, "repaint": {"steps": REPAINT_STEPS, "jump_length": JUMP_LENGTH,
                                                          "resamples": RESAMPLES},
            "default_sampler": DEFAULT_SAMPLER}
