"""Streamed training data: image folders decoded by DataLoader workers, WebDataset shards, the choice
between them and RAM, their order and resume promises, DDP disjointness, the disk caches, and bad input.

The oracle for a folder is the in-memory ImageData: a streamed folder must give its batches bit for
bit. A shard stream has no such oracle (it cannot read in a random order), so it is held to what it
promises (ddpm/shards.py): a function of (seed, rank, world size, workers), resumed exactly from a
checkpoint's place, disjoint shards per rank and epoch, every sample once per epoch where the shards
divide evenly.
"""

from __future__ import annotations

import functools
import http.server
import json
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.sources
from ddpm.cache import ArrayCache
from ddpm.conditioning import Captions
from ddpm.config import get_config
from ddpm.data import Batch, ImageData, list_folder, load_images, make_fit
from ddpm.errors import DataWarning, UserError
from ddpm.latent import LatentData
from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.models.text_encoder import TextEmbedding, TextEncoder, TokenBatch
from ddpm.sources import open_training_images
from ddpm.streaming import FolderStream

wds = pytest.importorskip("webdataset", reason="shards need the webdataset package (pip install 'ddpm[shards]')")
from ddpm.shards import INDEX, ShardStream, is_shard_source, open_shards, pack_folder, rank_shard  # noqa: E402


def write_folder(folder: Path, classes: str = "abc", per_class: int = 12, size: tuple[int, int] = (10, 12),
                 mode: str = "RGB") -> Path:
    """Random images in one sub-folder per class (labels), PNG."""
    rng = np.random.default_rng(len(classes) * per_class)
    channels = 3 if mode == "RGB" else 1
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / c / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("stream") / "images")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "shards"
    pack_folder(folder, out, max_count=5)  # 36 images: 7 shards of 5 and one of 1
    return out


FIT = make_fit("x", 8, 3)


def take(batches, k: int) -> list[Batch]:
    return [next(batches) for _ in range(k)]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return all(torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.idx, y.idx) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- folders


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_folder_gives_the_in_memory_batches_bit_for_bit(folder, workers):
    memory = load_images(folder, 8, 3)
    stream = FolderStream(list_folder(folder), FIT, workers)
    assert len(stream) == len(memory) and stream.class_names == memory.class_names
    for rank in (0, 1):
        kwargs = {"flip": True, "rank": rank, "world_size": 2, "start_step": 2}
        # 36 images, 2 ranks, batches of 4: 4 steps an epoch, so 7 steps cross into the next epoch.
        assert same(take(memory.batches(4, 9, **kwargs), 7), take(stream.batches(4, 9, **kwargs), 7))


def test_the_stream_choice_follows_data_stream_and_the_memory_budget(folder, shards, tmp_path, monkeypatch):
    def data(source, **options):
        return get_config("tiny", {"data.source": str(source), **options}).data

    assert isinstance(open_training_images(data(folder), (8, 8), 3), ImageData)  # auto, and it fits
    monkeypatch.setattr(ddpm.sources, "memory_budget", lambda: 36 * 3 * 8 * 8 - 1)  # one byte short
    assert isinstance(open_training_images(data(folder), (8, 8), 3), FolderStream)
    assert isinstance(open_training_images(data(folder, **{"data.stream": "false"}), (8, 8), 3), ImageData)
    assert isinstance(open_training_images(data(shards), (8, 8), 3), ShardStream)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(UserError, match="an .npz or a named data set is held in memory"):
        open_training_images(data(npz, **{"data.stream": "true"}), (8, 8), 3)
    with pytest.raises(UserError, match="always streamed"):
        open_training_images(data(shards, **{"data.stream": "false"}), (8, 8), 3)


def test_an_unreadable_image_is_replaced_in_its_batch_warned_once_and_counted(tmp_path):
    folder = write_folder(tmp_path / "f", classes="ab", per_class=6)
    (folder / "a" / "002.png").write_bytes(b"not a png")
    (folder / "b" / "004.png").write_bytes(b"")
    stream = FolderStream(list_folder(folder), FIT, workers=0).batches(12, 0)  # the whole set each step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(stream, 3)
    assert [str(w.message).count("unreadable image") for w in caught if w.category is DataWarning] == [1]
    assert stream.skipped == 2  # distinct files, however often they come round
    for batch in batches:
        assert batch.x.shape == (12, 3, 8, 8)  # the step keeps its shape
        assert len(set(batch.idx.tolist())) == 10  # two stand-ins repeat readable images of the batch


# ---------------------------------------------------------------------------- packing


def test_pack_writes_every_image_once_with_its_label_and_an_index(folder, shards):
    index = json.loads((shards / INDEX).read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [e["nsamples"] for e in index["shardlist"]] == [5] * 7 + [1]
    assert index["ddpm"]["class_names"] == ["a", "b", "c"]
    written = {}
    for entry in index["shardlist"]:
        with tarfile.open(shards / entry["url"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == entry["nsamples"]
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            written[meta["file_name"]] = (members[f"{key}.png"], int(members[f"{key}.cls"]))
    listing = list_folder(folder)
    assert len(written) == len(listing.files)
    for path, label in zip(listing.files, listing.labels):
        assert written[str(Path(path).relative_to(folder))] == (Path(path).read_bytes(), label)


def test_pack_keeps_captions_and_refuses_to_overwrite(tmp_path):
    folder = write_folder(tmp_path / "c", classes="x", per_class=4)
    rows = [{"file_name": f"x/{i:03d}.png", "text": f"caption {i}"} for i in range(4)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack_folder(folder, tmp_path / "s", shuffle=False)
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tar:
        texts = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    assert texts == [f"caption {i}" for i in range(4)]
    stream = open_shards(str(tmp_path / "s"), FIT, need_captions=True)
    assert stream.captions == texts and stream.num_classes == 0
    with pytest.raises(UserError, match="already holds shards; pass --overwrite"):
        pack_folder(folder, tmp_path / "s")


def test_shards_are_told_from_folders_of_images(folder, shards, tmp_path):
    assert is_shard_source(str(shards)) and not is_shard_source(str(folder))
    mixed = write_folder(tmp_path / "m", classes="ab", per_class=1)
    (mixed / "backup.tar").write_bytes(b"")  # class folders beside a tar: still images
    assert not is_shard_source(str(mixed))
    for source in ("http://host/x-{0..1}.tar", "a.tar::b.tar", "file:///x/y.tar", "x-{000..009}.tar", "pipe:cat a.tar"):
        assert is_shard_source(source)


def test_a_pattern_takes_its_counts_from_the_index_beside_it(shards, monkeypatch):
    monkeypatch.setattr("ddpm.shards._scan", lambda *args: pytest.fail("read the shards to count them"))
    stream = open_shards(str(shards / "train-{000000..000003}.tar"), FIT)
    assert stream.counts == [5] * 4 and stream.class_names == ["a", "b", "c"]


# ---------------------------------------------------------------------------- the shard stream's promises


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_stream_resumes_exactly_from_its_saved_place(shards, workers):
    stream = open_shards(str(shards), FIT, workers=workers, window=3)
    whole = stream.batches(4, 5, flip=True, rank=1, world_size=2)
    expected = take(whole, 14)  # 18 samples a rank an epoch: the 14 steps cross three epochs
    for stop in (1, 6, 9):
        resumed = stream.batches(4, 5, flip=True, rank=1, world_size=2, start_step=stop, state=whole.state_at(stop))
        assert same(take(resumed, 14 - stop), expected[stop:])


def test_a_seed_gives_the_same_stream_and_another_seed_another(shards):
    stream = open_shards(str(shards), FIT, window=4)
    assert same(take(stream.batches(4, 1), 6), take(stream.batches(4, 1), 6))
    assert not same(take(stream.batches(4, 1), 6), take(stream.batches(4, 2), 6))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_shards_every_epoch(world_size):
    n = 8
    per_rank = n // world_size
    for epoch in range(3):
        taken = [[rank_shard(epoch * per_rank + j, n, 0, r, world_size) for j in range(per_rank)]
                 for r in range(world_size)]
        flat = [s for ranks in taken for s in ranks]
        assert len(set(flat)) == len(flat) == per_rank * world_size  # disjoint; n mod W left out this epoch


def test_every_sample_comes_once_an_epoch_on_disjoint_ranks(tmp_path):
    folder = write_folder(tmp_path / "f", classes="ab", per_class=10)
    pack_folder(folder, tmp_path / "s", max_count=5)  # 4 shards of 5: 2 a rank
    stream = open_shards(str(tmp_path / "s"), FIT, window=2)
    seen = [torch.cat([b.idx for b in take(stream.batches(5, 3, rank=r, world_size=2), 2)]) for r in (0, 1)]
    assert sorted(torch.cat(seen).tolist()) == list(range(20))


# ---------------------------------------------------------------------------- bad shards


def test_a_truncated_shard_and_a_member_that_is_no_image_are_skipped_with_one_warning_each(tmp_path):
    folder = write_folder(tmp_path / "f", classes="ab", per_class=6)
    out = tmp_path / "s"
    pack_folder(folder, out, max_count=4, shuffle=False)  # 3 shards of 4
    first = out / "train-000000.tar"
    first.write_bytes(first.read_bytes()[:5000])  # cut inside its second sample
    with wds.TarWriter(str(out / "train-000002.tar")) as writer:  # a shard with a sample that is no image
        for key in range(4):
            writer.write({"__key__": f"k{key}", "png": b"garbage" if key == 1 else _png(), "cls": b"0"})
    stream = open_shards(str(out), FIT, window=1).batches(4, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(stream, 6)
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    assert len(messages) == 2 and "cut short" in messages[0] + messages[1] and "unreadable image" in "".join(messages)
    assert len(stream.bad_shards) == 1 and any(key.endswith("train-000002.tar#k1") for key in stream.bad_images)
    assert stream.skipped == len(stream.bad_shards) + len(stream.bad_images)
    assert all(b.x.shape == (4, 3, 8, 8) for b in batches)


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("source,message", [
    ("{tmp}/none-{{000..003}}.tar", "4 of its 4 shards are not there"),
    ("{tmp}/empty-index", "names no shards"),
    ("{tmp}/bad-index/shardindex.json", "not a readable shard index"),
])
def test_no_shards_or_a_bad_index_is_a_one_line_error(source, message, tmp_path):
    (tmp_path / "empty-index").mkdir()
    (tmp_path / "empty-index" / INDEX).write_text(json.dumps({"shardlist": []}))
    (tmp_path / "bad-index").mkdir()
    (tmp_path / "bad-index" / INDEX).write_text("{not json")
    with pytest.raises(UserError, match=message) as error:
        open_shards(source.format(tmp=tmp_path), FIT)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- URLs


@pytest.fixture
def server(shards):
    """An HTTP server on loopback serving the shards folder; its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["index", "pattern", "file"])
def test_shards_stream_from_urls_as_from_files(shards, server, how):
    local = open_shards(str(shards), FIT, window=3)
    url = {"index": f"{server}/{INDEX}", "pattern": f"{server}/train-{{000000..000007}}.tar",
           "file": f"file://{shards}/train-{{000000..000007}}.tar"}[how]
    remote = open_shards(url, FIT, window=3)
    assert remote.counts == local.counts and len(remote) == 36
    assert same(take(remote.batches(4, 0), 5), take(local.batches(4, 0), 5))


@pytest.mark.parametrize("path,message", [("/nothing.json", "curl exit 22"), ("/train-{000..001}.tar", "curl exit 22")])
def test_a_url_that_cannot_be_opened_is_a_one_line_error(server, path, message):
    with pytest.raises(UserError, match=message) as error:
        open_shards(server + path, FIT)
    assert "\n" not in str(error.value)


def test_a_refused_connection_is_a_one_line_error():
    with pytest.raises(UserError, match="connection refused") as error:
        open_shards("http://127.0.0.1:9/train-{000..001}.tar", FIT)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- caches


@pytest.mark.slow
def test_a_streamed_sets_latents_are_cached_once_memory_mapped_and_keyed(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "grey", classes="ab", per_class=5, size=(8, 8), mode="L")
    fit = make_fit("x", 8, 1)
    autoencoder = AutoencoderKL(AutoencoderKLConfig.preset("tiny")).eval().requires_grad_(False)
    memory = LatentData(load_images(folder, 8, 1), autoencoder, flip=True)
    cache = tmp_path / "cache"
    for source in (FolderStream(list_folder(folder), fit), _packed(folder, tmp_path / "s", fit)):
        streamed = LatentData(source, autoencoder, flip=True, cache=cache)
        assert streamed.cache.parent == cache and (streamed.cache / "mean.npy").is_file()
        # The same images at the same indices (packed unshuffled), encoded in other batches.
        assert torch.allclose(streamed.mean, memory.mean, atol=1e-5)
    assert len(list(cache.iterdir())) == 2  # a folder and shards: two data sets, two keys
    monkeypatch.setattr("ddpm.latent._encode_to_disk", lambda *args: pytest.fail("encoded again"))
    again = LatentData(FolderStream(list_folder(folder), fit), autoencoder, flip=True, cache=cache)
    assert torch.allclose(again.mean, memory.mean, atol=1e-5)
    for a, b in zip(take(again.batches(4, 0, flip=True), 3), take(memory.batches(4, 0, flip=True), 3)):
        assert torch.equal(a.idx, b.idx) and torch.allclose(a.x, b.x, atol=1e-4)
    monkeypatch.undo()
    with torch.no_grad():
        next(autoencoder.parameters()).add_(0.01)  # another autoencoder: another key
    LatentData(FolderStream(list_folder(folder), fit), autoencoder, flip=True, cache=cache)
    assert len(list(cache.iterdir())) == 3


def _packed(folder: Path, out: Path, fit) -> ShardStream:
    pack_folder(folder, out, max_count=3, shuffle=False)
    return open_shards(str(out), fit, workers=2)


class _Frozen(TextEncoder):
    """A tiny frozen encoder: characters to ids, an embedding table."""

    trainable, masks_padding = False, True
    context_length, hidden_size, pooled_size = 6, 4, 4

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(128, 4)

    def tokenize(self, prompts):
        ids = torch.zeros(len(prompts), 6, dtype=torch.long)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 128 for c in p[:6]]
            ids[i, :len(codes)] = torch.tensor(codes, dtype=torch.long)
        return TokenBatch(ids, ids > 0)

    def forward(self, input_ids, attention_mask):
        hidden = self.table(input_ids)
        return TextEmbedding(hidden, attention_mask, hidden.mean(1))


def test_caption_embeddings_are_cached_once_memory_mapped_and_equal_to_the_ram_ones(tmp_path):
    captions = ["one", "two", "two", "three", ""]
    encoder = _Frozen().requires_grad_(False)
    in_ram = Captions(captions, encoder, dropout=0.3)
    on_disk = Captions(captions, encoder, dropout=0.3, cache=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("captions-") and (folder / "hidden_states.npy").is_file()
    batch = Batch(torch.zeros(5, 1), torch.full((5,), -1), torch.arange(5))
    a = in_ram(batch, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = on_disk(batch, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ArrayCache(tmp_path, "captions", "another key").exists
