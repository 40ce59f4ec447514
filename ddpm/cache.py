"""Arrays computed once from a training set and kept on disk, memory-mapped: a streamed set's latents
(:class:`ddpm.latent.LatentData`) and its captions' tokens and embeddings (:class:`ddpm.conditioning.Captions`).

A cache is a folder ``KIND-KEY`` of ``.npy`` files (and an ``info.json``), where the key is a hash of
everything the arrays were computed from: the data's fingerprint (its files with their sizes and
modification times, or its shards), the model's weights, the options. Another data set or another
autoencoder gets another key, so a cache is never reused for what it was not made from. It is written
into a temporary folder and renamed when complete: a run killed while writing leaves nothing that a
later run would take for a cache (the leftover ``.tmp`` folder is removed by the next writer), and
processes writing the same cache at once (the ranks of a DDP run) all end with the one that was
renamed first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Bumped when what a cache holds changes, so that old caches are not read as new ones.
VERSION = 1


def fingerprint(*parts: Any) -> str:
    """A hex key of JSON-able ``parts``."""
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def module_fingerprint(module: nn.Module) -> str:
    """A hex key of a module's weights (every state-dict entry's name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class ArrayCache:
    """The cache ``root/KIND-KEY``: :attr:`exists`, :meth:`load` its arrays memory-mapped, or
    :meth:`writing` them."""

    def __init__(self, root: str | Path, kind: str, key: str) -> None:
        self.root, self.path = Path(root), Path(root) / f"{kind}-{key[:24]}"

    @property
    def exists(self) -> bool:
        return (self.path / "info.json").is_file()

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The arrays as CPU tensors over the files (copy-on-write maps: pages are read as they are
        touched, and nothing is ever written back), and the info."""
        arrays = {p.stem: torch.from_numpy(np.load(p, mmap_mode="c")) for p in sorted(self.path.glob("*.npy"))}
        return arrays, json.loads((self.path / "info.json").read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def writing(self) -> Iterator[CacheWriter]:
        """A :class:`CacheWriter` into a temporary folder, renamed to :attr:`path` on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f".{self.path.name}.*.tmp"):
            if _older_than(leftover, 3600):  # another process may be writing a recent one
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.path.name}.", suffix=".tmp"))
        writer = CacheWriter(tmp)
        try:
            yield writer
            writer.finish()
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not self.exists:  # not a concurrent writer's finished copy: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return os.stat(path).st_mtime < time.time() - seconds
    except OSError:
        return False


class CacheWriter:
    """Arrays being written: :meth:`array` makes one (a writable memory map), :attr:`info` is saved too."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.info, self._arrays = folder, {}, []

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        a = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self._arrays.append(a)
        return a

    def finish(self) -> None:
        for a in self._arrays:
            a.flush()
        (self.folder / "info.json").write_text(json.dumps(self.info), encoding="utf-8")
