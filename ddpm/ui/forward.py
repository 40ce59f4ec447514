"""The Forward-process view's work: q(x_t | x_0) on an image, and the schedule's ᾱ_t, SNR and β̃_t.

A process is a loaded model's diffusion or one of the named schedules at T = 1000. The image is the
built-in pattern, one of the first images of ``--data``, or one the page uploaded (size-limited,
decoded by Pillow, kept in memory, never written). x_t is :meth:`GaussianDiffusion.q_sample` with one
noise draw ε per seed, so moving t shows one image fading into one fixed noise ([DDPM] eq. 4), as
:func:`ddpm.viz.forward_process_strip` draws it. The equations' sections of docs/theory.md are served
as text beside the plots, from the source tree, so the page needs no network.
"""

from __future__ import annotations

import io
import re
import secrets
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.images import as_float_images, make_grid, to_uint8
from ddpm.schedules import SCHEDULES
from ddpm.ui import NotFound, RequestError, TooLarge

#: An upload larger than this is refused before it is read (HTTP 413).
MAX_UPLOAD_BYTES = 8 * 2**20
#: An image with more pixels than this is refused before it is decoded (a decompression bomb).
MAX_UPLOAD_PIXELS = 4096 * 4096
#: Uploads are shrunk to fit this side (q(x_t | x_0) is per pixel; a bigger image shows nothing more).
UPLOAD_SIDE = 256
MAX_UPLOADS = 16
#: Images of ``--data`` offered to the view.
MAX_DATA_IMAGES = 100
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

THEORY = Path(__file__).resolve().parents[2] / "docs" / "theory.md"
#: The sections of docs/theory.md beside each plot.
THEORY_SECTIONS = {
    "forward": "The closed form q(x_t | x_0)",
    "schedules": "Noise schedules",
    "posterior": "2. The forward-process posterior",
}


@dataclass(frozen=True)
class Process:
    """A diffusion the view can show: its label and configuration."""

    label: str
    config: DiffusionConfig

    def build(self) -> GaussianDiffusion:
        return self.config.build()


def processes(models: list[tuple[str, DiffusionConfig]]) -> list[Process]:
    """Each model's diffusion (``(name, config)``), then each named schedule at T = 1000 not already listed."""
    found = [Process(f"{name}: {c.schedule}, T = {c.timesteps}", c) for name, c in models]
    seen = {(p.config.schedule, p.config.timesteps) for p in found}
    found += [Process(f"{name}, T = 1000", DiffusionConfig(schedule=name)) for name in SCHEDULES
              if (name, 1000) not in seen]
    return found


def curves(diffusion: GaussianDiffusion) -> dict[str, Any]:
    """ᾱ_t, SNR(t) = ᾱ_t / (1 − ᾱ_t), β̃_t and β_t for the paper's t = 1..T (index t − 1)."""
    acp = diffusion.alphas_cumprod
    return {"T": diffusion.num_timesteps, "alphas_cumprod": acp.tolist(), "snr": (acp / (1 - acp)).tolist(),
            "posterior_variance": diffusion.posterior_variance.tolist(), "betas": diffusion.betas.tolist()}


def noised(diffusion: GaussianDiffusion, x0: Tensor, t: int, seed: int) -> Image.Image:
    """x_t ~ q(x_t | x_0) for the paper's t (0: x_0 itself), ε drawn from ``seed``, as an image."""
    T = diffusion.num_timesteps
    if not 0 <= t <= T:
        raise RequestError(f"t must be between 0 and T = {T}, got {t}")
    x = as_float_images(x0[None])
    if t > 0:
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        x = diffusion.q_sample(x, torch.tensor([t - 1]), noise=eps)
    return make_grid(to_uint8(x.clamp(-1, 1)), padding=0)


def pattern(size: int = 32) -> Tensor:
    """The built-in image, uint8 [3, size, size]: colour ramps and a bright disc (the view works without data)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.25) ** 2 + (y + 0.2) ** 2 < 0.2).float()
    rgb = torch.stack([x, y, -x * y]) * 0.6 * (1 - disc) + disc * 0.9
    return to_uint8(rgb)


def open_upload(data: bytes, draft: int | None = None) -> Image.Image:
    """An uploaded image, decoded (in its own mode; a JPEG at a reduced size of at least ``draft`` a side if
    given), or a one-line :class:`RequestError`. The size is checked from the header before any pixel is decoded."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in UPLOAD_FORMATS:
                raise RequestError(f"upload a {', '.join(UPLOAD_FORMATS)} image, not {image.format}")
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise TooLarge(f"the image has {image.width}x{image.height} pixels; at most {MAX_UPLOAD_PIXELS:,}")
            if draft is not None:
                image.draft(image.mode, (draft, draft))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise RequestError(f"not an image Pillow can read ({type(e).__name__})") from None
    return image


def decode_upload(data: bytes) -> Tensor:
    """An uploaded image as uint8 [C, H, W] (grey or RGB, shrunk to :data:`UPLOAD_SIDE`), or a one-line
    :class:`RequestError` (:func:`open_upload`)."""
    image = open_upload(data, UPLOAD_SIDE)
    try:
        image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
    except (OSError, ValueError) as e:
        raise RequestError(f"not an image Pillow can read ({type(e).__name__})") from None
    image.thumbnail((UPLOAD_SIDE, UPLOAD_SIDE))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    channels = 1 if image.mode == "L" else 3
    return array.reshape(image.height, image.width, channels).permute(2, 0, 1).contiguous()


class ImageStore:
    """The images the view can noise, by key: ``pattern``, ``d<i>`` (the i-th of ``--data``), ``u<token>``
    (an upload; the last :data:`MAX_UPLOADS` are kept)."""

    def __init__(self, data: Tensor | None = None, source: str = "") -> None:
        self.data = None if data is None else data[:MAX_DATA_IMAGES]
        self.source = source
        self.uploads: OrderedDict[str, Tensor] = OrderedDict()
        self._pattern = pattern()

    def info(self) -> dict[str, Any]:
        return {"data": 0 if self.data is None else len(self.data), "source": self.source}

    def add(self, data: bytes) -> dict[str, Any]:
        image = decode_upload(data)
        key = "u" + secrets.token_urlsafe(9)
        self.uploads[key] = image
        while len(self.uploads) > MAX_UPLOADS:
            self.uploads.popitem(last=False)
        return {"image": key, "width": image.shape[2], "height": image.shape[1], "channels": image.shape[0]}

    def get(self, key: str) -> Tensor:
        if key == "pattern":
            return self._pattern
        if re.fullmatch(r"d\d{1,6}", key) and self.data is not None and int(key[1:]) < len(self.data):
            return self.data[int(key[1:])]
        if key in self.uploads:
            return self.uploads[key]
        raise NotFound(f"no image {key!r} (the data set has {self.info()['data']} images; uploads are kept "
                       f"for the last {MAX_UPLOADS})")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (as tests/test_docs.py computes it)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def theory_section(key: str, path: Path = THEORY) -> dict[str, Any]:
    """The text of one section of docs/theory.md (its heading down to the next heading of its level or above)."""
    if key not in THEORY_SECTIONS:
        raise NotFound(f"no theory section {key!r}; there are {', '.join(THEORY_SECTIONS)}")
    title = THEORY_SECTIONS[key]
    where = {"title": title, "path": "docs/theory.md", "anchor": github_slug(title)}
    if not path.is_file():
        raise NotFound(f"docs/theory.md is not installed with the package: read section '{title}' in the "
                       "source repository")
    lines = path.read_text(encoding="utf-8").splitlines()
    heads = headings(lines)
    start = next((i for i, _, text in heads if text == title), None)
    if start is None:
        raise NotFound(f"docs/theory.md has no section '{title}' any more")
    level = next(n for i, n, _ in heads if i == start)
    end = next((i for i, n, _ in heads if i > start and n <= level), len(lines))
    return {**where, "text": "\n".join(lines[start:end]).strip()}


def headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, text) of every Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.fullmatch(r"(#+)\s+(.*?)\s*", line)):
            found.append((i, len(m.group(1)), m.group(2)))
    return found
