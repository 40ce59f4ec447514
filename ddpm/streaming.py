"""Images streamed from disk: decoded on the fly by DataLoader workers instead of held in RAM.

A data set that does not fit in memory (``--data.stream auto`` decides by
:func:`ddpm.data.memory_budget`; ``true`` forces it) is read as it is trained on. Two sources stream:

* :class:`FolderStream`, a folder of images (labels from sub-folders, captions from a
  ``metadata.jsonl``, as :func:`ddpm.data.load_images` reads them). A folder has random access, so
  its batches are those of the in-memory :class:`ddpm.data.ImageData`: the same
  :func:`ddpm.data.batch_order`, the same decoding, bit for bit the same tensors for any number of
  workers; a resumed run needs only its step, and DDP ranks read disjoint images.
* :class:`ddpm.shards.ShardStream`, WebDataset tar shards, read in order (see there for what a
  stream can promise).

Both hand the training loop an iterator of :class:`ddpm.data.Batch` (:class:`StreamedBatches`).
The workers send uint8 :class:`RawBatch` es; the float conversion and the flips happen in the
training process, exactly as :meth:`ImageData.batches` does them. An image that cannot be decoded is
replaced by another image of its batch (so every step keeps its shape), reported once as a
:class:`~ddpm.errors.DataWarning`, and counted: :attr:`StreamedBatches.skipped` (distinct images),
which the trainer writes to every metrics line as ``data_skipped``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ddpm.data import (
    GREY_MODES,
    Batch,
    Fit,
    FolderListing,
    batch_order,
    first_size,
    flipped,
    labels_phrase,
    one_line,
    open_image,
    prepare_image,
    steps_per_epoch,
    to_float,
)
from ddpm.errors import DataWarning, UserError

#: Batches each DataLoader worker decodes ahead of the training step.
PREFETCH = 2


class RawBatch(NamedTuple):
    """A batch as a worker hands it over: uint8 ``images`` ``[B, C, H, W]``, int64 ``labels``,
    ``idx`` and bool ``flips`` ``[B]``; ``bad``: ``(what, id, message)`` of each image or shard that
    could not be read (``what`` is ``"image"`` or ``"shard"``); ``upscaled``: how many were smaller than
    the size; ``state``: where a shard stream stands after it (None for a folder); ``fatal``: a
    message that ends the run (nothing readable is left)."""

    images: torch.Tensor
    labels: torch.Tensor
    idx: torch.Tensor
    flips: torch.Tensor
    bad: list[tuple[str, Any, str]]
    upscaled: int = 0
    state: Any = None
    fatal: str | None = None


def decode(read: Callable[[], Image.Image], fit: Fit) -> tuple[np.ndarray, bool]:
    """One image read and fitted: uint8 ``[C, H, W]`` and whether it was upscaled; the decoder's
    exception if it cannot be read (see :func:`ddpm.data.prepare_all` for why any exception)."""
    pixels, upscaled = prepare_image(read(), fit)
    return pixels.transpose(2, 0, 1), upscaled


def image_from_bytes(data: bytes) -> Image.Image:
    """An image file's bytes decoded fully (truncation errors now, not later)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return img


def assemble(decoded: Sequence[tuple[np.ndarray, bool] | Exception], labels: Sequence[int], idx: Sequence[int],
             flips: Sequence[bool], fit: Fit, ids: Sequence[Any] | None = None) -> RawBatch:
    """A :class:`RawBatch` of decoded images, each failure replaced by the next good image of the batch
    (cyclically) with its label and index; ``fatal`` if none was good."""
    good = [i for i, d in enumerate(decoded) if not isinstance(d, Exception)]
    bad = [("image", (ids or idx)[i], one_line(d)) for i, d in enumerate(decoded) if isinstance(d, Exception)]
    height, width = fit.size
    if not good:
        empty = torch.empty(0, fit.channels, height, width, dtype=torch.uint8)
        none = torch.empty(0, dtype=torch.int64)
        return RawBatch(empty, none, none, none.bool(), bad, fatal=f"no image of a batch of {len(decoded)} could be "
                        f"read (e.g. {bad[0][1]}: {bad[0][2]})" if bad else "an empty batch")
    readable = set(good)
    take = [i if i in readable else next((g for g in good if g > i), good[0]) for i in range(len(decoded))]
    images = np.ascontiguousarray(np.stack([decoded[i][0] for i in take]))  # [B, C, H, W] in that order
    return RawBatch(torch.from_numpy(images), torch.tensor([labels[i] for i in take], dtype=torch.int64),
                    torch.tensor([idx[i] for i in take], dtype=torch.int64),
                    torch.tensor([bool(flips[i]) for i in take]), bad, sum(decoded[i][1] for i in good))


class StreamedBatches:
    """The training loop's iterator over a stream: :class:`~ddpm.data.Batch` es made from the workers'
    :class:`RawBatch` es (float conversion and flips here, as :meth:`ImageData.batches` does them).

    It counts what could not be read (:attr:`skipped`, distinct images and shards), warns once, and
    remembers a shard stream's position after each of the last steps (:meth:`state_at`), which a
    checkpoint saves."""

    def __init__(self, make: Callable[[], Iterable[RawBatch]], what: str, flip: bool, start_step: int,
                 state: Any = None, update: Callable[[Any, Any], Any] | None = None, keep: int = 1024) -> None:
        self._make, self._it = make, None
        self.what, self.flip = what, flip
        self.step, self._update, self._keep = start_step, update, keep
        self._states = {start_step: state}
        self.bad_images: set[Any] = set()
        self.bad_shards: set[Any] = set()
        self._warned: set[str] = set()

    @property
    def skipped(self) -> int:
        """Images (and shards) that could not be read so far, each counted once."""
        return len(self.bad_images) + len(self.bad_shards)

    def __iter__(self) -> StreamedBatches:
        return self

    def __next__(self) -> Batch:
        if self._it is None:  # the workers start with the first batch, after the run is set up
            self._it = iter(self._make())
        raw = next(self._it)
        self._note(raw)
        if self._update is not None:
            state = self._update(self._states[self.step], raw.state)
            self._states[self.step + 1] = state
            self._states.pop(self.step + 1 - self._keep, None)
        self.step += 1
        return Batch(flipped(to_float(raw.images), raw.flips, self.flip), raw.labels, raw.idx)

    def state_at(self, step: int) -> Any:
        """Where the stream stood after ``step`` steps (one of the last few), for a checkpoint."""
        return self._states.get(step)

    def _note(self, raw: RawBatch) -> None:
        if raw.fatal is not None:
            raise UserError(f"{self.what}: {raw.fatal}")
        for what, key, message in raw.bad:
            (self.bad_shards if what == "shard" else self.bad_images).add(key)
            if what not in self._warned:
                self._warned.add(what)
                cut = "cut short or unreadable shard(s)" if what == "shard" else "unreadable image(s)"
                warnings.warn(f"{self.what}: skipping {cut} (e.g. {key}: {message}); the run goes on and counts "
                              "them in metrics.jsonl (data_skipped)", DataWarning, stacklevel=2)
        if raw.upscaled and "upscaled" not in self._warned:
            self._warned.add("upscaled")
            warnings.warn(f"{self.what}: upscaling images smaller than {raw.images.shape[2]}x{raw.images.shape[3]} "
                          "(bicubic)", DataWarning, stacklevel=2)


def loader(dataset: Any, workers: int, **kwargs: Any) -> DataLoader:
    """A DataLoader over ``dataset`` that never touches the global random generator (its base seed comes
    from a generator of its own), so that a run's dropout draws do not depend on its data source; its
    workers ignore Ctrl-C, which the training process answers with a checkpoint (a worker that died of
    it would fail the next batch first)."""
    extra = {"prefetch_factor": PREFETCH, "persistent_workers": False, "worker_init_fn": ignore_interrupts} \
        if workers else {}
    return DataLoader(dataset, num_workers=workers, generator=torch.Generator().manual_seed(0),
                      collate_fn=kwargs.pop("collate_fn", as_is), **extra, **kwargs)


def ignore_interrupts(worker_id: int) -> None:
    """A DataLoader worker's start: SIGINT ignored (the terminal sends it to the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def as_is(item: Any) -> Any:
    """The identity, as a collate function (a module-level function pickles for spawned workers)."""
    return item


# ---------------------------------------------------------------------------- folders


class _FolderImages(Dataset):
    """The decoding of a folder's files: item ``[(i, flip), ...]`` -> a :class:`RawBatch`."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], fit: Fit) -> None:
        self.files, self.labels, self.fit = files, labels, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, batch: list[tuple[int, bool]]) -> RawBatch:
        decoded = []
        for i, _ in batch:
            try:
                decoded.append(decode(lambda i=i: open_image(self.files[i]), self.fit))
            except Exception as error:  # see ddpm.data.prepare_all
                decoded.append(error)
        idx = [i for i, _ in batch]
        return assemble(decoded, [self.labels[i] for i in idx], idx, [f for _, f in batch], self.fit,
                        ids=[self.files[i] for i in idx])


class _Indices:
    """A DataLoader sampler (with ``batch_size=None``) whose every item is one batch's ``[(i, flip), ...]``."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for idx, flips in self.batches:
            yield list(zip(idx.tolist(), flips.tolist()))


class FittedStream:
    """What every streamed training set derives from its ``fit`` and ``class_names``: the number of
    classes, the channels and the size its images are made to (:class:`FolderStream`,
    :class:`ddpm.shards.ShardStream`)."""

    fit: Fit
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.fit.channels

    @property
    def size(self) -> tuple[int, int]:
        return self.fit.size


class FolderStream(FittedStream):
    """A folder of images read from disk as it is trained on (see the module docstring).

    ``listing`` is what :func:`ddpm.data.list_folder` found, ``fit`` the size and channels (None: the first
    image's own), ``workers`` the DataLoader processes that decode (0: the training process itself).
    """

    def __init__(self, listing: FolderListing, fit: Fit, workers: int = 0) -> None:
        if fit.size is None:
            fit = fit.native(*first_size(listing.files))
        if fit.channels is None:
            fit = Fit(fit.size, _first_channels(listing.files), fit.limit, fit.progress)
        self.listing, self.fit, self.workers = listing, fit, workers
        self.labels = torch.tensor(listing.labels, dtype=torch.int64)
        self.class_names, self.captions, self.source = listing.class_names, listing.captions, listing.what

    def __len__(self) -> int:
        return len(self.listing.files)

    def describe(self) -> str:
        """One line for the console, as :meth:`ImageData.describe`, saying that it streams."""
        h, w = self.size
        return (f"{self.source}: {len(self):,} images, {labels_phrase(self.num_classes, self.captions)}, "
                f"{h}x{w}x{self.channels}, streamed from disk by {self.workers or 'no'} worker(s)")

    def fingerprint(self) -> str:
        """A key of what the images are: the files with their sizes and modification times, the labels,
        captions, size and channels (a cache made from other images is never reused)."""
        digest = hashlib.sha256(json.dumps([self.fit.size, self.fit.channels, self.listing.labels,
                                            self.captions]).encode())
        for path in self.listing.files:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return steps_per_epoch(len(self), batch_size, world_size, self.source)

    def batches(self, batch_size: int, seed: int, *, flip: bool = False, rank: int = 0, world_size: int = 1,
                start_step: int = 0) -> StreamedBatches:
        """The batches of :meth:`ImageData.batches` for the same arguments, decoded as they are drawn."""
        order = batch_order(len(self), batch_size, seed, rank=rank, world_size=world_size, start_step=start_step,
                            source=self.source)
        images = _FolderImages(self.listing.files, self.listing.labels, self.fit)
        return StreamedBatches(lambda: loader(images, self.workers, sampler=_Indices(order), batch_size=None),
                               self.source, flip, start_step)

    def in_order(self, batch_size: int) -> Iterator[RawBatch]:
        """Every image once, in index order, in batches of up to ``batch_size`` (to fill a cache); an
        image that cannot be read is left out and named in ``bad``."""
        chunks = [(torch.arange(s, min(s + batch_size, len(self))), torch.zeros(batch_size, dtype=torch.bool))
                  for s in range(0, len(self), batch_size)]
        images = _FolderImages(self.listing.files, self.listing.labels, self.fit)
        for raw in loader(images, self.workers, sampler=_Indices(chunks), batch_size=None):
            yield _without_replacements(raw)


def _without_replacements(raw: RawBatch) -> RawBatch:
    """A batch of :meth:`FolderStream.in_order` with the stand-ins for unreadable images dropped."""
    if not raw.bad:
        return raw
    # The indices of a chunk are distinct, so a repeated one is a stand-in (with the same pixels).
    _, first = np.unique(raw.idx.numpy(), return_index=True)
    keep = torch.zeros(len(raw.idx), dtype=torch.bool)
    keep[torch.from_numpy(first)] = True
    return raw._replace(images=raw.images[keep], labels=raw.labels[keep], idx=raw.idx[keep], flips=raw.flips[keep])


def _first_channels(files: Sequence[str]) -> int:
    """1 if the first readable file is grey, else 3 (a streamed folder cannot look at every image first)."""
    for path in files:
        try:
            with Image.open(path) as img:
                return 1 if img.mode in GREY_MODES else 3
        except Exception:  # the stream reports unreadable files; here only a mode is wanted
            continue
    return 3
