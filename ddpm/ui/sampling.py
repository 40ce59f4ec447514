"""The Sample view's work: a request checked, drawn by :func:`ddpm.generate.generate` exactly as
``ddpm sample`` draws it, its progress told as events, stopped between steps when cancelled.

A model (a :class:`ModelSlot`) serves one request at a time: a second one while it draws is
:class:`~ddpm.ui.Busy`. The request names the model by its index among those given on the command
line, never by a path. The images are those of ``ddpm sample`` with the same arguments, bit for bit
(the same call with the same seed and batch size: :func:`command_line` writes that command), and the
first batch's chain is kept for the page's scrubber, the grid PNG and the trajectory GIF.
"""

from __future__ import annotations

import base64
import io
import math
import secrets
import shlex
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddpm.errors import is_int
from ddpm.generate import Condition, SamplerSettings, Samples, generate, grid_image
from ddpm.images import as_uint8_images, make_grid
from ddpm.loading import LoadedModel, describe_run
from ddpm.samplers import DEFAULT_SAMPLER, SAMPLERS, check_sampler_arguments, default_steps, kept_timesteps
from ddpm.ui import Busy, NotFound, RequestError
from ddpm.viz import reverse_process_gif

#: The most images one request may ask for (and the most in one batch).
MAX_IMAGES = 64
#: The most steps of the first batch's chain kept for the scrubber: every kept step up to this many,
#: else every k-th (DDPM's 1000 steps give 100 frames), and fewer where x_t and x̂_0 of so many frames
#: would pass :data:`MAX_TRAJECTORY_BYTES` (16 images of 256x256x3 keep 10).
MAX_FRAMES = 100
MAX_TRAJECTORY_BYTES = 256 * 2**20
MAX_PROMPT = 1000
#: Seconds between two progress events, and the images of the batch whose x̂_0 they preview.
PROGRESS_INTERVAL = 0.1
PREVIEW_IMAGES = 16

Emit = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """Raised from the sampling callback when the request was cancelled."""


@dataclass(frozen=True)
class SampleRequest:
    """What the page asks to draw (``ddpm sample``'s options; ``steps`` ``None``: the sampler's default NFE)."""

    model: int = 0
    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    seed: int = 0
    num_images: int = 4
    batch_size: int = 4
    label: int | None = None
    guidance_scale: float | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    @classmethod
    def parse(cls, body: Any) -> SampleRequest:
        """The request in a JSON object; a missing field takes its default, a wrong one is a :class:`RequestError`."""
        request = cls(**parse_fields(cls, body, ints=("model", "seed", "num_images", "batch_size", "steps", "label"),
                                     strings=("sampler", "prompt", "negative_prompt"), numbers=("guidance_scale",),
                                     optional=("steps", "label", "prompt", "negative_prompt", "guidance_scale")))
        if not 1 <= request.num_images <= MAX_IMAGES or not 1 <= request.batch_size <= MAX_IMAGES:
            raise RequestError(f"num_images and batch_size must be between 1 and {MAX_IMAGES}")
        check_seed(request.seed)
        return request


def parse_fields(cls: type, body: Any, ints: tuple[str, ...] = (), strings: tuple[str, ...] = (),
                 numbers: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` in the JSON object ``body``, each checked for its kind (``ints``,
    ``strings`` of at most :data:`MAX_PROMPT` characters, finite ``numbers`` as floats; ``optional`` ones may be
    null): a missing field takes its default, an unknown or wrong one is a :class:`RequestError`. An empty
    ``prompt`` or ``negative_prompt`` is none."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}")
    values = {name: body.get(name, f.default) for name, f in fields.items()}
    for name in ints:
        if not (is_int(values[name]) or name in optional and values[name] is None):
            raise RequestError(f"{name} must be an integer{' or null' if name in optional else ''}, "
                               f"got {values[name]!r}")
    for name in strings:
        value = values[name]
        if not (isinstance(value, str) and len(value) <= MAX_PROMPT or name in optional and value is None):
            raise RequestError(f"{name} must be a string of at most {MAX_PROMPT} characters")
    for name in numbers:
        value = values[name]
        if value is None and name in optional:
            continue
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise RequestError(f"{name} must be a number")
        values[name] = float(value)
    for name in ("prompt", "negative_prompt"):
        if name in values:
            values[name] = values[name] or None
    return values


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise RequestError("seed must be between 0 and 2^63 - 1")


@dataclass
class SampleResult:
    """What one request drew, kept (the model's latest only) for the downloads and the scrubber."""

    id: str
    samples: Samples
    command: str
    _gif: bytes | None = None

    def grid_png(self) -> bytes:
        """The grid ``ddpm sample`` writes as grid.png for the same images."""
        return png_bytes(grid_image(self.samples.uint8()))

    def frame_png(self, k: int, which: str) -> bytes:
        """The grid of the first batch's ``x_t`` or ``pred_x0`` at kept frame ``k``."""
        trajectory = self.samples.trajectory
        if which not in ("x_t", "pred_x0") or trajectory is None or not 0 <= k < len(trajectory["timesteps"]):
            raise NotFound(f"no frame {k} {which} in this result")
        images = trajectory[which][k].clamp(-1, 1)
        return png_bytes(make_grid(images, nrow=math.ceil(math.sqrt(len(images)))))

    def gif(self) -> bytes:
        """:func:`ddpm.viz.reverse_process_gif` of the first batch (x_t beside x̂_0), made once."""
        if self._gif is None:
            with tempfile.TemporaryDirectory() as tmp:
                path = reverse_process_gif(self.samples.trajectory, Path(tmp) / "reverse.gif", show_pred_x0=True)
                self._gif = path.read_bytes()
        return self._gif

    def summary(self) -> dict[str, Any]:
        """The ``done`` event: where to fetch what was drawn, and the command that draws it again."""
        trajectory = self.samples.trajectory
        base = f"/api/results/{self.id}"
        return {"result": self.id, "nfe": self.samples.nfe, "command": self.command, "count": len(self.samples.images),
                "labels": self.samples.labels.tolist(), "prompts": self.samples.prompts,
                "grid": f"{base}/grid.png", "gif": f"{base}/trajectory.gif", "frames_url": f"{base}/frames",
                "frames": [{"t": int(t) + 1} for t in trajectory["timesteps"]]}


@dataclass
class ModelSlot:
    """A model given on the command line (``source`` as given), and the one request it serves at a time.

    ``bf16`` is the autocast it draws with, decided once: ``auto`` can differ between processes (on a CPU
    it is measured), so the command line names it."""

    index: int
    source: str
    loaded: LoadedModel
    weights: str = "ema"
    device: str = "auto"
    bf16: bool = False
    result: SampleResult | None = None
    #: The latest edit (an :class:`ddpm.ui.edit.EditResult`).
    edited: Any = None

    def __post_init__(self) -> None:
        self.diffusion = self.loaded.diffusion.build()
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source

    @property
    def conditioning(self) -> Any:
        """The text conditioning of a text-to-image model (``None`` for the others)."""
        return getattr(self.loaded, "conditioning", None)

    def info(self) -> dict[str, Any]:
        """What the page shows of the model and which of its controls apply."""
        d = self.loaded.diffusion
        return {"index": self.index, "name": self.name, "description": describe_run(self.loaded),
                "num_classes": self.loaded.num_classes, "text": self.conditioning is not None,
                "image_shape": list(self.loaded.image_shape), "latent": self.loaded.autoencoder is not None,
                "timesteps": d.timesteps, "schedule": d.schedule, "busy": self._lock.locked(),
                "default_steps": sampler_defaults(d.timesteps)}

    def begin(self) -> threading.Event:
        """Take the model for one request; its cancel flag. :class:`Busy` while another request holds it."""
        if not self._lock.acquire(blocking=False):
            raise Busy(f"model {self.index} ({self.name}) is busy with another request: wait for it or cancel it")
        self._cancel = threading.Event()
        return self._cancel

    def finish(self) -> None:
        self._cancel = None
        self._lock.release()

    def cancel(self) -> bool:
        """Ask the running request to stop at its next step; whether one was running."""
        flag = self._cancel
        if flag is not None:
            flag.set()
        return flag is not None


def check_request(slot: ModelSlot, request: SampleRequest) -> None:
    """The :class:`UserError` that :func:`generate` would raise, before anything starts."""
    check_sampler_arguments(slot.diffusion.num_timesteps, request.sampler, request.steps, 0.0)
    check_condition(slot, request)


def check_condition(slot: ModelSlot, request: Any) -> None:
    """The :class:`UserError` for a ``label``, ``prompt``, ``negative_prompt`` or ``guidance_scale`` the model
    cannot take (``request``: a :class:`SampleRequest` or an edit's)."""
    Condition(request.label, prompts_of(request), request.negative_prompt, request.guidance_scale).check(
        slot.loaded.num_classes, slot.conditioning)


def prompts_of(request: Any) -> list[str] | None:
    return None if request.prompt is None else [request.prompt]


def run_sample(slot: ModelSlot, request: SampleRequest, emit: Emit, cancel: threading.Event,
               device: str | torch.device = "cpu") -> SampleResult:
    """Draw the request as ``ddpm sample`` would, telling ``emit`` the progress and each batch's images."""
    loaded = slot.loaded
    settings = loaded.sampler_settings(SamplerSettings(request.sampler, request.steps))  # as ddpm sample's
    samples = generate(loaded.model, slot.diffusion, request.num_images, settings, seed=request.seed,
                       label=request.label, guidance_scale=request.guidance_scale, prompts=prompts_of(request),
                       negative_prompt=request.negative_prompt, conditioning=slot.conditioning,
                       batch_size=request.batch_size, device=device, bf16=slot.bf16, progress=False,
                       autoencoder=loaded.autoencoder,
                       trajectory_every=trajectory_every(slot, settings, min(request.batch_size, request.num_images)),
                       callback=Progress(request.num_images, emit, cancel, preview=loaded.autoencoder is None))
    slot.result = SampleResult(secrets.token_urlsafe(12), samples, command_line(slot, request))
    return slot.result


def trajectory_every(slot: ModelSlot, settings: SamplerSettings, batch_size: int) -> int:
    """Every kept step up to :data:`MAX_FRAMES` of them (fewer for big images), else evenly fewer."""
    frame_bytes = 2 * 4 * batch_size * math.prod(slot.loaded.image_shape)  # x_t and x̂_0 in float32
    frames = max(2, min(MAX_FRAMES, MAX_TRAJECTORY_BYTES // frame_bytes))
    T = slot.diffusion.num_timesteps
    if settings.sampler == "dpm-adaptive":
        kept = T // 10  # it picks its own steps, far fewer than T: the estimate is generous
    else:
        steps = default_steps(settings.sampler, T) if settings.steps is None else settings.steps
        kept = len(kept_timesteps(slot.diffusion, settings.sampler, steps))
    return max(1, math.ceil(kept / frames))


class Progress:
    """:func:`generate`'s callback: raises :class:`Cancelled` once the flag is set, else tells ``emit`` the
    progress (with x̂_0 of the batch, for a pixel model) at most every :data:`PROGRESS_INTERVAL` and, with
    ``images``, each finished batch's images, as PNG data URLs at their own size (:func:`images_event`)."""

    def __init__(self, num_images: int, emit: Emit, cancel: threading.Event, preview: bool = True,
                 images: bool = True) -> None:
        self.num_images, self.emit, self.cancel, self.preview = num_images, emit, cancel, preview
        self.images, self.last = images, 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.cancel.is_set():
            raise Cancelled
        first, n = event["first"], event["batch"]
        if event["event"] == "batch":
            if self.images:
                self.emit("images", images_event(first, event["images"]))
            self.emit("progress", {"fraction": (first + n) / self.num_images})
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        # RePaint's chain goes back up (k rises again): it counts its reverse steps instead.
        done, total = ((event["step"] + 1, event["reverse_steps"]) if "reverse_steps" in event
                       else (event["total"] - event["k"], event["total"]))
        data = {"fraction": (first + n * done / total) / self.num_images, "step": event["step"] + 1,
                "t": event["timestep"] + 1, "first": first, "batch": n}
        if self.preview:
            x0 = event["pred_x0"][:PREVIEW_IMAGES].float().clamp(-1, 1).cpu()
            data["preview"] = data_url(make_grid(x0, nrow=math.ceil(math.sqrt(len(x0))), padding=1))
        self.emit("progress", data)


def command_line(slot: ModelSlot, request: SampleRequest, out: str = "samples") -> str:
    """The ``ddpm sample`` command that draws the same images."""
    args = ["ddpm", "sample", slot.source, "--out", out, "--sampler", request.sampler]
    if request.steps is not None:
        args += ["--steps", str(request.steps)]
    args += ["--seed", str(request.seed), "--num-images", str(request.num_images),
             "--batch-size", str(request.batch_size)]
    return shell_line(args + condition_arguments(slot, request))


def condition_arguments(slot: ModelSlot, request: Any) -> list[str]:
    """The options every drawing command ends with: the condition of ``request`` and how the model was loaded."""
    options = (("--label", request.label), ("--guidance-scale", request.guidance_scale),
               ("--prompt", request.prompt), ("--negative-prompt", request.negative_prompt))
    args = [item for flag, value in options if value is not None for item in (flag, str(value))]
    if slot.weights != "ema":
        args += ["--weights", slot.weights]
    if slot.device != "auto":
        args += ["--device", slot.device]
    return args + ["--bf16", "true" if slot.bf16 else "false"]


def shell_line(args: list[str]) -> str:
    return " ".join(shlex.quote(arg) for arg in args)


def sampler_defaults(T: int) -> dict[str, int | None]:
    """The NFE each sampler spends when not told (``None``: dpm-adaptive picks its own)."""
    return {name: default_steps(name, T) for name in SAMPLERS}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def images_event(first: int, images: torch.Tensor) -> dict[str, Any]:
    """The ``images`` event of images ``first, ...`` ([N, C, H, W] in [-1, 1] or uint8), each as a PNG at its size."""
    return {"first": first, "images": [data_url(make_grid(image[None], padding=0))
                                       for image in as_uint8_images(images)]}

