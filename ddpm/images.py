"""Images in and out: [-1, 1] to uint8, grids of images, and atomic PNG, GIF and ``.npz`` writing.

Only the core dependencies (torch, NumPy, Pillow). Image batches are ``[N, C, H, W]`` with C = 1
(grey, written as Pillow mode ``'L'``) or C = 3 (``'RGB'``), either uint8 in 0..255 or floats in
[-1, 1], the range the model works in (data are scaled as ``x / 127.5 - 1``, see
:mod:`ddpm.data`). Floats outside [-1, 1], e.g. a noisy x_t, are clamped for display.

Every writer is atomic: it writes a temporary file beside the target and renames it over the
target, so a reader (or a run resumed after an interruption) never finds a half-written file.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ddpm.checkpoints import atomic_write
from ddpm.errors import UserError

PathLike = str | os.PathLike[str]


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] to uint8 0..255: ``round((x + 1) · 127.5)``, clamped; same shape and device.

    The exact inverse of the data scaling ``v / 127.5 − 1`` on the 256 levels. Values outside
    [-1, 1] are clamped; NaN (a diverged model) becomes mid-grey rather than an arbitrary byte.
    """
    # Half precision cannot hold (x + 1) · 127.5 exactly enough to round to the right level.
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    x = torch.nan_to_num(x, nan=0.0)
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def as_uint8_images(images: Tensor) -> Tensor:
    """A batch ``[N, C, H, W]`` (C = 1 or 3) as a uint8 CPU tensor: uint8 kept, floats through :func:`to_uint8`."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    return to_uint8(images).cpu()


def as_float_images(images: Tensor) -> Tensor:
    """A batch ``[N, C, H, W]`` as float32 on the CPU in [-1, 1]: uint8 scaled as ``v / 127.5 − 1``, like the data."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.detach().cpu().float() / 127.5 - 1.0
    return images.detach().cpu().float()


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")


def make_grid(
    images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255, scale: int = 1
) -> Image.Image:
    """One image showing a batch ``[N, C, H, W]`` (uint8, or floats in [-1, 1]) as a grid.

    Tiles are laid out row by row, ``nrow`` per row (default ``ceil(sqrt(N))``; fewer if N is
    smaller), each upscaled ``scale`` times by pixel repetition (nearest neighbour, so 8x8 digits
    stay crisp), with ``padding`` pixels of grey level ``pad_value`` between and around them; the
    padding is not scaled. With c = min(nrow, N) columns and r = ceil(N / c) rows the result is
    ``c · (W·scale + padding) + padding`` wide and ``r · (H·scale + padding) + padding`` high.
    Unused cells of the last row are padding. Grey (C = 1) gives mode ``'L'``, colour ``'RGB'``.
    """
    x = as_uint8_images(images)
    N, C, H, W = x.shape
    if N == 0:
        raise ValueError("cannot make a grid of zero images")
    if scale < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"need scale >= 1, padding >= 0 and pad_value in 0..255 (got {scale}, {padding}, {pad_value})")
    cols = min(nrow or math.ceil(math.sqrt(N)), N)
    rows = math.ceil(N / cols)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w, p = H * scale, W * scale, padding
    # Each tile takes the padding below and to its right; the empty cells are all padding. Then one
    # reshape lays the cells out, and the border's top and left strips are added last.
    cells = torch.full((rows * cols, C, h + p, w + p), pad_value, dtype=torch.uint8)
    cells[:N, :, :h, :w] = x
    grid = cells.reshape(rows, cols, C, h + p, w + p).permute(2, 0, 3, 1, 4).reshape(C, rows * (h + p), cols * (w + p))
    grid = torch.nn.functional.pad(grid, (p, 0, p, 0), value=pad_value)
    return _to_pil(grid)


def _to_pil(chw: Tensor) -> Image.Image:
    """A uint8 ``[C, H, W]`` tensor (C = 1 or 3) as a Pillow image, ``'L'`` or ``'RGB'``."""
    array = chw.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if chw.shape[0] == 1 else array))


def auto_scale(image_size: int) -> int:
    """The upscale factor that makes a tile of ``image_size`` pixels comfortable to look at.

    The smallest power of two that brings a tile to at least 48 px: 8 → 8 (64 px), 16 → 4,
    28 and 32 → 2, 48 and larger → 1. Powers of two keep the nearest-neighbour blocks even.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    scale = 1
    while image_size * scale < 48:
        scale *= 2
    return scale


# ---------------------------------------------------------------------------------------- writing


def save_image(img: Image.Image, path: PathLike) -> Path:
    """Write a Pillow image atomically, in the format its extension names (``.png``, ``.jpg``, ...)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the image format of {path}: give it an extension such as .png")
    with atomic_write(path, durable=False) as f:
        img.save(f, format=fmt)
    return path


def save_gif(
    frames: Sequence[Image.Image], path: PathLike, duration_ms: int | Sequence[int] = 100, loop: int = 0
) -> Path:
    """Write frames as an animated GIF, atomically.

    ``duration_ms`` is one display time for every frame or one per frame (e.g. a longer last one);
    ``loop=0`` repeats forever, n > 0 plays n + 1 times. Pillow merges consecutive identical frames
    into one, adding their durations, so the file may hold fewer frames than given.
    """
    frames = list(frames)
    durations = duration_ms if isinstance(duration_ms, int) else list(duration_ms)
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    if isinstance(durations, list) and len(durations) != len(frames):
        raise ValueError(f"got {len(durations)} durations for {len(frames)} frames")
    if len({f.size for f in frames}) > 1:
        # GIF would silently crop or pad every frame to the first one's size.
        raise ValueError(f"GIF frames must all have one size, got {sorted({f.size for f in frames})}")
    with atomic_write(path, durable=False) as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=loop)
    return Path(path)


def save_pngs(images: Tensor, directory: PathLike, start_index: int = 0) -> list[Path]:
    """Write each image of a batch ``[N, C, H, W]`` to ``directory/NNNNNN.png``, numbered from ``start_index``.

    One file per image, each written atomically, so a sampling run that stops part-way leaves only
    whole files and can go on from the next number.
    """
    x = as_uint8_images(images)
    directory = Path(directory)
    return [save_image(_to_pil(img), directory / f"{start_index + i:06d}.png") for i, img in enumerate(x)]


def save_npz(images: Tensor, path: PathLike, labels: Tensor | np.ndarray | None = None) -> Path:
    """Write a batch ``[N, C, H, W]`` to an ``.npz`` file, atomically, in the layout FID tools read.

    ``arr_0`` holds the images as uint8 ``[N, H, W, C]`` (C kept as 1 for grey), the array that
    openai/guided-diffusion's ``evaluator.py`` reads; ``arr_1`` holds the int64 ``labels`` [N]
    when given, as guided-diffusion's ``image_sample.py`` writes them. Uncompressed, like theirs.
    """
    arrays = {"arr_0": as_uint8_images(images).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
        if labels.shape != (len(arrays["arr_0"]),):
            raise ValueError(f"expected {len(arrays['arr_0'])} labels, got shape {labels.shape}")
        arrays["arr_1"] = labels
    # Writing to an open file keeps NumPy from appending ".npz" to a name that lacks it.
    with atomic_write(path, durable=False) as f:
        np.savez(f, **arrays)
    return Path(path)


# ---------------------------------------------------------------------------- labels

PADDING = 2  # between tiles in every grid here; the labels are placed by it


def labelled_rows(rows: Sequence[tuple[Tensor, str]], scale: int | None = None) -> Image.Image:
    """One row of images per label, the label to the row's left: e.g. the same seeds under several samplers.

    Each entry is (images [N, C, H, W] in [-1, 1] or uint8, label); every row must have the same N.
    """
    size = rows[0][0].shape[-1]
    scale = scale or auto_scale(size)
    grids = [make_grid(images, nrow=len(images), padding=PADDING, scale=scale) for images, _ in rows]
    out = Image.new(grids[0].mode, (grids[0].width, sum(g.height for g in grids)), "white")
    y, labels = 0, []
    for grid, (_, label) in zip(grids, rows):
        out.paste(grid, (0, y))
        labels.append((y + grid.height / 2, label))
        y += grid.height
    return annotate(out, rows=labels)


def annotate(
    img: Image.Image, columns: Sequence[tuple[float, str]] = (), rows: Sequence[tuple[float, str]] = ()
) -> Image.Image:
    """``img`` with black text on white added above it (``columns``: x centre, text) and to its left (``rows``)."""
    # One line height for every label (not each text's own), so that frames of a GIF, whose
    # captions differ, all come out the same size and their text on one baseline.
    _, line_top, _, line_bottom = _text_box(_LINE)
    top = line_bottom - line_top + 6 if columns else 0
    left = max((text_width(s) for _, s in rows), default=-8) + 8
    out = Image.new(img.mode, (img.width + left, img.height + top), "white")
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    for x, text in columns:
        _draw_centred(draw, left + x, top / 2, text)
    for y, text in rows:
        _draw_centred(draw, left / 2, top + y, text)
    return out


_LINE = "Ay(|)_"  # a line's full height: ascender, descender, brackets


def _text_box(text: str) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of ``text`` drawn at the origin in the default font."""
    return ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=_font())


def text_width(text: str) -> int:
    left, _, right, _ = _text_box(text)
    return right - left


def _draw_centred(draw: ImageDraw.ImageDraw, x: float, y: float, text: str) -> None:
    """``text`` centred on x by its own width, and on y by the line's height (one baseline for all)."""
    # From boxes rather than anchor="mm", which Pillow's bitmap fallback font lacks.
    left, _, right, _ = _text_box(text)
    _, top, _, bottom = _text_box(_LINE)
    draw.text((round(x - (left + right) / 2), round(y - (top + bottom) / 2)), text, fill="black", font=_font())


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


# ------------------------------------------------------------------------------------------ videos


def as_uint8_videos(videos: Tensor) -> Tensor:
    """Clips ``[N, C, T, H, W]`` (C = 1 or 3) as a uint8 CPU tensor: uint8 kept, floats through :func:`to_uint8`."""
    if videos.ndim != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"expected videos [N, C, T, H, W] with C = 1 or 3, got shape {tuple(videos.shape)}")
    return videos.detach().cpu() if videos.dtype == torch.uint8 else to_uint8(videos).cpu()


def video_frame_grid(videos: Tensor, padding: int = 2, scale: int | None = None) -> Image.Image:
    """Clips ``[N, C, T, H, W]`` (uint8, or floats in [-1, 1]) as one picture: a row per clip, a column
    per frame (:func:`make_grid`, tiles upscaled by ``scale``, default :func:`auto_scale`)."""
    x = as_uint8_videos(videos)
    frames = x.transpose(1, 2).flatten(0, 1)  # [N*T, C, H, W], clip by clip
    return make_grid(frames, nrow=x.shape[2], padding=padding, scale=scale or auto_scale(x.shape[-1]))


def video_frames(videos: Tensor, nrow: int | None = None, padding: int = 2, scale: int | None = None
                 ) -> list[Image.Image]:
    """The frames of an animation of clips ``[N, C, T, H, W]``: frame t is the grid of every clip's frame t."""
    x = as_uint8_videos(videos)
    scale = scale or auto_scale(x.shape[-1])
    return [make_grid(x[:, :, t], nrow=nrow, padding=padding, scale=scale) for t in range(x.shape[2])]


def save_mp4(frames: Sequence[Image.Image | np.ndarray], path: PathLike, fps: float = 8) -> Path:
    """Write frames (Pillow images or uint8 ``[H, W]`` / ``[H, W, 3]`` arrays, one size) as an H.264 MP4,
    atomically, through imageio's ffmpeg plugin (the optional extra ``video``). Grey is written as RGB,
    and an odd height or width is padded by one white row or column (H.264's 4:2:0 needs even sides)."""
    try:
        import imageio.v3 as iio
    except ImportError as error:
        raise UserError(f"writing {path} needs imageio and imageio-ffmpeg: pip install 'ddpm[video]'") from error
    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    if not arrays or len({a.shape for a in arrays}) > 1:
        raise ValueError(f"an MP4 needs frames of one size, got {sorted({a.shape for a in arrays})}")
    h, w, _ = arrays[0].shape
    stack = np.pad(np.stack(arrays), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
    # macro_block_size=1: imageio would otherwise resize every frame to multiples of 16.
    data = iio.imwrite("<bytes>", stack, extension=".mp4", plugin="FFMPEG", fps=fps, macro_block_size=1)
    with atomic_write(path, durable=False) as f:
        f.write(data)
    return Path(path)


# ---------------------------------------------------------------------------------------- reading

_GREY = frozenset({"1", "L", "LA", "La", "F", "I", "I;16", "I;16L", "I;16B", "I;16N"})


def read_image(path: PathLike) -> Tensor:
    """One image file as uint8 ``[C, H, W]``, C = 1 for a grey image and 3 for a colour one, unresized.

    As the data loader reads them (:mod:`ddpm.data`): 16-bit grey is scaled to 8 bits, transparency is
    composited on white, a palette image becomes RGB. A missing or unreadable file is a :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from e
    grey = img.mode in _GREY
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit (or 32-bit integer) grey: 65535 -> 255; float as is
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / (1 if img.mode == "F" else 257)), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    pixels = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()).permute(2, 0, 1).contiguous()


def read_images(paths: Sequence[PathLike]) -> Tensor:
    """Image files of one size and kind as uint8 ``[N, C, H, W]`` (:func:`read_image`)."""
    images = [read_image(p) for p in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        described = ", ".join(f"{p} is {im.shape[2]}x{im.shape[1]}x{im.shape[0]}" for p, im in zip(paths, images))
        raise UserError(f"the images differ in size or channels ({described}); give images of one kind")
    return torch.stack(images)
