"""Latent diffusion (Rombach et al. 2022): the U-Net and the Gaussian diffusion of DDPM, unchanged,
run on ``z * scaling_factor`` where ``z ~ q(z | x)`` is a trained :class:`AutoencoderKL`'s posterior.

This module is the glue: finding the autoencoder a run points at (:func:`load_autoencoder`),
checking that the U-Net fits its latents (:func:`pixel_size`), the training set encoded once
(:class:`LatentData`), and going back to pixels (:func:`decode_latents`).
:func:`ddpm.generate.generate` decodes with it, so every picture of a latent model is in pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.cache import ArrayCache, fingerprint, module_fingerprint
from ddpm.data import Batch, ImageData, batch_order, to_float
from ddpm.errors import DataWarning, UserError
from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.io import read_format
from ddpm.runtime import derive_seed

#: Where ``ddpm train-autoencoder`` writes the finished model inside its run directory.
AUTOENCODER_DIR = "autoencoder"


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The autoencoder at ``path``: a ``ddpm train-autoencoder`` run (its ``autoencoder/``), a
    diffusers ``AutoencoderKL`` directory or a pipeline's (``vae/``), or one saved with
    :meth:`AutoencoderKL.save_pretrained`. Frozen and in eval mode; :class:`UserError` if absent."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"autoencoder {path}: no such directory (a 'ddpm train-autoencoder' run or a diffusers "
                        "AutoencoderKL directory)")
    if (path / AUTOENCODER_DIR).is_dir():
        path = path / AUTOENCODER_DIR
    elif (path / "checkpoints").is_dir():
        raise UserError(f"autoencoder {path}: the run has not finished (no {AUTOENCODER_DIR}/ yet); "
                        "complete it with 'ddpm train-autoencoder --out PATH --resume'")
    if read_format(path) == AutoencoderKL.FORMAT:
        model = AutoencoderKL.from_pretrained(path)
    else:
        model = AutoencoderKL.from_diffusers(path)
    return model.to(device).eval().requires_grad_(False)


def pixel_size(sample_shape: tuple[int, ...], autoencoder: AutoencoderKLConfig, source: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the images a network's latents ``sample_shape`` ``(c, h, w)`` decode to
    (``h * f, w * f``), after checking that they are the autoencoder's latents; :class:`UserError`
    naming both otherwise."""
    f = autoencoder.downsampling_factor
    channels, h, w = sample_shape
    if channels != autoencoder.latent_channels:
        raise UserError(f"model.in_channels {channels} does not match the {autoencoder.latent_channels} "
                        f"latent channels of the autoencoder {source}; set --model.in_channels "
                        f"{autoencoder.latent_channels}")
    height, width = autoencoder.image_size
    if (h * f, w * f) != (height, width):
        fix = (f"set --model.image_size {height // f} (--model.sample_size for a conditional U-Net)"
               if height == width else f"set --model.sample_size {height // f},{width // f}")
        raise UserError(f"the model's {h}x{w} latents are {h * f}x{w * f} images through the autoencoder {source} "
                        f"(f={f}), which was trained on {height}x{width}; {fix}")
    return h * f, w * f


@torch.no_grad()
def decode_latents(autoencoder: AutoencoderKL, z: Tensor, batch_size: int = 256) -> Tensor:
    """Images ``[N, C, H, W]`` (float32, unclamped) for diffusion's latents ``z`` ``[N, c, h, w]``:
    ``decode(z / scaling_factor)``, in batches of ``batch_size``."""
    device = next(autoencoder.parameters()).device
    scale = autoencoder.config.scaling_factor
    return torch.cat([autoencoder.decode(part.float().to(device) / scale).float()
                      for part in z.split(batch_size)])


@torch.no_grad()
def encode_images(autoencoder: AutoencoderKL, x: Tensor, batch_size: int = 256) -> Tensor:
    """Diffusion's latents ``[N, c, h, w]`` of images ``x`` ``[N, C, H, W]`` in [-1, 1]: the posterior mean
    (the mode) ``times scaling_factor``, the inverse of :func:`decode_latents`, in batches of ``batch_size``."""
    device = next(autoencoder.parameters()).device
    scale = autoencoder.config.scaling_factor
    return torch.cat([autoencoder.encode(part.float().to(device)).mode().float() * scale
                      for part in x.split(batch_size)])


class LatentData:
    """A training set encoded once: the posterior mean and standard deviation of every image (and
    of its mirror image, with ``flip``), from which each batch draws ``z = mean + std * eps``, scaled.

    Why once: the ``mnist-f4`` encoder is several times slower per image than the ``mnist-latent``
    U-Net's training step (bench/RESULTS.md), so encoding on the fly would make every step several
    times slower; encoding the set once costs a few epochs' worth of steps, and then nothing. The batches are those
    of :meth:`ImageData.batches` (same order and flips) in latent form, and ``eps`` comes from a
    generator seeded by ``(seed, rank, step)``, so a resumed run draws the same latents without
    saving anything.

    In-memory images are encoded into RAM. A streamed set (:class:`~ddpm.streaming.FolderStream`,
    :class:`~ddpm.shards.ShardStream`) is encoded once into ``cache`` (a folder; see :mod:`ddpm.cache`:
    keyed by the data's and the autoencoder's fingerprints), memory-mapped from there, and reused by any
    later run with the same data and autoencoder. Its batches follow :func:`ddpm.data.batch_order` over
    the samples that could be read (``rows``), so a latent run on shards is as exactly resumable as one
    on a folder.
    """

    def __init__(self, data: Any, autoencoder: AutoencoderKL, flip: bool, batch_size: int = 256,
                 progress: bool = False, cache: str | Path | None = None) -> None:
        self.data = data
        self.scale = autoencoder.config.scaling_factor
        if isinstance(data, ImageData):
            self.mean, self.std = _encode_in_memory(data, autoencoder, flip, batch_size, progress)
            self.labels, self.rows = data.labels, torch.arange(len(data))
            return
        if cache is None:
            raise ValueError("a streamed data set's latents need a cache folder")
        store = ArrayCache(cache, "latents", fingerprint(data.fingerprint(), module_fingerprint(autoencoder),
                                                       autoencoder.config.to_dict(), flip))
        if not store.exists:
            _encode_to_disk(data, autoencoder, flip, batch_size, progress, store)
        arrays, _ = store.load()
        self.mean, self.std, self.labels = arrays["mean"], arrays["std"], arrays["labels"]
        self.rows, self.cache = arrays["rows"], store.path

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[2:])

    def describe(self) -> str:
        c, h, w = self.shape
        return f"{self.data.describe()}, encoded to {h}x{w}x{c} latents (x {self.scale:.4g})"

    def batches(self, batch_size: int, seed: int, *, flip: bool = False, rank: int = 0, world_size: int = 1,
                start_step: int = 0) -> Iterator[Batch]:
        """Endless :class:`~ddpm.data.Batch` es of ``z * scaling_factor`` for steps ``start_step``, ..."""
        if flip and self.mean.shape[1] == 1:
            raise ValueError("flip=True, but the mirror images were not encoded (LatentData(..., flip=False))")
        indices = batch_order(len(self.rows), batch_size, seed, rank=rank, world_size=world_size,
                              start_step=start_step, source=self.data.source)
        for step, (positions, flips) in enumerate(indices, start_step):
            idx = self.rows[positions]
            side = (flips & flip).long()
            mean, std = self.mean[idx, side], self.std[idx, side]
            g = torch.Generator().manual_seed(derive_seed(seed, rank, 3, step))
            yield Batch((mean + std * torch.randn(mean.shape, generator=g)) * self.scale, self.labels[idx], idx)


def _posteriors(autoencoder: AutoencoderKL, x: Tensor, flip: bool) -> tuple[Tensor, Tensor]:
    """The posterior mean and std ``[B, 1 or 2, c, h, w]`` of images ``x`` (and of their mirror images)."""
    posteriors = [autoencoder.encode(v) for v in ((x, x.flip(-1)) if flip else (x,))]
    return (torch.stack([p.mean.float().cpu() for p in posteriors], 1),
            torch.stack([p.std.float().cpu() for p in posteriors], 1))


@torch.no_grad()
def _encode_in_memory(data: ImageData, autoencoder: AutoencoderKL, flip: bool, batch_size: int,
                      progress: bool) -> tuple[Tensor, Tensor]:
    device = next(autoencoder.parameters()).device
    means, stds = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="encoding the training set", unit="batch",
                      disable=not progress):
        mean, std = _posteriors(autoencoder, data.to_float(slice(start, start + batch_size)).to(device), flip)
        means.append(mean)
        stds.append(std)
    return torch.cat(means), torch.cat(stds)  # [N, 1 or 2, c, h, w]


@torch.no_grad()
def _encode_to_disk(data: Any, autoencoder: AutoencoderKL, flip: bool, batch_size: int, progress: bool,
                    store: ArrayCache) -> None:
    """Encode every readable sample of a streamed set into ``store``: ``mean``, ``std`` at row ``idx``,
    ``labels``, and ``rows``, the indices that could be read (the others are named in one warning)."""
    device = next(autoencoder.parameters()).device
    f = autoencoder.config.downsampling_factor
    h, w = data.size
    shape = (len(data), 2 if flip else 1, autoencoder.config.latent_channels, h // f, w // f)
    bad: list[tuple[str, object, str]] = []
    with store.writing() as out:
        mean, std = out.array("mean", shape, np.float32), out.array("std", shape, np.float32)
        labels, read = np.full(len(data), -1, np.int64), np.zeros(len(data), bool)
        with tqdm(total=len(data), desc="encoding the training set", unit="img", disable=not progress) as bar:
            for raw in data.in_order(batch_size):
                bad += raw.bad
                if len(raw.idx):
                    m, s = _posteriors(autoencoder, to_float(raw.images).to(device), flip)
                    mean[raw.idx.numpy()], std[raw.idx.numpy()] = m.numpy(), s.numpy()
                    labels[raw.idx.numpy()], read[raw.idx.numpy()] = raw.labels.numpy(), True
                bar.update(len(raw.idx) + sum(what == "image" for what, _, _ in raw.bad))
        if not read.any():
            raise UserError(f"{data.source}: none of its images could be read (e.g. {bad[0][1]}: {bad[0][2]})"
                            if bad else f"{data.source}: no images")
        out.array("labels", labels.shape, np.int64)[:] = labels
        rows = np.flatnonzero(read)
        out.array("rows", rows.shape, np.int64)[:] = rows
        out.info = {"source": data.source, "skipped": len(bad)}
    if bad:
        warnings.warn(f"{data.source}: {len(bad):,} unreadable image(s) or shard(s) left out of the latent cache "
                      f"(e.g. {bad[0][1]}: {bad[0][2]})", DataWarning, stacklevel=3)
