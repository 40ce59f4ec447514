"""Training on streamed data end to end: a streamed folder repeats the in-memory run, a shard run
resumes exactly, latent and text-to-image runs on shards, the command line (pack, train, bad input),
and two "nodes" joined by torchrun's c10d rendezvous on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoints import latest_training_checkpoint
from ddpm.cli import main
from ddpm.config import get_config
from ddpm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ddpm.train import train

pytest.importorskip("webdataset", reason="shards need the webdataset package (pip install 'ddpm[shards]')")
from ddpm.shards import pack_folder  # noqa: E402

QUIET = {"progress": False, "log": lambda message: None}


def write_bars(folder: Path, n: int = 48, captions: bool = False) -> Path:
    """``n`` grey 10x10 images of a bar at one of four heights, in one sub-folder per height (labels), or
    flat with a metadata.jsonl caption naming the height."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        c = i % 4
        pixels = rng.integers(0, 60, (10, 10), dtype=np.uint8)
        pixels[2 * c:2 * c + 3] = 230
        path = folder / (f"{i:03d}.png" if captions else f"c{c}/{i:03d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append({"file_name": path.name, "text": ["top", "high", "low", "bottom"][c] + " bar"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    return write_bars(tmp_path_factory.mktemp("bars") / "images")


@pytest.fixture(scope="module")
def shards(bars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bars") / "shards"
    pack_folder(bars, out, max_count=6)  # 8 shards
    return out


def tiny(source: Path, preset: str = "tiny", **overrides: str):
    return get_config(preset, {"data.source": str(source), "model.dropout": "0.1", "train.steps": "10",
                               "train.ckpt_every": "4", "train.sample_every": "0", "train.keep_last": "10",
                               **overrides})


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights_equal(a: Path, b: Path) -> bool:
    (_, x), (_, y) = latest_training_checkpoint(a / "checkpoints"), latest_training_checkpoint(b / "checkpoints")
    return all(torch.equal(x.tensors[g][k], y.tensors[g][k]) for g in ("model", "ema") for k in x.tensors[g])


@pytest.mark.slow
def test_a_streamed_folder_trains_exactly_as_the_in_memory_one(bars, tmp_path):
    train(tiny(bars, **{"data.stream": "false", "train.class_cond": "true"}), tmp_path / "memory", **QUIET)
    train(tiny(bars, **{"data.stream": "true", "data.workers": "2", "train.class_cond": "true"}), tmp_path / "stream",
          **QUIET)
    assert losses(tmp_path / "memory") == losses(tmp_path / "stream")
    assert final_weights_equal(tmp_path / "memory", tmp_path / "stream")
    assert json.loads((tmp_path / "stream" / "summary.json").read_text())["data_skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_resumed_shard_run_repeats_the_uninterrupted_one(shards, tmp_path, workers):
    config = tiny(shards, **{"data.workers": workers, "data.shard_shuffle": "4", "train.class_cond": "true"})
    train(config, tmp_path / "whole", **QUIET)
    train(config.replace({"train.steps": "6"}), tmp_path / "parts", **QUIET)  # stops between checkpoints 4 and 8
    train(config, tmp_path / "parts", resume=True, explicit={"train.steps"}, **QUIET)
    assert len(losses(tmp_path / "whole")) == 10 and losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert final_weights_equal(tmp_path / "whole", tmp_path / "parts")
    meta = latest_training_checkpoint(tmp_path / "parts" / "checkpoints")[1].meta
    assert meta["data_state"][0]["streams"] == max(1, int(workers))


@pytest.mark.slow
def test_a_shard_run_resumed_with_other_workers_goes_on_with_a_warning(shards, tmp_path):
    config = tiny(shards, **{"data.workers": "0"})
    train(config.replace({"train.steps": "4"}), tmp_path / "run", **QUIET)
    with pytest.warns(match="new arrangement"):
        result = train(config.replace({"data.workers": "2"}), tmp_path / "run", resume=True,
                       explicit={"train.steps", "data.workers"}, **QUIET)
    assert result.step == 10


@pytest.mark.slow
def test_a_latent_run_on_shards_caches_its_latents_and_resumes_exactly(shards, tmp_path):
    autoencoder = tmp_path / "ae"
    AutoencoderKL(AutoencoderKLConfig.preset("tiny")).save_pretrained(autoencoder)
    config = tiny(shards, "tiny-latent", **{"data.autoencoder": str(autoencoder), "data.cache": str(tmp_path / "c")})
    train(config, tmp_path / "whole", **QUIET)
    (cache,) = (tmp_path / "c").iterdir()
    assert cache.name.startswith("latents-") and (cache / "mean.npy").is_file()
    train(config.replace({"train.steps": "6"}), tmp_path / "parts", **QUIET)
    train(config, tmp_path / "parts", resume=True, explicit={"train.steps"}, **QUIET)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert len(list((tmp_path / "c").iterdir())) == 1  # every run used the one cache


@pytest.mark.slow
def test_a_text_run_on_captioned_shards_reads_their_captions(tmp_path):
    pack_folder(write_bars(tmp_path / "captioned", n=24, captions=True), tmp_path / "shards", max_count=5)
    result = train(tiny(tmp_path / "shards", "tiny-text", **{"train.steps": "3"}), tmp_path / "run", **QUIET)
    assert result.step == 3
    vocabulary = latest_training_checkpoint(tmp_path / "run" / "checkpoints")[1].meta["tokenizer"]
    assert {"top", "high", "low", "bottom", "bar"} <= set(vocabulary)


# ---------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_pack_then_train_on_the_shards_from_the_command_line(bars, tmp_path, capsys):
    assert main(["data", "pack", str(bars), "--out", str(tmp_path / "s"), "--max-count", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 shard(s)" in out and "shardindex.json" in out
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "run"),
                 "--quiet", "--train.steps", "2", "--train.sample_every", "0", "--workers", "1"]) == 0
    assert "data: shards" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "http://127.0.0.1:9/train-{{000..003}}.tar"], "connection refused"),
    (["train", "--data", "{tmp}/none-{{000..003}}.tar"], "4 of its 4 shards are not there"),
    (["data", "pack", "{tmp}/nothing"], "no such folder"),
])
def test_bad_shards_cost_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv += ["--out", str(tmp_path / "out"), "--quiet"] + (["--preset", "tiny"] if argv[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- several nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_joined_by_the_c10d_rendezvous_train_in_step(shards, tmp_path):
    """Two torchrun launchers, one process each, as two nodes on loopback (c10d rendezvous, gloo): the
    run finishes on both, the ranks end with identical weights, rank 0 writes, and both ranks' places in
    their streams are saved (that the ranks' shards are disjoint is test_streaming's)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes", "--max_restarts", "0",
         "-m", "ddpm", "train", "--preset", "tiny", "--data", str(shards), "--out", str(run), "--quiet",
         "--train.steps", "4", "--train.sample_every", "0", "--train.ckpt_every", "2", "--model.dropout", "0.1",
         "--train.check_sync", "true", "--data.workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_max_param_diff"] == 0.0 and summary["step"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    places = latest_training_checkpoint(run / "checkpoints")[1].meta["data_state"]
    assert [p["world_size"] for p in places] == [2, 2]  # both ranks' places saved


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_a_streamed_run_with_a_checkpoint(bars, tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too: they ignore it, the trainer saves and stops."""
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "train", "--preset", "tiny", "--data", str(bars), "--out",
                             str(run), "--quiet", "--train.steps", "100000", "--train.sample_every", "0",
                             "--train.ckpt_every", "100000", "--data.stream", "true", "--data.workers", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted by SIGINT; checkpoint" in err
    assert latest_training_checkpoint(run / "checkpoints") is not None
