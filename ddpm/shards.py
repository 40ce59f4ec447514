"""WebDataset shards: tar files of samples (``KEY.png`` or ``KEY.jpg`` with ``KEY.cls``, ``KEY.txt``,
``KEY.json``), read as a stream from local paths or URLs, and written from a folder (:func:`pack_folder`).

The tar format, the grouping of members into samples and the opening of URLs (``http(s)://`` through
``curl``, ``file://``, ``pipe:``) are the ``webdataset`` package's (``pip install 'ddpm[shards]'``);
this module adds the order, the decoding and the bookkeeping a training run needs.

``--data`` names shards as a brace pattern (``train-{000000..000099}.tar``; several joined by ``::``),
a folder holding ``*.tar`` files, or a ``shardindex.json`` (local or a URL). That index, in the
format of webdataset's ``wids`` (``shardlist`` of ``url`` and ``nsamples``, URLs relative to it), is
what :func:`pack_folder` writes beside the shards with ddpm's extra fields (class names, whether
there are captions); without one the shards are read once at the start to count their samples.

The order of a stream, a pure function of (seed, rank, world size, streams): epoch ``e`` permutes the
shards with a generator seeded by (seed, e) and rank ``r`` of ``W`` takes its ``r``-th, ``(r + W)``-th, ...
(``S mod W`` of them left out that epoch, so the ranks' shards are disjoint). Chaining a rank's
epochs gives its endless sequence of shards; with ``M = max(1, data.workers)`` streams, stream ``m``
reads shards ``m, m + M, m + 2M, ...`` of that sequence, each shard's samples permuted within windows
of ``data.shard_shuffle`` consecutive samples (a generator per window), and cuts its readable samples
into batches; step ``j`` takes stream ``j mod M``'s next batch (DataLoader worker ``w`` serves the
streams ``≡ w``). What it promises, and what is tested:

* a seed gives the same batches, step by step, for the same world size and ``data.workers``;
* a resumed run sees exactly the batches of an uninterrupted one: a checkpoint saves each stream's
  place (the shard it is in and how far), and a stream starts again there (reading, not decoding,
  the part of the current window already used). With another world size or worker count the run goes
  on from the epoch it was in, with a warning, as a new arrangement;
* ranks read disjoint shards in every epoch.

Unlike a folder, a stream cannot promise the in-memory order (that needs random access).

``Batch.idx`` of a shard sample is its place in the data set: the samples of the shards before it (in
the order ``--data`` lists them) plus its place in its shard, so captions and cached latents are
looked up by it as for a folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ddpm.data import IMAGE_EXTENSIONS, Fit, epoch_shuffle, labels_phrase, list_folder, one_line, open_image
from ddpm.errors import DataWarning, UserError
from ddpm.runtime import derive_seed
from ddpm.streaming import FittedStream, RawBatch, StreamedBatches, assemble, decode, image_from_bytes, loader

try:  # optional: only shards need it
    import webdataset as wds
except ImportError:  # pragma: no cover - the message says what to install
    wds = None

INDEX = "shardindex.json"
"""The index :func:`pack_folder` writes beside its shards (webdataset's ``wids`` shard index format)."""

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")
_IMAGE_MEMBERS = tuple(e[1:] for e in sorted(IMAGE_EXTENSIONS))
_CURL_EXITS = {6: "host not found", 7: "connection refused", 22: "the server answered with an HTTP error",
               28: "timed out", 35: "TLS handshake failed", 56: "the connection broke"}


def require_webdataset() -> None:
    if wds is None:
        raise UserError("WebDataset shards need the webdataset package: pip install webdataset "
                        "(or pip install 'ddpm[shards]')")


def is_shard_source(source: str) -> bool:
    """Whether ``--data source`` names shards (a URL, a ``.tar`` pattern, a shard index, a folder of
    ``.tar`` files) rather than images."""
    if _URL.match(source) or "::" in source or re.search(r"\.tar(\.gz)?$|\.tar(\.gz)?\}?$", source):
        return True
    if source.endswith(".json") and (source.startswith(("http", "file:")) or Path(source).is_file()):
        return True
    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    if (path / INDEX).is_file():
        return True
    # A folder of shards holds .tar files and nothing that could be images: no image files, no sub-folders.
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    return any(e.name.endswith(".tar") for e in entries) and not any(
        e.is_dir() or os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in entries)


# ---------------------------------------------------------------------------- reading one shard


class _Watched:
    """A shard's byte stream that remembers whether it ended before the tar's end-of-archive blocks:
    Python's tarfile ends quietly at a header cut short, which would hide a truncated shard."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.total, self.tail, self.eof = stream, 0, b"", False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if n is None or n < 0 or len(data) < n:  # a buffered read is short only at the end
            self.eof = True
        self.total += len(data)
        self.tail = (self.tail + data)[-512:]
        return data

    @property
    def truncated(self) -> bool:
        return self.eof and (self.total % 512 != 0 or self.tail != bytes(512))

    def close(self) -> None:
        self.stream.close()


def _explain(error: BaseException) -> str:
    """A shard reader's exception in a line (curl's exit codes in words)."""
    found = re.search(r"'curl'.*exit (\d+)", str(error))
    if found:
        code = int(found.group(1))
        return f"curl exit {code}: {_CURL_EXITS.get(code, 'see man curl')}"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    # webdataset appends the stream and the URL to an exception's args: the first is the message.
    first = error.args[0] if error.args and isinstance(error.args[0], str) else one_line(error)
    return f"{type(error).__name__}: {one_line(RuntimeError(first))}".split(" @ ")[0]


def shard_samples(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The samples of one shard (dicts of member bytes by extension, ``__key__``), in tar order; what
    went wrong (cannot open, cut short, a bad member) is appended to ``errors`` as a line, and the
    samples read until then are kept."""
    require_webdataset()

    def handler(error: BaseException) -> bool:
        errors.append(_explain(error))
        return True

    try:
        stream = _Watched(wds.gopen(url))
    except Exception as error:  # gopen raises what its scheme's opener does
        errors.append(_explain(error))
        return
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
        if stream.truncated and not errors:
            errors.append(f"cut short after {stream.total:,} bytes")
    finally:
        try:
            stream.close()
        except Exception as error:  # curl's exit status comes with the close, and explains the rest
            errors.insert(0, _explain(error))


def decode_sample(sample: dict[str, Any], fit: Fit, num_classes: int) -> tuple[np.ndarray, bool, int]:
    """A sample's image fitted (uint8 ``[C, H, W]``), whether it was upscaled, and its label (``.cls``;
    -1 without one); an exception naming what is wrong otherwise."""
    member = next((m for m in _IMAGE_MEMBERS if m in sample), None)
    if member is None:
        found = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise ValueError(f"no image member (it has {found})")
    label = -1
    if "cls" in sample:
        label = int(sample["cls"].decode().strip())
        if num_classes and not 0 <= label < num_classes:
            raise ValueError(f"label {label} is not one of the {num_classes} classes")
    pixels, upscaled = decode(lambda: image_from_bytes(sample[member]), fit)
    return pixels, upscaled, label


def caption_of(sample: dict[str, Any], column: str) -> str:
    """A sample's caption: its ``.txt``, else the ``column`` field of its ``.json``; else empty."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace").strip()
    if "json" in sample:
        try:
            text = json.loads(sample["json"]).get(column)
        except (ValueError, AttributeError):
            return ""
        return text if isinstance(text, str) else ""
    return ""


# ---------------------------------------------------------------------------- the stream's order


@functools.lru_cache(maxsize=8)
def _epoch_shards(n: int, seed: int, epoch: int) -> list[int]:
    return epoch_shuffle(n, seed, epoch)[0].tolist()


def rank_shard(i: int, n: int, seed: int, rank: int, world_size: int) -> int:
    """The ``i``-th shard of rank ``rank``'s endless sequence (see the module docstring)."""
    epoch, j = divmod(i, n // world_size)
    return _epoch_shards(n, seed, epoch)[rank + world_size * j]


def windows(samples: Iterable[dict[str, Any]], window: int, seed: int, start: int
            ) -> Iterator[tuple[int, int, dict[str, Any], bool]]:
    """A shard's samples in its shuffled order from place ``start`` on: ``(place, index in the shard,
    sample, flip bit)``, each run of ``window`` consecutive samples permuted by a generator seeded by
    ``(seed, run)``. Runs wholly before ``start`` are read and dropped."""
    samples = iter(samples)
    for run in itertools.count():
        chunk = list(itertools.islice(samples, max(window, 1)))
        if not chunk:
            return
        base = run * max(window, 1)
        if base + len(chunk) <= start:
            continue
        g = torch.Generator().manual_seed(derive_seed(seed, run))
        order = torch.randperm(len(chunk), generator=g).tolist() if window > 1 else [0]
        flips = (torch.rand(len(chunk), generator=g) < 0.5).tolist()
        for place, o in enumerate(order, base):
            if place >= start:
                yield place, base + o, chunk[o], flips[o]


class _StreamBatches(IterableDataset):
    """The batches of one rank's streams; DataLoader worker ``w`` serves stream ``(start_step + w) mod M``."""

    def __init__(self, data: ShardStream, batch_size: int, seed: int, rank: int, world_size: int, start_step: int,
                 states: list[list[int]]) -> None:
        self.data, self.batch_size, self.seed, self.rank, self.world_size = data, batch_size, seed, rank, world_size
        self.start_step, self.states = start_step, states

    def __iter__(self) -> Iterator[RawBatch]:
        info = get_worker_info()
        m = (self.start_step + (info.id if info else 0)) % len(self.states)
        return self.stream(m, *self.states[m])

    def stream(self, m: int, k: int, place: int) -> Iterator[RawBatch]:
        """Stream ``m``'s batches from its ``k``-th shard, at ``place``, on."""
        data, streams = self.data, len(self.states)
        pending: list[Any] = []  # (decoded or error, label, idx, flip, name)
        bad: list[tuple[str, Any, str]] = []
        dry = 0  # shards in a row without a readable sample
        while True:
            i = m + streams * k
            s = rank_shard(i, len(data.urls), self.seed, self.rank, self.world_size)
            errors: list[str] = []
            got = False
            samples = shard_samples(data.urls[s], errors)
            seed = derive_seed(self.seed, self.rank, i)
            for at, index, sample, flip in windows(samples, data.window, seed, place):
                item = _decoded(sample, data, s, index)
                got = got or not isinstance(item[0], Exception)
                pending.append((*item, flip))
                if sum(not isinstance(p[0], Exception) for p in pending) == self.batch_size:
                    batch = _batch(pending, data.fit, bad, state=(m, k, at + 1))
                    pending, bad = [], []
                    yield batch
            bad += [("shard", data.urls[s], e) for e in errors]
            dry = 0 if got else dry + 1
            if dry > len(data.urls):
                yield _batch([], data.fit, bad, fatal=f"no shard could be read in {dry} tries (e.g. "
                             f"{bad[-1][1] if bad else data.urls[s]}: {bad[-1][2] if bad else 'no samples'})")
                return
            k, place = k + 1, 0


def _decoded(sample: dict[str, Any], data: ShardStream, shard: int, index: int) -> tuple[Any, int, int, str]:
    """A sample decoded for a batch: (pixels and upscale flag, or the error; label; idx; name)."""
    name = f"{data.urls[shard]}#{sample.get('__key__', index)}"
    idx = data.offsets[shard] + index
    try:
        if index >= data.counts[shard]:
            raise ValueError(f"more samples than the {data.counts[shard]} the shard index counts")
        pixels, upscaled, label = decode_sample(sample, data.fit, data.num_classes)
    except Exception as error:  # see ddpm.data.prepare_all: any decoder error means "this sample"
        return error, -1, idx, name
    return (pixels, upscaled), label, idx, name


def _batch(pending: list[Any], fit: Fit, bad: list[tuple[str, Any, str]], state: Any = None,
           fatal: str | None = None, allow_empty: bool = False) -> RawBatch:
    """The readable samples of ``pending`` as a :class:`RawBatch` (the unreadable ones named in ``bad``);
    with none, an empty one that ends the run unless ``allow_empty``."""
    good = [p for p in pending if not isinstance(p[0], Exception)]
    bad = bad + [("image", p[3], one_line(p[0])) for p in pending if isinstance(p[0], Exception)]
    if fatal or not good:
        fatal = None if allow_empty and not fatal else fatal or "no readable sample"
        return assemble([], [], [], [], fit)._replace(bad=bad, fatal=fatal)
    raw = assemble([p[0] for p in good], [p[1] for p in good], [p[2] for p in good], [p[4] for p in good], fit)
    return raw._replace(bad=bad, state=state)


class _InOrder(IterableDataset):
    """Every sample once, for a cache: worker ``w`` of ``K`` reads shards ``w, w + K, ...`` in list order."""

    def __init__(self, data: ShardStream, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __iter__(self) -> Iterator[RawBatch]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        for s in range(w, len(self.data.urls), workers):
            errors: list[str] = []
            chunk: list[Any] = []
            for index, sample in enumerate(shard_samples(self.data.urls[s], errors)):
                chunk.append((*_decoded(sample, self.data, s, index), False))
                if len(chunk) == self.batch_size:
                    yield _batch(chunk, self.data.fit, [], allow_empty=True)
                    chunk = []
            yield _batch(chunk, self.data.fit, [("shard", self.data.urls[s], e) for e in errors], allow_empty=True)


# ---------------------------------------------------------------------------- the data set


class ShardStream(FittedStream):
    """WebDataset shards as a training set (see the module docstring).

    ``urls`` are the shards in order, ``counts`` their samples; ``captions`` one per sample in ``idx``
    order (None: none); ``fit`` the size and channels; ``workers`` the DataLoader processes that read
    and decode; ``window`` the shuffle window within a shard (``data.shard_shuffle``).
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], class_names: Sequence[str], fit: Fit, *,
                 captions: list[str] | None = None, workers: int = 0, window: int = 1000, what: str = "") -> None:
        if fit.size is None or fit.channels is None:
            raise ValueError("a shard stream needs its image size and channels")
        self.urls, self.counts, self.class_names = list(urls), list(counts), list(class_names)
        self.offsets = [0, *itertools.accumulate(self.counts)][:-1]
        self.fit, self.captions, self.workers, self.window = fit, captions, workers, window
        self.source = what or f"shards {self.urls[0]}" + (f" ... ({len(self.urls)})" if len(self.urls) > 1 else "")

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def streams(self) -> int:
        """How many streams a rank reads at once: one per worker (see the module docstring)."""
        return max(1, self.workers)

    def describe(self) -> str:
        h, w = self.size
        return (f"{self.source}: {len(self.urls):,} shard(s), {len(self):,} samples, "
                f"{labels_phrase(self.num_classes, self.captions)}, "
                f"{h}x{w}x{self.channels}, streamed by {self.workers or 'no'} worker(s)")

    def fingerprint(self) -> str:
        """A key of what the shards hold: their URLs and counts (and a local file's size and modification
        time), the size and channels."""
        digest = hashlib.sha256(json.dumps([self.fit.size, self.fit.channels, self.counts, self.urls]).encode())
        for url in self.urls:
            path = url[len("file://"):] if url.startswith("file://") else url
            if not _URL.match(url) and os.path.isfile(path):
                stat = os.stat(path)
                digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def batches(self, batch_size: int, seed: int, *, flip: bool = False, rank: int = 0, world_size: int = 1,
                start_step: int = 0, state: dict[str, Any] | None = None) -> StreamedBatches:
        """Endless batches for rank ``rank`` from step ``start_step`` on; ``state`` is what
        :meth:`StreamedBatches.state_at` gave at that step (None: the start of the stream)."""
        if len(self.urls) < world_size:
            raise UserError(f"{self.source}: {len(self.urls)} shard(s) for {world_size} processes; each process needs "
                            "shards of its own (write smaller shards: ddpm data pack --max-count N)")
        states = self._states(state, start_step, world_size)
        dataset = _StreamBatches(self, batch_size, seed, rank, world_size, start_step, states)

        def update(saved: dict[str, Any], raw_state: tuple[int, int, int]) -> dict[str, Any]:
            m, k, place = raw_state
            new = [list(s) for s in saved["states"]]
            new[m] = [k, place]
            return {**saved, "states": new}

        start = {"streams": self.streams, "world_size": world_size, "states": states}
        return StreamedBatches(lambda: loader(dataset, self.workers, batch_size=None), self.source, flip, start_step,
                               state=start, update=update)

    def _states(self, state: dict[str, Any] | None, start_step: int, world_size: int) -> list[list[int]]:
        """Each stream's ``[k, place]`` to start from (see :meth:`batches`)."""
        fresh = [[0, 0] for _ in range(self.streams)]
        if state and (state.get("streams"), state.get("world_size")) == (self.streams, world_size):
            return [list(s) for s in state["states"]]
        if start_step == 0:
            return fresh
        per_rank = len(self.urls) // world_size
        if not state:
            epoch, why = 0, "the checkpoint has no place in this shard stream"
        else:  # the epoch the slowest stream was in, in the new arrangement
            epoch = min((m + state["streams"] * k) // per_rank for m, (k, _) in enumerate(state["states"]))
            why = (f"the checkpoint was written with {state['world_size']} process(es) and {state['streams']} "
                   f"stream(s), this run has {world_size} and {self.streams}")
        warnings.warn(f"{self.source}: {why}, so the stream goes on from the start of epoch {epoch} in a new "
                      "arrangement and will not repeat an uninterrupted run's batches", DataWarning, stacklevel=3)
        first = epoch * per_rank
        return [[max(0, -(-(first - m) // self.streams)), 0] for m in range(self.streams)]

    def in_order(self, batch_size: int) -> Iterator[RawBatch]:
        """Every sample once (in no promised order; ``idx`` says which), to fill a cache; unreadable ones
        left out and named in ``bad``."""
        yield from loader(_InOrder(self, batch_size), min(self.workers, len(self.urls)), batch_size=None)


# ---------------------------------------------------------------------------- finding the shards


def open_shards(source: str, fit: Fit, *, caption_column: str = "text", need_captions: bool = False,
                workers: int = 0, window: int = 1000, progress: bool = False) -> ShardStream:
    """The :class:`ShardStream` that ``--data source`` names (see the module docstring): its shards'
    counts and class names from their ``shardindex.json``, else from reading them once; their captions
    (``.txt``, or ``caption_column`` of ``.json``) read once when ``need_captions``. :class:`UserError`
    for no shards, a shard that is missing or cannot be opened, or captions that are not there."""
    require_webdataset()
    urls, index = _shard_urls(source)
    listed = {e["url"]: int(e["nsamples"]) for e in index["shardlist"]} if index is not None else {}
    if listed and all(url in listed for url in urls):
        counts = [listed[url] for url in urls]
        class_names = list(index.get("ddpm", {}).get("class_names", []))
        for url in urls:
            _probe(url)
        captions = _scan(urls, caption_column, progress, f"captions of {source}")[2] if need_captions else None
    else:
        counts, top, captions = _scan(urls, caption_column, progress, f"counting the samples of {source}")
        class_names = [str(k) for k in range(top + 1)]
        captions = captions if need_captions else None
    if need_captions and not any(captions or []):
        raise UserError(f"--data {source}: no sample has a caption (a .txt member, or {caption_column!r} in its .json)")
    return ShardStream(urls, counts, class_names, fit, captions=captions, workers=workers, window=window,
                       what=f"shards {source}")


def _shard_urls(source: str) -> tuple[list[str], dict[str, Any] | None]:
    """The shards ``source`` names, in order, and the shard index that lists them (None if none)."""
    path = Path(source).expanduser()
    index_at = source if source.endswith(".json") else str(path / INDEX) if path.is_dir() else None
    if index_at is None and not _URL.match(source):
        beside = {str(Path(p).expanduser().parent / INDEX) for p in wds.shardlists.expand_urls(source)}
        index_at = next(iter(beside)) if len(beside) == 1 and Path(next(iter(beside))).is_file() else None
    index = _read_index(index_at) if index_at is not None and (_URL.match(index_at) or Path(index_at).is_file()) \
        else None
    if index is not None and (source.endswith(".json") or path.is_dir()):
        urls = [e["url"] for e in index["shardlist"]]
    elif path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = [str(Path(u).expanduser()) if not _URL.match(u) else u for u in wds.shardlists.expand_urls(source)]
    if not urls:
        raise UserError(f"--data {source}: names no shards (expected train-{{000000..000009}}.tar, a folder of .tar "
                        f"files or a {INDEX})")
    missing = [u for u in urls if not _URL.match(u) and not Path(u).is_file()]
    if missing:
        raise UserError(f"--data {source}: {len(missing):,} of its {len(urls):,} shards are not there "
                        f"(e.g. {missing[0]})")
    return urls, index


def _read_index(url: str) -> dict[str, Any]:
    """A ``shardindex.json`` with its shards' URLs made absolute (they are relative to it)."""
    try:
        with wds.gopen(url) as f:
            index = json.loads(f.read())
        entries = index["shardlist"]
        base = url if _URL.match(url) else str(Path(url).expanduser().resolve())
        for e in entries:
            e["url"] = _join(base, e["url"])
            int(e["nsamples"])
    except Exception as error:  # JSON, key, type and opener errors all mean "not an index"
        raise UserError(f"--data {url}: not a readable shard index ({_explain(error)}); expected JSON with a "
                        "shardlist of url and nsamples") from error
    return index


def _join(base: str, url: str) -> str:
    if _URL.match(url) or os.path.isabs(url):
        return url
    if _URL.match(base):
        return base.rsplit("/", 1)[0] + "/" + url
    return str(Path(base).parent / url)


def _probe(url: str) -> None:
    """Open a shard and read its first block: :class:`UserError` in one line if that fails."""
    if not _URL.match(url):
        return  # a local file is there (checked), and a bad one is skipped with a warning
    errors: list[str] = []
    first = next(shard_samples(url, errors), None)
    if first is None:
        raise UserError(f"--data: cannot read the shard {url} ({errors[0] if errors else 'no samples in it'})")


def _scan(urls: Sequence[str], caption_column: str, progress: bool, what: str) -> tuple[list[int], int, list[str]]:
    """Read every shard once, decoding nothing: the samples of each, the largest label (-1: none), and
    the captions in ``idx`` order. A shard that cannot be read at all is a :class:`UserError`; one cut
    short counts what it holds, with one warning."""
    counts, top, captions, short = [], -1, [], []
    for url in tqdm(urls, desc=what, unit="shard", disable=not progress):
        errors: list[str] = []
        n = 0
        for sample in shard_samples(url, errors):
            n += 1
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                top = max(top, int(sample["cls"].decode().strip())) if "cls" in sample else top
            captions.append(caption_of(sample, caption_column))
        if errors and n == 0:
            raise UserError(f"--data: cannot read the shard {url} ({errors[0]})")
        if errors:
            short.append(f"{url} ({errors[0]})")
        counts.append(n)
    if short:
        warnings.warn(f"{len(short)} shard(s) cut short, their readable samples kept (e.g. {short[0]})", DataWarning,
                      stacklevel=3)
    return counts, top, captions


# ---------------------------------------------------------------------------- writing shards


_MEMBER = {".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg"}


def pack_folder(folder: str | Path, out: str | Path, *, max_count: int = 1000, max_bytes: int = 2**30,
                shuffle: bool = True, seed: int = 0, split: str = "train", caption_column: str = "text",
                name: str = "train", overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Write the images of ``folder`` (as :func:`ddpm.data.list_folder` finds them, with labels or
    captions) as WebDataset shards ``out/NAME-000000.tar``, ... of at most ``max_count`` samples and
    about ``max_bytes`` each, and their ``shardindex.json``; returns the paths written.

    Each sample is the image file's bytes as they are (``KEY.png``, ``KEY.jpg``, ...), ``KEY.cls`` (its
    label), ``KEY.txt`` (its caption) and ``KEY.json`` (its ``file_name``). ``shuffle`` writes them in
    a random order (seeded), so that every shard is a sample of the whole set; files that do not open
    as images are left out with one warning."""
    require_webdataset()
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if max_count < 1 or max_bytes < 1:
        raise UserError(f"--max-count and --max-size must be positive, got {max_count} and {max_bytes}")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (pack takes a folder of images)")
    listing = list_folder(folder, split, caption_column)
    if out.exists() and (any(out.glob(f"{name}-*.tar")) or (out / INDEX).exists()) and not overwrite:
        raise UserError(f"--out {out} already holds shards; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}-*.tar"):
        old.unlink()
    n = len(listing.files)
    order = np.random.default_rng(seed).permutation(n).tolist() if shuffle else list(range(n))
    shards = _write_shards(listing, order, out, name, max_count, max_bytes, progress)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
             "shardlist": [{"url": path.name, "nsamples": count} for path, count in shards],
             "ddpm": {"class_names": listing.class_names, "captions": listing.captions is not None,
                      "source": str(folder), "shuffled": shuffle, "seed": seed}}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return [path for path, _ in shards] + [out / INDEX]


def _write_shards(listing: Any, order: Sequence[int], out: Path, name: str, max_count: int, max_bytes: int,
                  progress: bool) -> list[tuple[Path, int]]:
    """The samples of ``listing`` in ``order`` written into shards; ``[(path, samples)]``."""
    shards: list[tuple[Path, int]] = []
    writer, size, bad = None, 0, []
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(order), desc=f"packing {listing.what}", unit="img", disable=not progress) as bar:
        checked = pool.map(_readable, [listing.files[i] for i in order])
        for i, error in zip(order, checked):
            bar.update(1)
            if error is not None:
                bad.append(f"{listing.files[i]}: {error}")
                continue
            if writer is None or shards[-1][1] >= max_count or size >= max_bytes:
                if writer is not None:
                    writer.close()
                shards.append((out / f"{name}-{len(shards):06d}.tar", 0))
                writer, size = wds.TarWriter(str(shards[-1][0])), 0
            data = Path(listing.files[i]).read_bytes()
            writer.write(_sample(listing, i, sum(c for _, c in shards), data))
            shards[-1] = (shards[-1][0], shards[-1][1] + 1)
            size += len(data)
    if writer is not None:
        writer.close()
    if not shards:
        raise UserError(f"{listing.what}: none of its {len(order):,} images could be read (e.g. {bad[0]})")
    if bad:
        warnings.warn(f"{listing.what}: left out {len(bad):,} unreadable image(s) (e.g. {bad[0]})", DataWarning,
                      stacklevel=3)
    return shards


def _readable(path: str) -> str | None:
    """None if ``path`` decodes as an image, else why not."""
    try:
        open_image(path)
    except Exception as error:  # see ddpm.data.prepare_all
        return one_line(error)
    return None


def _sample(listing: Any, i: int, key: int, data: bytes) -> dict[str, Any]:
    """Image ``i`` of ``listing`` as a WebDataset sample under key ``key``."""
    suffix = os.path.splitext(listing.files[i])[1].lower()
    sample = {"__key__": f"{key:09d}", _MEMBER.get(suffix, suffix[1:]): data,
              "json": json.dumps({"file_name": os.path.relpath(listing.files[i], listing.folder)}).encode()}
    if listing.labels[i] >= 0:
        sample["cls"] = str(listing.labels[i]).encode()
    if listing.captions is not None:
        sample["txt"] = listing.captions[i].encode()
    return sample
