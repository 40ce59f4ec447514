"""Which source a run's ``data`` section reads: images in memory (:class:`ddpm.data.ImageData`), a
folder streamed from disk (:class:`ddpm.streaming.FolderStream`) or WebDataset shards
(:class:`ddpm.shards.ShardStream`).

``data.stream`` decides: ``false`` holds the images in memory (refusing more than
:data:`ddpm.data.MAX_BYTES`), ``true`` streams a folder, ``auto`` (the default) streams a folder whose
pixels would take more than :func:`ddpm.data.memory_budget` and holds any other in memory. Shards always
stream; ``.npz`` files and named data sets (MNIST, CIFAR-10, ...) are always held in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ddpm.data import ImageData, is_dataset_name, list_folder, load_images, make_fit, memory_budget
from ddpm.errors import UserError
from ddpm.shards import ShardStream, is_shard_source, open_shards
from ddpm.streaming import FolderStream

#: What a training run may read its images from.
TrainingImages = ImageData | FolderStream | ShardStream


def open_training_images(data: Any, size: tuple[int, int], channels: int, *, need_captions: bool = False,
                         progress: bool = False) -> TrainingImages:
    """The images a run's ``data`` section (a :class:`ddpm.config.DataConfig`) names, at ``size``
    ``(height, width)`` with ``channels``, from the source ``data.stream`` picks (see the module docstring).
    ``need_captions``: a text-to-image run (a shard stream reads its captions once)."""
    source = os.fspath(data.source)
    limit = data.limit or None
    fit = make_fit(source, tuple(size), channels, data.split, limit, progress)
    if is_shard_source(source):
        if data.split != "train":
            raise UserError(f"--data {source}: shards have no {data.split} split; pass the {data.split} shards")
        if limit is not None:
            raise UserError(f"--data {source}: --data.limit does not apply to shards; pass fewer shards")
        if data.stream is False:
            raise UserError(f"--data {source}: WebDataset shards are always streamed; drop --data.stream false")
        return open_shards(source, fit, caption_column=data.caption_column, need_captions=need_captions,
                           workers=data.workers, window=data.shard_shuffle, progress=progress)
    path = Path(source).expanduser()
    if is_dataset_name(source) or not path.is_dir():
        if data.stream:
            raise UserError(f"--data {source}: --data.stream true reads folders of images and WebDataset shards; "
                            "an .npz or a named data set is held in memory (drop --data.stream)")
        return load_images(source, tuple(size), channels, split=data.split, root=data.root or None, limit=limit,
                           progress=progress, caption_column=data.caption_column)
    listing = list_folder(path, data.split, data.caption_column, limit)
    if data.stream or (data.stream is None and fit.pixel_bytes(len(listing.files), channels) > memory_budget()):
        return FolderStream(listing, fit, data.workers)
    return load_images(source, tuple(size), channels, split=data.split, root=data.root or None, limit=limit,
                       progress=progress, caption_column=data.caption_column)
