"""Images for training and evaluation: folders, ``.npz`` files, torchvision names, sklearn digits.

:func:`load_images` turns what a user passes as ``--data`` into an :class:`ImageData`: every
image decoded once, resized and center-cropped to ``image_size`` (a side, or ``(height, width)``),
and held in RAM as uint8 ``[N, C, H, W]``, with class labels and, for a folder with a
``metadata.jsonl``, captions. Batches are scaled to ``[-1, 1]`` as ``x / 127.5 - 1`` only when drawn.

What ``source`` may be, tried in this order:

* a data set name from :data:`DATASET_NAMES` (case, ``-`` and ``_`` ignored: ``CIFAR-10`` works).
  A name always means the data set; write ``./mnist`` for a folder that happens to be called so.
  ``digits`` is scikit-learn's 8x8 digits (no download); the others come from torchvision,
  downloaded on first use into ``root``, else ``$DDPM_DATA_DIR``, else ``~/.cache/ddpm/datasets``.
* a folder of images (see :func:`_scan_folder` for the layout rules).
* an ``.npz`` file with ``x_train`` (and optionally ``y_train``, ``x_test``, ``y_test``), like the
  one ``keras.datasets.mnist`` ships (see :func:`_images_nhwc` for the accepted arrays).

Every image, whatever its source, goes through the same two steps (:func:`prepare_image`):

1. Channels. 16-bit grey is scaled to 8 bits (``v / 257``, rounded); anything with transparency is
   composited on white (a viewer's rendering; plain conversion would show whatever colour the
   transparent pixels happen to store); then PIL converts to ``'L'`` (ITU-R 601-2 luma) or
   ``'RGB'``. ``channels=None`` keeps the source's own count: 1 if every image is grey, else 3.
2. Size. The image is resized with PIL's bicubic filter (antialiased when shrinking) to the least
   size that covers ``height x width``, then the centre ``height x width`` is cropped. Arrays that already
   have the right size and channels skip PIL entirely, so their pixels are kept bit for bit.

Problems in the user's data raise :class:`~ddpm.errors.UserError`; things worth knowing that do not
stop the run (unreadable files skipped, small images upscaled) are issued once per load as a
:class:`DataWarning`, one line each, which the CLI can print as it likes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ddpm.errors import DataWarning, UserError

__all__ = [
    "DATASET_NAMES",
    "Batch",
    "DataWarning",
    "ImageData",
    "MAX_BYTES",
    "default_root",
    "load_images",
]

# torchvision class and how its constructor names the split: "train" takes train=True/False,
# "split" takes split="train"/"test". Extra keyword arguments ride along.
_TORCHVISION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mnist": ("MNIST", "train", {}),
    "fashion-mnist": ("FashionMNIST", "train", {}),
    "cifar10": ("CIFAR10", "train", {}),
    "cifar100": ("CIFAR100", "train", {}),
    "svhn": ("SVHN", "split", {}),
    "stl10": ("STL10", "split", {}),
    # No targets: CelebA's are 40 attributes, not a class.
    "celeba": ("CelebA", "split", {"target_type": []}),
}

DATASET_NAMES: tuple[str, ...] = ("digits", *_TORCHVISION)
"""Every name :func:`load_images` accepts as a data set (rather than a path)."""

SPLITS = ("train", "test")

# scikit-learn's digits has no official split: the first 1,500 train, the last 297 test.
DIGITS_TRAIN = 1500

MAX_BYTES = 8 * 2**30
"""The most uint8 pixel memory a load may take; more raises a UserError (no lazy loading yet)."""

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .dib .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga".split()
)

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
GREY_MODES = frozenset({"1", "L", "LA", "La", "F"}) | _SIXTEEN_BIT_MODES
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_MODE_BY_CHANNELS = {1: "L", 3: "RGB"}

# Decoding and resizing release the GIL inside PIL, so a few threads pay off even on small machines.
_WORKERS = min(4, os.cpu_count() or 1)
_CHUNK = 64


def default_root() -> Path:
    """Where torchvision data sets go: ``$DDPM_DATA_DIR``, else ``~/.cache/ddpm/datasets``."""
    return Path(os.environ.get("DDPM_DATA_DIR") or "~/.cache/ddpm/datasets").expanduser()


class Batch(NamedTuple):
    """One training batch: images float32 ``[B, C, H, W]`` in [-1, 1] (or an autoencoder's scaled
    latents), class labels int64 ``[B]`` (-1: none) and the images' indices int64 ``[B]`` into the
    data set (which the captions of a captioned set are looked up by)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor


@dataclass(repr=False)
class ImageData:
    """Images held in RAM as uint8, with labels, and the batches a training loop draws from them.

    ``images`` is a contiguous CPU uint8 tensor ``[N, C, H, W]``; ``labels`` int64 ``[N]``, -1 for
    an unlabeled image; ``class_names[k]`` names label ``k`` (empty when there are no labels);
    ``captions`` one text per image, or None for a set without captions. ``source`` says where the
    images came from, ``skipped`` how many files could not be read.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    skipped: int = 0
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be [{len(self.images)}], got {tuple(self.labels.shape)}")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return f"ImageData({self.describe()})"

    @property
    def num_classes(self) -> int:
        """How many classes a conditional model needs: 0 when unlabeled."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        return self.images.shape[2], self.images.shape[3]

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The side of square images, else ``(height, width)`` (diffusers' ``sample_size``)."""
        h, w = self.size
        return h if h == w else (h, w)

    def describe(self) -> str:
        """One line for the console, e.g. ``folder /x: 1,234 images, 10 classes, 32x32x3 (3
        skipped)``."""
        h, w = self.size
        line = (f"{self.source}: {len(self):,} images, {labels_phrase(self.num_classes, self.captions)}, "
                f"{h}x{w}x{self.channels}")
        return line + (f" ({self.skipped:,} skipped)" if self.skipped else "")

    def to_float(self, idx: Any) -> torch.Tensor:
        """Images ``idx`` (slice, index tensor or list; an int gives one) as float32
        ``[k, C, H, W]`` in [-1, 1]: ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly."""
        x = self.images[idx]
        return to_float(x.unsqueeze(0) if x.dim() == 3 else x)

    # Batches for training: see batch_order, which this and every streamed source share.

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Full batches each rank draws per pass over the data (the remainder is dropped)."""
        return steps_per_epoch(len(self), batch_size, world_size, self.source)

    def batches(self, batch_size: int, seed: int, *, flip: bool = False, rank: int = 0,
                world_size: int = 1, start_step: int = 0) -> Iterator[Batch]:
        """Endless :class:`Batch` es for steps ``start_step``, ``start_step + 1``, ...: float32
        ``[B, C, H, W]`` in [-1, 1] (mirrored left-right where the epoch's flip bit says so, if
        ``flip``), int64 ``[B]`` labels and the indices. Each epoch's shuffle is computed once."""
        for idx, flips in self.batch_indices(batch_size, seed, rank=rank, world_size=world_size,
                                             start_step=start_step):
            yield Batch(flipped(self.to_float(idx), flips, flip), self.labels[idx], idx)

    def batch_indices(self, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                      start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """What :meth:`batches` draws, as indices: endless ``(idx, flips)``, int64 ``[B]`` image
        indices and bool ``[B]`` flip bits (for data held in another form, e.g. encoded latents)."""
        return batch_order(len(self), batch_size, seed, rank=rank, world_size=world_size,
                           start_step=start_step, source=self.source)


# A batch is a pure function of (seed, step, rank, world_size): epoch e = step // steps_per_epoch
# shuffles all N images with a generator seeded from (seed, e), and draws one flip bit per image
# from the same generator. Rank r owns positions r, r + W, r + 2W, ... of that shuffle (the last
# N mod W dropped, so ranks hold equal, disjoint shards), and its step j reads its shard's j-th run
# of batch_size; a partial last batch is dropped so that every step has the same shape on every
# rank. Resuming at step s therefore needs nothing saved but s. In-memory images, a streamed
# folder and a latent cache all draw their batches so.


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, source: str = "the data") -> int:
    """Full batches each of ``world_size`` ranks draws per pass over ``n`` images."""
    if batch_size < 1 or n // world_size < batch_size:
        raise UserError(
            f"--batch-size {batch_size} x {world_size} process(es) does not fit the "
            f"{n:,} images of {source}; use a --batch-size from 1 to {n // world_size:,}"
        )
    return n // world_size // batch_size


def batch_order(n: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1, start_step: int = 0,
                source: str = "the data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(idx, flips)`` of rank ``rank``'s steps ``start_step``, ...: int64 ``[B]``
    indices into ``n`` images and a bool ``[B]`` flip bit for each (see the comment above)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    steps = steps_per_epoch(n, batch_size, world_size, source)
    epoch, first = divmod(start_step, steps)
    while True:
        order, flips = epoch_shuffle(n, seed, epoch)
        for j in range(first, steps):
            idx = order[rank + world_size * (j * batch_size + torch.arange(batch_size))]
            yield idx, flips[idx]
        epoch, first = epoch + 1, 0


def labels_phrase(num_classes: int, captions: Sequence[str] | None) -> str:
    """What a data set's console line says of its labels: ``unlabeled``, ``10 classes``, ``captioned``
    or ``10 classes, captioned``."""
    k = num_classes
    classes = "unlabeled" if k == 0 else f"{k} class" + ("es" if k > 1 else "")
    if captions is not None:
        classes = "captioned" if k == 0 else f"{classes}, captioned"
    return classes


def epoch_shuffle(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Epoch ``epoch``'s permutation of ``n`` images and a flip bit per image."""
    # SeedSequence mixes (seed, epoch) into well-spread, collision-free seeds; seed + epoch
    # would make run 1's epoch 0 equal run 0's epoch 1.
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0]
    g = torch.Generator().manual_seed(int(state))
    order = torch.randperm(n, generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return order, flips


def flipped(x: torch.Tensor, flips: torch.Tensor, flip: bool) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` mirrored left-right where ``flips`` says so (if ``flip``)."""
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x) if flip else x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [-1, 1]: ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly."""
    return images.to(torch.float32) / 127.5 - 1.0


def load_images(source: str | os.PathLike[str], image_size: int | tuple[int, int] | None,
                channels: int | None = None, split: str = "train", root: str | None = None,
                limit: int | None = None, progress: bool = False, caption_column: str = "text") -> ImageData:
    """Read ``source`` (a data set name, a folder of images or an ``.npz``) into an
    :class:`ImageData` of ``image_size`` images (a side, or ``(height, width)``) with ``channels``
    (1, 3, or None for the source's own). ``image_size=None`` keeps the source's own size: a square
    of the shorter side of its (first) image. A folder with a ``metadata.jsonl`` brings captions
    from its ``caption_column`` (see :func:`_read_metadata`).

    ``split`` is ``"train"`` or ``"test"``; ``root`` is where torchvision downloads go (see
    :func:`default_root`); ``limit`` keeps only the first ``limit`` images (for folders, in the
    order of :func:`_scan_folder`); ``progress`` shows a progress bar while decoding.
    """
    source = os.fspath(source)
    fit = make_fit(source, image_size, channels, split, limit, progress)
    name = _dataset_name(source)
    if name == "digits":
        return _load_digits(split, fit)
    if name is not None:
        return _load_torchvision(name, split, Path(root).expanduser() if root else default_root(),
                                 fit)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, split, fit, caption_column)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path, split, fit)
    accepted = (f"a folder of images, an .npz file with x_train/y_train, or one of "
                f"{', '.join(DATASET_NAMES)}")
    if path.exists():
        raise UserError(f"--data {source}: not a folder or an .npz file (unpack archives first); "
                        f"pass {accepted}")
    raise UserError(f"--data {source}: no such file or folder, and not a data set name; "
                    f"pass {accepted}")


def make_fit(source: str, image_size: int | tuple[int, int] | None, channels: int | None = None,
             split: str = "train", limit: int | None = None, progress: bool = False) -> Fit:
    """The checked :class:`Fit` of a load (see :func:`load_images` for the arguments)."""
    if not source:
        raise UserError("--data is empty; pass a folder of images, an .npz file or a data set name")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise UserError(f"--image-size must be at least 1, got {image_size}")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return Fit(None if size is None else (int(size[0]), int(size[1])), channels, limit, progress)


def is_dataset_name(source: str) -> bool:
    """Whether ``source`` names a data set of :data:`DATASET_NAMES` (rather than a path)."""
    return _dataset_name(source) is not None


def memory_budget() -> int:
    """The most pixel bytes an in-memory load should take here: :data:`MAX_BYTES`, or half the memory
    the system reports available if that is less (``--data.stream auto`` streams beyond it)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return MAX_BYTES if available is None else min(MAX_BYTES, available // 2)


def _dataset_name(source: str) -> str | None:
    """The canonical data set name ``source`` spells, ignoring case, ``-`` and ``_``; else None."""
    def key(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    return next((n for n in DATASET_NAMES if key(n) == key(source)), None)


@dataclass(frozen=True)
class Fit:
    """What every loader is asked for: the output size, channels, limit and progress bar."""

    size: tuple[int, int] | None  # (height, width); None: the source's own, fixed by native()
    channels: int | None
    limit: int | None
    progress: bool

    def native(self, width: int, height: int) -> Fit:
        """This fit, with the source's own size (a square of the shorter side) if none was asked for."""
        side = min(width, height)
        return self if self.size is not None else dataclasses.replace(self, size=(side, side))

    def pixel_bytes(self, n: int, channels: int) -> int:
        """The uint8 memory of ``n`` images of this size with ``channels``."""
        return n * channels * self.size[0] * self.size[1]

    def check_memory(self, n: int, channels: int, what: str) -> None:
        """Refuse a load whose pixels would take more than :data:`MAX_BYTES`."""
        need = self.pixel_bytes(n, channels)
        if need > MAX_BYTES:
            raise UserError(
                f"{what}: {n:,} images at {self.size[0]}x{self.size[1]}x{channels} need "
                f"{need / 2**30:.1f} GiB of RAM (the most is {MAX_BYTES / 2**30:.1f} GiB); "
                f"use a lower --image-size or a --limit, or stream the images from disk (--data.stream true: "
                f"folders and WebDataset shards)"
            )


def prepare_image(img: Image.Image, fit: Fit) -> tuple[np.ndarray, bool]:
    """One decoded image as uint8 ``[S, S, C]`` (see the module docstring for the steps), and
    whether it had to be upscaled. With ``fit.channels`` None, C is 1 for grey modes, else 3."""
    grey = img.mode in GREY_MODES
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips to 255 instead of scaling; 'I' is how older Pillows (and
        # some TIFFs) hand over 16-bit data, so it is scaled too.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    mode = _MODE_BY_CHANNELS[fit.channels or (1 if grey else 3)]
    if img.mode != mode:
        img = img.convert(mode)

    w, h = img.size
    height, width = fit.size
    scale = max(height / h, width / w)  # the least scale at which the image covers the crop
    # max() guards the rounding of the longer side against falling below the crop.
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    if resized != img.size:
        img = img.resize(resized, Image.Resampling.BICUBIC)
    if resized != (width, height):
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels.reshape(height, width, -1), scale > 1


def prepare_all(items: Sequence[Any], decode: Callable[[Any], Image.Image], fit: Fit,
                 what: str) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and :func:`prepare_image` every item on a few threads.

    Returns the images as uint8 ``[M, C, S, S]``, in order, and a bool mask over ``items`` of the
    M that decoded. Items that ``decode`` raised on are skipped with one warning (a UserError if
    that is all of them); upscaled images get one warning too.
    """
    # Room for 3 channels when the count is only known at the end; cut to 1 if all were grey.
    out = np.empty((len(items), fit.channels or 3, *fit.size), np.uint8)

    def work(start: int) -> list[Exception | tuple[bool, bool]]:
        """Items start.. of one chunk into ``out``: (is colour, was upscaled) or the error."""
        done: list[Exception | tuple[bool, bool]] = []
        for i in range(start, min(start + _CHUNK, len(items))):
            try:
                img = decode(items[i])
            # PIL reports a bad file with whatever its decoder hit (OSError, SyntaxError,
            # EOFError, ValueError, zlib.error, ...); each means "this file", never our bug.
            except Exception as error:
                done.append(error)
                continue
            pixels, upscaled = prepare_image(img, fit)
            # A grey image into 3 channels: broadcasting copies L into R, G, B as PIL would.
            out[i] = pixels.transpose(2, 0, 1)
            done.append((pixels.shape[2] == 3, upscaled))
        return done

    results: list[Exception | tuple[bool, bool]] = []
    # Chunks, because a future per small image costs about as much as the image itself.
    with ThreadPoolExecutor(_WORKERS) as pool, tqdm(
        total=len(items), desc=what, unit="img", disable=not fit.progress
    ) as bar:
        for chunk in pool.map(work, range(0, len(items), _CHUNK)):
            results += chunk
            bar.update(len(chunk))
    ok = np.array([not isinstance(r, Exception) for r in results], bool)
    bad = [(item, r) for item, r in zip(items, results) if isinstance(r, Exception)]
    good = [r for r in results if not isinstance(r, Exception)]
    if bad:
        item, error = bad[0]
        example = f"e.g. {item}: {one_line(error)}"
        if not good:
            raise UserError(f"{what}: none of its {len(items):,} images could be read ({example})")
        warnings.warn(f"{what}: skipped {len(bad):,} unreadable image(s) ({example})",
                      DataWarning, stacklevel=2)
        out = out[ok]
    upscaled = sum(grew for _, grew in good)
    if upscaled:
        warnings.warn(f"{what}: upscaled {upscaled:,} image(s) smaller than "
                      f"{fit.size[0]}x{fit.size[1]} (bicubic)", DataWarning, stacklevel=2)
    images = out[:, : fit.channels or (3 if any(colour for colour, _ in good) else 1)]
    return torch.from_numpy(np.ascontiguousarray(images)), ok


# ---------------------------------------------------------------------------------------------
# Folders


def _scan_folder(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """The image files under ``folder`` (any depth, by extension; hidden files and folders left
    out), their labels and the class names.

    Labels come from the first-level sub-folders when every image lies under one and at least two
    hold images: class k is the k-th such sub-folder in sorted order. Then the files are listed
    round-robin over the classes (first file of each class, second of each, ...) so that a
    ``--limit`` keeps a balanced subset. Otherwise everything is unlabeled (-1), in path order.
    """
    found: list[tuple[tuple[str, ...], str]] = []  # (path parts below folder, path)
    others = 0
    # Strings, not pathlib: this loop meets every file of data sets with 100,000s of them.
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        below = os.path.relpath(dirpath, folder)
        parts = () if below == "." else tuple(below.split(os.sep))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(((*parts, name), os.path.join(dirpath, name)))
            else:
                others += 1
    if not found:
        raise UserError(f"--data {folder}: no image files in it ({others:,} other file(s)); "
                        f"expected .png, .jpg, .bmp, .gif, .webp, .tif, ... (archives unpacked)")
    found.sort()
    files = [path for _, path in found]
    tops = [parts for parts, _ in found]
    class_names = sorted({parts[0] for parts in tops if len(parts) > 1})
    if len(class_names) < 2 or any(len(parts) == 1 for parts in tops):
        return files, [-1] * len(files), []
    label_of = {name: k for k, name in enumerate(class_names)}
    labels = [label_of[parts[0]] for parts in tops]
    seen = dict.fromkeys(range(len(class_names)), 0)
    rank = []
    for label in labels:
        rank.append(seen[label])
        seen[label] += 1
    order = sorted(range(len(files)), key=lambda i: (rank[i], labels[i]))
    return [files[i] for i in order], [labels[i] for i in order], class_names


def open_image(path: str) -> Image.Image:
    """Decode an image file fully (a lazy open would defer truncation errors to later)."""
    with Image.open(path) as img:
        img.load()
    return img


@dataclass
class FolderListing:
    """What a folder of images holds before anything is decoded: its image files in training order,
    their labels (-1: none), the class names and, with a ``metadata.jsonl``, the captions."""

    folder: Path
    files: list[str]
    labels: list[int]
    class_names: list[str]
    captions: list[str] | None = None

    @property
    def what(self) -> str:
        return f"folder {self.folder}"


def list_folder(folder: Path, split: str = "train", caption_column: str = "text",
                limit: int | None = None) -> FolderListing:
    """The files of ``folder`` (its ``split`` sub-folder when it has train/ and test/), by
    :func:`_read_metadata` when a ``metadata.jsonl`` lists them, else by :func:`_scan_folder`;
    the first ``limit`` only when given."""
    # A folder with train/ and test/ sub-folders (as in the CIFAR-10 tree) is split by them.
    if any((folder / s).is_dir() for s in SPLITS):
        if not (folder / split).is_dir():
            raise UserError(f"--data {folder}: has no {split}/ sub-folder; add one, or pass "
                            f"the folder of {split} images itself")
        folder = folder / split
    elif split != "train":
        raise UserError(f"--data {folder}: a plain folder has no {split} split; pass a folder "
                        f"with train/ and {split}/ sub-folders, or the {split} images' folder")
    captions = None
    if (folder / METADATA).is_file():
        files, captions = _read_metadata(folder, caption_column)
        labels, class_names = [-1] * len(files), []
    else:
        files, labels, class_names = _scan_folder(folder)
    if captions is not None:
        captions = captions[:limit]
    return FolderListing(folder, files[:limit], labels[:limit], class_names, captions)


def _load_folder(folder: Path, split: str, fit: Fit, caption_column: str = "text") -> ImageData:
    listing = list_folder(folder, split, caption_column, fit.limit)
    files, what = listing.files, listing.what
    if fit.size is None and files:
        fit = fit.native(*first_size(files))
    fit.check_memory(len(files), fit.channels or 3, what)
    images, ok = prepare_all(files, open_image, fit, what)
    kept = torch.tensor(listing.labels, dtype=torch.int64)[torch.from_numpy(ok)]
    captions = listing.captions
    if captions is not None:
        captions = [c for c, good in zip(captions, ok) if good]
    return ImageData(images, kept, listing.class_names, what, skipped=int((~ok).sum()), captions=captions)


METADATA = "metadata.jsonl"
"""The captions file of a folder, in the Hugging Face imagefolder layout that diffusers' text-to-image
example reads: one JSON object a line with ``file_name`` (relative to the folder) and a caption."""


def _read_metadata(folder: Path, column: str) -> tuple[list[str], list[str]]:
    """The image files ``folder/metadata.jsonl`` lists, in its order, and their captions (the
    ``column`` field; a missing or null one is the empty caption). :class:`UserError` naming the
    line for a line that is not a JSON object with a ``file_name``, a file not in the folder, or a
    caption column that is absent or empty on every line."""
    path = folder / METADATA
    root = folder.resolve()
    files, captions, seen = [], [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{n}: not a JSON line ({error})") from error
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{path}:{n}: expected a JSON object with a \"file_name\", got {line[:80]!r}")
        file = (folder / row["file_name"]).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise UserError(f"{path}:{n}: {row['file_name']!r} is not a file in {folder}")
        text = row.get(column)
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{n}: the caption {column!r} is {type(text).__name__}, not text")
        seen.update(row)
        files.append(str(file))
        captions.append(text or "")
    if not files:
        raise UserError(f"{path}: lists no images")
    if column not in seen:
        raise UserError(f"{path}: no {column!r} caption column (its fields: {', '.join(sorted(seen))}); "
                        f"pass --data.caption_column NAME")
    if not any(captions):
        raise UserError(f"{path}: the caption column {column!r} is empty on every line")
    return files, captions


def first_size(files: Sequence[str]) -> tuple[int, int]:
    """(width, height) of the first file that opens as an image (the last one if none does)."""
    for path in files:
        try:
            with Image.open(path) as img:
                return img.size
        except Exception:  # the loader reports unreadable files; here only a size is wanted
            continue
    return (1, 1)


def one_line(error: BaseException) -> str:
    """An exception as a short single line for a message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------
# Arrays: .npz files, torchvision data sets, scikit-learn digits


def _images_nhwc(x: np.ndarray, key: str) -> np.ndarray:
    """Images from an array as uint8 ``[N, H, W, C]``, C in 1, 3, 4.

    Accepted: ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in 1, 3, 4. When both
    the second and the last axis could be C (e.g. ``[N, 3, 32, 3]``), the layout whose other two
    axes are closer to square wins; a tie goes to ``[N, H, W, C]``. Values: uint8 as they are;
    other integer types when within 0..255; floats within [0, 1] are scaled by 255 and rounded,
    floats within [0, 255] (with a value above 1) are rounded. Anything else is a UserError.
    """
    def aspect(h: int, w: int) -> float:
        return max(h, w) / max(1, min(h, w))

    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        _, a, h, c = x.shape
        hwc = c in (1, 3, 4)
        chw = a in (1, 3, 4)
        if chw and (not hwc or aspect(h, c) < aspect(a, h)):
            x = x.transpose(0, 2, 3, 1)
        elif not hwc:
            raise UserError(f"{key} has shape {x.shape}: no axis of size 1, 3 or 4 for the "
                            f"channels; expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
    else:
        raise UserError(f"{key} has shape {x.shape}: expected [N, H, W], [N, H, W, C] or "
                        f"[N, C, H, W]")
    if len(x) == 0:
        raise UserError(f"{key} holds no images")
    return _as_uint8(x, key)


def _as_uint8(x: np.ndarray, key: str) -> np.ndarray:
    """The checks and scaling of :func:`_images_nhwc`'s values."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "biu":
        low, high = int(x.min()), int(x.max())
        if low >= 0 and high <= 255:
            return x.astype(np.uint8)
    elif x.dtype.kind == "f":
        low, high = float(x.min()), float(x.max())  # NaN fails both tests below
        if 0 <= low and high <= 1:
            return np.rint(x * 255).astype(np.uint8)
        if 0 <= low and high <= 255:
            return np.rint(x).astype(np.uint8)
    else:
        raise UserError(f"{key} has dtype {x.dtype}; expected uint8 (or floats in [0, 1])")
    raise UserError(f"{key} ({x.dtype}) has values in [{low}, {high}]; expected uint8 0..255, or "
                    f"floats in [0, 1] or [0, 255]")


def _labels(y: Any, n: int | None, key: str) -> np.ndarray:
    """Class labels as int64 ``[n]`` (an ``[n, 1]`` column is accepted), checked; any count
    when ``n`` is None."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{key} has shape {y.shape} and dtype {y.dtype}; expected a list of "
                        f"integer class labels, one per image")
    if n is not None and len(y) != n:
        raise UserError(f"{key} has {len(y):,} labels but there are {n:,} images")
    if len(y) and y.min() < 0:
        raise UserError(f"{key} has negative labels; expected classes 0, 1, 2, ...")
    return y.astype(np.int64)


def _from_arrays(x: np.ndarray, labels: np.ndarray | None, class_names: list[str], fit: Fit,
                 what: str) -> ImageData:
    """:class:`ImageData` from uint8 ``[N, H, W, C]`` images (C in 1, 3, 4) and labels or None."""
    x, labels = x[: fit.limit], None if labels is None else labels[: fit.limit]
    n, h, w, c = x.shape
    fit = fit.native(w, h)
    channels = fit.channels or (1 if c == 1 else 3)
    fit.check_memory(n, channels, what)
    if (h, w) == fit.size and (c == channels or (c, channels) == (1, 3)):
        # Nothing for PIL to do: keep the pixels exactly (L -> RGB is a copy either way).
        images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        images = images.expand(-1, channels, -1, -1).contiguous()
    else:
        def decode(i: int) -> Image.Image:
            return Image.fromarray(x[i, :, :, 0] if c == 1 else x[i])  # PIL wants [H, W] for L

        images, _ = prepare_all(range(n), decode, fit, what)
    y = torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.from_numpy(labels)
    return ImageData(images, y, class_names, what)


def _class_names(*labels: np.ndarray | None) -> list[str]:
    """Names "0", "1", ... for labels without names, enough for every split given."""
    k = max((int(y.max()) + 1 for y in labels if y is not None and len(y)), default=0)
    return [str(i) for i in range(k)]


def _load_npz(path: Path, split: str, fit: Fit) -> ImageData:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile, numpy and OS errors all mean "not an .npz"
        raise UserError(f"--data {path}: cannot read it as .npz ({one_line(error)})") from error
    with archive:
        keys = set(archive.files)
        x_key, y_key = f"x_{split}", f"y_{split}"
        if x_key not in keys:
            found = ", ".join(sorted(keys)) or "none"
            raise UserError(f"--data {path}: no {x_key} array (found: {found}); expected "
                            f"{x_key} with images [N, H, W(, C)] and optionally {y_key}")
        try:
            x = _images_nhwc(archive[x_key], f"{path}: {x_key}")
            # Every split's labels count towards the classes, so train and test agree on them.
            labels = {s: _labels(archive[f"y_{s}"], len(x) if s == split else None,
                                 f"{path}: y_{s}")
                      for s in SPLITS if f"y_{s}" in keys}
        except ValueError as error:  # np.load refuses object arrays without allow_pickle
            raise UserError(f"--data {path}: {one_line(error)}") from error
    names = _class_names(*labels.values()) if split in labels else []
    return _from_arrays(x, labels.get(split), names, fit, f"npz {path}, {split} split")


def _load_digits(split: str, fit: Fit) -> ImageData:
    """scikit-learn's 1,797 8x8 digits, grey levels 0..16 scaled to 0..255 as round(v * 255 / 16).
    The split is fixed: the first 1,500 images train, the last 297 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise UserError("--data digits needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'ddpm[digits]')") from error
    digits = load_digits()
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    # v * 255 / 16 is a half-integer only at v = 8 (127.5); floor(+0.5) rounds it up to 128.
    x = np.floor(digits.images[part] * 255 / 16 + 0.5).astype(np.uint8)[..., None]
    y = digits.target[part].astype(np.int64)
    return _from_arrays(x, y, [str(i) for i in range(10)], fit,
                        f"digits (scikit-learn), {split} split")


def _load_torchvision(name: str, split: str, root: Path, fit: Fit) -> ImageData:
    """A torchvision data set, downloaded into ``root / name`` unless it is there already."""
    try:
        import torchvision
    except ImportError as error:
        raise UserError(f"--data {name} needs torchvision: pip install torchvision (or pass a "
                        f"local folder of images or an .npz)") from error
    class_name, split_style, extra = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, class_name)
    where = root / name
    split_arg = {"train": split == "train"} if split_style == "train" else {"split": split}
    try:
        # Without download first: a data set already on disk then never touches the network
        # (nor re-checks its archive) when it is loaded again.
        dataset = cls(str(where), **split_arg, **extra, download=False)
    except RuntimeError:
        try:
            where.mkdir(parents=True, exist_ok=True)
            dataset = cls(str(where), **split_arg, **extra, download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            url = getattr(cls, "url", None) or next(iter(getattr(cls, "mirrors", [])), None)
            raise UserError(
                f"--data {name}: downloading it into {where} failed"
                + (f" from {url}" if isinstance(url, str) else "")
                + f" ({one_line(error)}); check the network or pass a local folder of images "
                f"or an .npz as --data"
            ) from error
    what = f"{name} (torchvision), {split} split"
    class_names = [str(c) for c in getattr(dataset, "classes", [])]
    data = getattr(dataset, "data", None)
    if data is None:
        # Files on disk (CelebA): decode them through the data set, a few at a time in threads.
        indices = range(len(dataset))[: fit.limit]
        if fit.size is None and len(indices):
            fit = fit.native(*dataset[0][0].size)
        fit.check_memory(len(indices), fit.channels or 3, what)
        images, ok = prepare_all(indices, lambda i: dataset[i][0], fit, what)
        unlabeled = torch.full((len(images),), -1, dtype=torch.int64)
        return ImageData(images, unlabeled, [], what, skipped=int((~ok).sum()))
    x = _images_nhwc(np.asarray(data), f"{what}: data")
    targets = next((t for t in (getattr(dataset, a, None) for a in ("targets", "labels"))
                    if t is not None), None)
    labels = None if targets is None else _labels(np.asarray(targets), len(x), f"{what}: targets")
    if labels is not None and not class_names:
        class_names = _class_names(labels)
    return _from_arrays(x, labels, class_names, fit, what)
