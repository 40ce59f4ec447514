"""Videos for training: folders of GIF/MP4 files, ``.npy``/``.npz`` arrays, and Moving MNIST made from MNIST.

:func:`load_videos` turns a ``--data`` source into a :class:`VideoData`: clips of ``frames`` frames,
every frame resized like an image of :mod:`ddpm.data` (bicubic to the least size that covers the
target, then the centre crop), held in RAM as uint8 ``[N, C, T, H, W]`` and scaled to [-1, 1] as
``x / 127.5 - 1`` only when a batch is drawn. A video longer than ``frames`` gives every whole,
non-overlapping window of ``frames`` consecutive frames as a clip.

What ``source`` may be:

* an ``.npy`` array ``(N, T, H, W)`` or ``(N, T, H, W, C)`` (C in 1, 3, 4), uint8 or floats in [0, 1];
* an ``.npz`` with ``x_train`` (and ``y_train``, ``x_test``, ``y_test``) in that layout, as
  :func:`write_moving_mnist` writes;
* a folder of video files, any depth (hidden ones left out), in path order: GIF (and animated WebP)
  through Pillow, MP4, MOV, WebM, AVI and MKV through imageio with imageio-ffmpeg (the optional
  extra ``video``). A folder with ``train/`` and ``test/`` is split by them.

The batches keep :class:`ddpm.data.ImageData`'s guarantees, by using its index stream over the clips:
a batch is a pure function of (seed, step, rank, world_size), so a run resumes exactly from
``start_step``. Moving MNIST (:func:`moving_mnist`) follows Srivastava, Mansimov and Salakhutdinov
(2015), whose generator the standard set comes from.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence

from ddpm.checkpoints import atomic_write
from ddpm.data import Batch, DataWarning, ImageData
from ddpm.errors import UserError

PILLOW_VIDEO = frozenset({".gif", ".webp"})
FFMPEG_VIDEO = frozenset({".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v"})
VIDEO_EXTENSIONS = PILLOW_VIDEO | FFMPEG_VIDEO
MAX_BYTES = 8 * 2**30
"""The most uint8 pixel memory a load may take (as :data:`ddpm.data.MAX_BYTES`)."""


@dataclass(repr=False)
class VideoData:
    """Clips held in RAM as uint8, with labels, and the batches a training loop draws from them.

    ``videos`` is a contiguous CPU uint8 tensor ``[N, C, T, H, W]``; ``labels`` int64 ``[N]`` (-1: none);
    ``class_names[k]`` names label ``k``. The interface is :class:`ddpm.data.ImageData`'s (``describe``,
    ``num_classes``, ``batches``), so a training loop takes either.
    """

    videos: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.videos.dtype != torch.uint8 or self.videos.dim() != 5:
            raise ValueError(f"videos must be uint8 [N, C, T, H, W], got {self.videos.dtype} "
                             f"{tuple(self.videos.shape)}")
        if self.labels.shape != (len(self.videos),):
            raise ValueError(f"labels must be [{len(self.videos)}], got {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)
        # The order of clips is ImageData's (its batch_indices over N placeholders of no pixels), so
        # the two share one definition of shuffling, sharding and resuming.
        self.order = ImageData(torch.empty((len(self.videos), 0, 0, 0), dtype=torch.uint8), self.labels,
                               source=self.source or "the videos")

    def __len__(self) -> int:
        return self.videos.shape[0]

    def __repr__(self) -> str:
        return f"VideoData({self.describe()})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.videos.shape[1]

    @property
    def frames(self) -> int:
        return self.videos.shape[2]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames."""
        return self.videos.shape[3], self.videos.shape[4]

    def describe(self) -> str:
        """One line for the console, e.g. ``npz mm.npz, train split: 10,000 clips of 8 frames, 10 classes, 32x32x1``."""
        k = self.num_classes
        classes = "unlabeled" if k == 0 else f"{k} class" + ("es" if k > 1 else "")
        h, w = self.size
        line = f"{self.source}: {len(self):,} clips of {self.frames} frames, {classes}, {h}x{w}x{self.channels}"
        return line + (f" ({self.skipped:,} skipped)" if self.skipped else "")

    def to_float(self, idx: Any) -> torch.Tensor:
        """Clips ``idx`` as float32 ``[k, C, T, H, W]`` in [-1, 1] (``x / 127.5 - 1``)."""
        x = self.videos[idx]
        return (x.unsqueeze(0) if x.dim() == 4 else x).to(torch.float32) / 127.5 - 1.0

    def frame_images(self) -> ImageData:
        """Every frame as an image: :class:`ImageData` ``[N*T, C, H, W]``, each with its clip's label."""
        images = self.videos.transpose(1, 2).reshape(-1, self.channels, *self.size).contiguous()
        return ImageData(images, self.labels.repeat_interleave(self.frames), list(self.class_names),
                         f"{self.source} (frames)")

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return self.order.steps_per_epoch(batch_size, world_size)

    def batches(self, batch_size: int, seed: int, *, flip: bool = False, rank: int = 0, world_size: int = 1,
                start_step: int = 0, image_frames: int = 0) -> Iterator[Batch]:
        """Endless :class:`~ddpm.data.Batch` es for steps ``start_step``, ``start_step + 1``, ...: clips float32
        ``[B, C, T, H, W]`` in [-1, 1] (a clip's frames mirrored together where the epoch's flip bit says so,
        if ``flip``), their labels and indices.

        ``image_frames`` = k > 0 appends k independent frames to every clip (``[B, C, T + k, H, W]``), each a
        random frame of a random clip: VDM's joint training on videos and images, "concatenating random
        independent image frames to the end of each video", their temporal attention masked
        (:class:`ddpm.video_training.ImageFrames` gives the model that mask). The draws come from a
        generator seeded by (seed, step, rank, world_size), so they too resume exactly.
        """
        if image_frames < 0:
            raise UserError(f"image_frames must be >= 0, got {image_frames}")
        indices = self.order.batch_indices(batch_size, seed, rank=rank, world_size=world_size, start_step=start_step)
        for step, (idx, flips) in enumerate(indices, start_step):
            x = self.to_float(idx)
            if flip:
                x = torch.where(flips.view(-1, 1, 1, 1, 1), x.flip(-1), x)
            if image_frames:
                images = self.random_frames(len(idx), image_frames, seed, step, rank, world_size)
                x = torch.cat([x, images], dim=2)
            yield Batch(x, self.labels[idx], idx)

    def random_frames(self, batch: int, count: int, seed: int, step: int, rank: int, world_size: int) -> torch.Tensor:
        """``count`` random frames (of random clips) for each of ``batch`` clips: ``[batch, C, count, H, W]``."""
        state = np.random.SeedSequence([seed % 2**64, step, rank, world_size, 1]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state))
        clip = torch.randint(len(self), (batch, count), generator=g)
        frame = torch.randint(self.frames, (batch, count), generator=g)
        picked = self.videos[clip, :, frame]  # [batch, count, C, H, W]
        return picked.transpose(1, 2).to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- loading


def load_videos(source: str | os.PathLike[str], frames: int | None = None, size: int | tuple[int, int] | None = None,
                channels: int | None = None, split: str = "train", limit: int | None = None,
                progress: bool = False) -> VideoData:
    """Read ``source`` (an ``.npy``, an ``.npz`` or a folder of video files; see the module docstring)
    into a :class:`VideoData` of clips of ``frames`` frames (None: the source's own length, which must
    then be one) of ``size`` (a side or ``(height, width)``; None: a square of the first video's shorter
    side) with ``channels`` (1, 3, or None for the source's own). ``limit`` keeps the first clips."""
    source = os.fspath(source)
    hw = (size, size) if isinstance(size, int) else size
    if hw is not None and (len(hw) != 2 or min(hw) < 1):
        raise UserError(f"the frame size must be at least 1, got {size}")
    if frames is not None and frames < 1:
        raise UserError(f"--frames must be at least 1, got {frames}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    path = Path(source).expanduser()
    classes = 0
    if path.is_dir():
        videos, labels, what, skipped = _read_folder(path, split, progress)
    elif path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        videos, labels, what, classes = _read_array_file(path, split)
        skipped = 0
    else:
        raise UserError(f"--data {source}: {'not' if path.exists() else 'no such'} folder of videos or .npy/.npz "
                        "array (N, T, H, W[, C])")
    frames = frames or _common_length(videos, what)
    clips, clip_labels = _clips(videos, labels, frames, what)
    clips, clip_labels = clips[:limit], clip_labels[:limit]
    hw = hw or (min(clips[0].shape[1:3]),) * 2
    need = len(clips) * frames * (channels or 3) * hw[0] * hw[1]
    if need > MAX_BYTES:
        raise UserError(f"{what}: {len(clips):,} clips need {need / 2**30:.1f} GiB of RAM (the most is "
                        f"{MAX_BYTES / 2**30:.0f} GiB); use smaller frames or a limit")
    tensor = _fit_all(clips, hw, channels)
    return VideoData(tensor, torch.from_numpy(clip_labels), [str(k) for k in range(classes)], what, skipped)


def _common_length(videos: Sequence[np.ndarray], what: str) -> int:
    lengths = sorted({len(v) for v in videos})
    if len(lengths) > 1:
        raise UserError(f"{what}: the videos have {lengths[0]} to {lengths[-1]} frames; pass --frames N to cut "
                        "clips of N frames")
    return lengths[0]


def _clips(videos: Sequence[np.ndarray], labels: np.ndarray, frames: int, what: str) -> tuple[list[np.ndarray],
                                                                                            np.ndarray]:
    """Every whole window of ``frames`` consecutive frames of every video, with its video's label."""
    clips, clip_labels, short = [], [], 0
    for video, label in zip(videos, labels):
        windows = len(video) // frames
        short += windows == 0
        clips += [video[i * frames:(i + 1) * frames] for i in range(windows)]
        clip_labels += [int(label)] * windows
    if not clips:
        raise UserError(f"{what}: no video has {frames} frames (the longest has {max(len(v) for v in videos)}); "
                        "ask for fewer frames")
    if short:
        warnings.warn(f"{what}: skipped {short:,} video(s) shorter than {frames} frames", DataWarning, stacklevel=3)
    return clips, np.asarray(clip_labels, dtype=np.int64)


def _fit_all(clips: Sequence[np.ndarray], size: tuple[int, int], channels: int | None) -> torch.Tensor:
    """uint8 ``[N, C, T, H, W]`` from clips ``[T, h, w, c]`` (c in 1, 3, 4): alpha on white, the channels
    asked for (None: 1 if every clip is grey, else 3), every frame fitted to ``size``."""
    fitted = [np.stack([fit_frame(f, size) for f in clip]) for clip in clips]  # each [T, H, W, c'] c' in 1, 3
    # A GIF's frames decode as RGB even when grey: equal channels count as grey.
    grey = all(c.shape[-1] == 1 or ((c[..., :1] == c[..., 1:]).all()) for c in fitted)
    want = channels or (1 if grey else 3)
    out = np.empty((len(fitted), want, len(fitted[0]), *size), dtype=np.uint8)
    for i, clip in enumerate(fitted):
        if want == 1 and clip.shape[-1] == 3:
            exact = (clip[..., :1] == clip[..., 1:]).all()
            clip = clip[..., :1] if exact else np.asarray(  # ITU-R 601-2 luma, as PIL's 'L'
                Image.fromarray(clip.reshape(-1, size[1], 3)).convert("L")).reshape(*clip.shape[:3], 1)
        out[i] = np.broadcast_to(clip, (*clip.shape[:3], want)).transpose(3, 0, 1, 2)
    return torch.from_numpy(out)


def fit_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One uint8 frame ``[h, w, c]`` (c in 1, 3, 4) as ``[H, W, 1 or 3]``: transparency composited on
    white, resized bicubic to the least size that covers ``size`` (height, width), centre-cropped."""
    if frame.shape[-1] == 4:
        rgba = Image.fromarray(frame, "RGBA")
        frame = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    h, w, c = frame.shape
    if (h, w) == tuple(size):
        return frame
    img = Image.fromarray(frame[:, :, 0] if c == 1 else frame)
    height, width = size
    scale = max(height / h, width / w)
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    img = img.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    pixels = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return pixels.reshape(height, width, c)


def _read_array_file(path: Path, split: str) -> tuple[list[np.ndarray], np.ndarray, str, int]:
    """Videos ``[T, H, W, C]``, labels, a description and the class count from an ``.npy`` (one array)
    or an ``.npz`` (``x_<split>``, ``y_<split>``)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile, numpy and OS errors all mean "not an array file"
        raise UserError(f"--data {path}: cannot read it as {path.suffix} ({' '.join(str(error).split())[:120]})"
                        ) from error
    if isinstance(archive, np.ndarray):
        if split != "train":
            raise UserError(f"--data {path}: an .npy array has no {split} split; pass an .npz with x_{split}")
        x, y, what, classes = archive, None, f"npy {path}", 0
    else:
        with archive:
            if f"x_{split}" not in archive.files:
                raise UserError(f"--data {path}: no x_{split} array (found: {', '.join(archive.files) or 'none'}); "
                                f"expected x_{split} with videos (N, T, H, W[, C])")
            x = archive[f"x_{split}"]
            y = archive[f"y_{split}"] if f"y_{split}" in archive.files else None
            # Every split's labels count towards the classes, so that train and test agree on them.
            classes = max((int(archive[k].max()) + 1 for k in ("y_train", "y_test") if k in archive.files), default=0)
        what = f"npz {path}, {split} split"
    x = video_array(x, what)
    labels = np.full(len(x), -1, np.int64) if y is None else np.asarray(y, dtype=np.int64).reshape(len(x), -1)[:, 0]
    return list(x), labels, what, classes if y is not None else 0


def video_array(x: np.ndarray, what: str) -> np.ndarray:
    """Videos as uint8 ``[N, T, H, W, C]`` from ``(N, T, H, W)`` or ``(N, T, H, W, C)`` (C in 1, 3, 4),
    uint8 or floats in [0, 1]; anything else is a :class:`UserError` naming ``what``."""
    if x.ndim == 4:
        x = x[..., None]
    if x.ndim != 5 or x.shape[-1] not in (1, 3, 4) or 0 in x.shape:
        raise UserError(f"{what}: shape {x.shape} is not videos (N, T, H, W) or (N, T, H, W, C) with C in 1, 3, 4")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f" and np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1:
        return np.rint(x * 255).astype(np.uint8)
    raise UserError(f"{what}: dtype {x.dtype}; expected uint8 0..255 or floats in [0, 1]")


def _read_folder(folder: Path, split: str, progress: bool) -> tuple[list[np.ndarray], np.ndarray, str, int]:
    if any((folder / s).is_dir() for s in ("train", "test")):
        if not (folder / split).is_dir():
            raise UserError(f"--data {folder}: has no {split}/ sub-folder")
        folder = folder / split
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    what = f"folder {folder}"
    if not files:
        raise UserError(f"--data {folder}: no video files in it (expected {', '.join(sorted(VIDEO_EXTENSIONS))})")
    videos, bad = [], []
    for path in files:
        try:
            videos.append(read_video(path))
        except (OSError, ValueError, SyntaxError) as error:  # what Pillow and ffmpeg raise for a broken file
            bad.append(f"{path}: {' '.join(str(error).split())[:100]}")
    if not videos:
        raise UserError(f"{what}: none of its {len(files):,} videos could be read (e.g. {bad[0]})")
    if bad:
        warnings.warn(f"{what}: skipped {len(bad):,} unreadable video(s) (e.g. {bad[0]})", DataWarning, stacklevel=3)
    return videos, np.full(len(videos), -1, np.int64), what, len(bad)


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """A video file's frames as uint8 ``[T, H, W, C]`` (C = 3, or 4 for a GIF with transparency).

    GIF and animated WebP through Pillow; MP4, MOV, WebM, AVI, MKV through imageio's ffmpeg plugin (the
    extra ``video``). :class:`UserError` for a file of one frame (a still image) or frames of
    different sizes.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PILLOW_VIDEO:
        with Image.open(path) as img:
            frames = [np.asarray(f.convert("RGBA" if _transparent(f) else "RGB")) for f in ImageSequence.Iterator(img)]
    elif suffix in FFMPEG_VIDEO:
        frames = list(_ffmpeg_frames(path))
    else:
        raise UserError(f"{path}: not a video file ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    if len(frames) < 2:
        raise UserError(f"{path}: has {len(frames)} frame(s), a still image rather than a video")
    sizes = sorted({f.shape for f in frames})
    if len(sizes) > 1:
        raise UserError(f"{path}: frames of different sizes ({sizes[0][1]}x{sizes[0][0]} and "
                        f"{sizes[-1][1]}x{sizes[-1][0]}); every frame of a video must have one size")
    if frames[0].shape[-1] == 4:
        frames = [f if f.shape[-1] == 4 else np.dstack([f, np.full(f.shape[:2], 255, np.uint8)]) for f in frames]
    return np.stack(frames)


def _transparent(frame: Image.Image) -> bool:
    return frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info


def _ffmpeg_frames(path: Path) -> Iterator[np.ndarray]:
    try:
        import imageio.v3 as iio
    except ImportError as error:
        raise UserError(f"{path}: reading {path.suffix} needs imageio and imageio-ffmpeg: "
                        "pip install 'ddpm[video]'") from error
    for frame in iio.imiter(path, plugin="FFMPEG"):
        yield np.asarray(frame, dtype=np.uint8).reshape(frame.shape[0], frame.shape[1], -1)[:, :, :3]


# ----------------------------------------------------------------------------------------- Moving MNIST


@dataclass
class MovingDigits:
    """What :func:`moving_mnist` makes: uint8 ``videos`` [N, T, S, S], each digit's class ``labels``
    [N, D] (-1 where the source had none) and its top-left corner ``positions`` [N, D, T, 2] in pixels
    (row, column), with the continuous ``trajectories`` [N, D, T, 2] in [0, 1] they were cut from."""

    videos: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    trajectories: np.ndarray


def bouncing_trajectories(n: int, frames: int, step_length: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` trajectories ``[n, frames, 2]`` (row, column) in the unit square, Srivastava et al.'s:
    a uniform start, a direction θ uniform in [0, 2π) at speed ``step_length`` per frame, (sin θ, cos θ)
    for (row, column). Each frame first steps, then bounces: a coordinate past 0 or 1 is set to the
    wall and its velocity reversed (so the first frame is one step from the start)."""
    position = rng.random((n, 2))
    theta = rng.random(n) * 2 * np.pi
    velocity = np.stack([np.sin(theta), np.cos(theta)], axis=1)
    out = np.empty((n, frames, 2))
    for t in range(frames):
        position = position + velocity * step_length
        for wall in (0.0, 1.0):
            hit = position <= 0 if wall == 0 else position >= 1
            position = np.where(hit, wall, position)
            velocity = np.where(hit, -velocity, velocity)
        out[:, t] = position
    return out


def moving_mnist(digits: np.ndarray, labels: np.ndarray | None, n: int, frames: int = 20, size: int = 64,
                 num_digits: int = 2, digit_size: int | None = None, step_length: float = 0.1,
                 seed: int = 0) -> MovingDigits:
    """Moving MNIST (Srivastava et al. 2015): ``n`` videos of ``num_digits`` digits moving at constant
    velocity inside a ``size`` x ``size`` frame and bouncing off its walls.

    As their generator (``BouncingMNISTDataHandler``): each digit follows :func:`bouncing_trajectories`
    in units of the canvas (``size − digit_size`` pixels, so a speed of 0.1 is 3.6 px per frame in the
    standard 64x64 set), its top-left corner at ``int(canvas · position)``, digits drawn from the source
    in a shuffled order without repeats until all are used, overlaps composed by the maximum. The
    standard set is 64x64 with 28x28 digits; ``digit_size`` defaults to 28 scaled by ``size / 64`` (a
    32x32 set is the standard one at half the resolution), the digits resized bicubic. Seeded by ``seed``.
    """
    if digits.ndim != 3 or digits.dtype != np.uint8:
        raise UserError(f"MNIST digits must be uint8 [N, H, W], got {digits.dtype} {digits.shape}")
    digit_size = digit_size or max(1, round(28 * size / 64))
    if not 1 <= digit_size <= size or n < 1 or frames < 1 or num_digits < 1:
        raise UserError(f"need 1 <= digit size ({digit_size}) <= frame size ({size}) and n, frames, digits >= 1")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(digits)) for _ in range(math.ceil(n * num_digits / len(digits)))])
    picked = order[: n * num_digits].reshape(n, num_digits)
    trajectories = bouncing_trajectories(n * num_digits, frames, step_length, rng).reshape(n, num_digits, frames, 2)
    positions = (trajectories * (size - digit_size)).astype(np.int64)
    sprites = {i: _resized(digits[i], digit_size) for i in np.unique(picked)}
    videos = np.zeros((n, frames, size, size), np.uint8)
    for v in range(n):
        for d in range(num_digits):
            sprite = sprites[picked[v, d]]
            for t, (top, left) in enumerate(positions[v, d]):
                window = videos[v, t, top:top + digit_size, left:left + digit_size]
                np.maximum(window, sprite, out=window)
    digit_labels = np.full((n, num_digits), -1, np.int64) if labels is None else np.asarray(labels)[picked]
    return MovingDigits(videos, digit_labels.astype(np.int64), positions, trajectories)


def _resized(digit: np.ndarray, side: int) -> np.ndarray:
    if digit.shape == (side, side):
        return digit
    return np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


def write_moving_mnist(mnist: str | os.PathLike[str], out: str | os.PathLike[str], num_videos: int = 10_000,
                       num_test: int = 1_000, frames: int = 20, size: int = 64, num_digits: int = 2,
                       digit_size: int | None = None, step_length: float = 0.1, seed: int = 0) -> Path:
    """Write a Moving MNIST ``.npz`` for :func:`load_videos`: ``x_train`` [num_videos, T, S, S] from the
    MNIST training digits and ``x_test`` [num_test, ...] from the test digits (seeds ``seed`` and
    ``seed + 1``), with ``y_train``/``y_test`` (the digit's class, for one digit) and ``digits_*`` (every
    digit's class) and ``positions_*`` (top-left corners [N, D, T, 2]). ``mnist`` is an ``.npz`` with
    x_train/y_train/x_test/y_test as keras ships it."""
    path = Path(mnist)
    try:
        with np.load(path, allow_pickle=False) as f:
            source = {key: f[key] for key in ("x_train", "y_train", "x_test", "y_test") if key in f.files}
    except (OSError, ValueError) as error:
        raise UserError(f"--mnist {path}: cannot read it as an MNIST .npz ({error})") from error
    if "x_train" not in source:
        raise UserError(f"--mnist {path}: no x_train array (an .npz with x_train, y_train, x_test, y_test)")
    arrays: dict[str, np.ndarray] = {}
    for split, count, offset in (("train", num_videos, 0), ("test", num_test, 1)):
        if count == 0 or f"x_{split}" not in source:
            continue
        made = moving_mnist(source[f"x_{split}"], source.get(f"y_{split}"), count, frames, size, num_digits,
                            digit_size, step_length, seed + offset)
        arrays[f"x_{split}"], arrays[f"digits_{split}"] = made.videos, made.labels
        arrays[f"positions_{split}"] = made.positions.astype(np.int16)
        if num_digits == 1 and f"y_{split}" in source:
            arrays[f"y_{split}"] = made.labels[:, 0]
    with atomic_write(out, durable=False) as f:
        np.savez_compressed(f, **arrays)
    return Path(out)
