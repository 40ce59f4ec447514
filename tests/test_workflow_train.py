"""Training end to end on the tiny preset: outputs, exact resume, refusal to clobber, DDP."""

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
from conftest import write_bars_npz

from ddpm.checkpoints import latest_training_checkpoint, list_training_checkpoints
from ddpm.config import get_config
from ddpm.errors import UserError
from ddpm.runs import ema_decay
from ddpm.train import learning_rate, train

QUIET = {"progress": False, "log": lambda message: None}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """64 grey 8x8 images in 4 classes (bars at the class's row)."""
    return write_bars_npz(tmp_path_factory.mktemp("data") / "bars.npz", 64, 16)


def tiny(npz: Path, **overrides: str):
    return get_config("tiny", {"data.source": str(npz), **overrides})


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_writes_a_run(tmp_path, npz):
    run = tmp_path / "run"
    result = train(tiny(npz), run, **QUIET)
    assert result.step == 20 and result.skipped_steps == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 20
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(np.isfinite(m["loss"]) and m["img_per_s"] > 0 for m in metrics)
    # Checkpoints every 10 steps, the last two kept; sample grids at 10 and at the end.
    assert [p.name for p in list_training_checkpoints(run / "checkpoints")] == ["step_00000010", "step_00000020"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png"]
    assert result.sample_grid == run / "samples" / "step_00000020.png"
    from PIL import Image

    with Image.open(result.sample_grid) as img:
        img.verify()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["simple", "hybrid-loss-aware"])
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, npz, variant):
    """A run stopped at step 12 and resumed has the same losses and weights as one never stopped.

    Dropout is on, so the global RNG matters too; the hybrid variant has a learned variance and
    the loss-aware timestep sampler, whose history (T = 10 steps: warm after ~13 steps) must be
    restored as well.
    """
    extra = {"model.dropout": "0.1", "train.steps": "24", "train.ckpt_every": "6", "train.sample_every": "0",
             "train.keep_last": "10"}
    if variant != "simple":
        extra |= {"diffusion.timesteps": "10", "diffusion.schedule": "cosine", "diffusion.var_type": "learned_range",
                  "model.learned_sigma": "true",
                  "train.loss_type": "hybrid", "train.timestep_sampler": "loss-aware"}
    config = tiny(npz, **extra)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config, whole, **QUIET)
    train(config.replace({"train.steps": "12"}), parts, **QUIET)
    train(config, parts, resume=True, explicit={"train.steps"}, **QUIET)

    losses_whole = [m["loss"] for m in read_metrics(whole)]
    losses_parts = [m["loss"] for m in read_metrics(parts)]
    assert len(losses_whole) == 24
    assert losses_parts == losses_whole  # exactly, step by step
    _, a = latest_training_checkpoint(whole / "checkpoints")
    _, b = latest_training_checkpoint(parts / "checkpoints")
    for group in ("model", "ema", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])


@pytest.mark.slow
def test_a_run_is_never_overwritten_without_asking(tmp_path, npz):
    run = tmp_path / "run"
    train(tiny(npz, **{"train.steps": "2"}), run, **QUIET)
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        train(tiny(npz, **{"train.steps": "2"}), run, **QUIET)
    assert (run / "metrics.jsonl").read_bytes() == before
    train(tiny(npz, **{"train.steps": "3"}), run, overwrite=True, **QUIET)
    assert len(read_metrics(run)) == 3
    with pytest.raises(UserError, match="no run to resume"):
        train(tiny(npz), tmp_path / "elsewhere", resume=True, **QUIET)


@pytest.mark.slow
def test_resume_refuses_an_incompatible_config(tmp_path, npz):
    run = tmp_path / "run"
    train(tiny(npz, **{"train.steps": "2"}), run, **QUIET)
    with pytest.raises(UserError, match="model.ch"):
        train(tiny(npz, **{"model.ch": "64"}), run, resume=True, explicit={"model.ch"}, **QUIET)
    with pytest.raises(UserError, match="train.lr"):
        train(tiny(npz, **{"train.lr": "0.5"}), run, resume=True, explicit={"train.lr"}, **QUIET)


@pytest.mark.slow
def test_class_conditional_training_and_time_limit(tmp_path, npz):
    run = tmp_path / "cond"
    result = train(tiny(npz, **{"train.class_cond": "true", "train.steps": "1000", "train.time_limit": "0.002"}),
                   run, **QUIET)
    assert 0 < result.step < 1000  # stopped by the 0.12 s limit, with a checkpoint
    assert result.checkpoint is not None and result.checkpoint.name == f"step_{result.step:08d}"
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == 4


def test_unlabelled_data_cannot_be_class_conditional(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, x_train=np.zeros((16, 8, 8), np.uint8))
    with pytest.raises(UserError, match="needs labels"):
        train(tiny(path, **{"train.class_cond": "true"}), tmp_path / "run", **QUIET)


def test_recipe_schedules():
    assert learning_rate(0, 2e-4, 5000) == pytest.approx(2e-4 / 5000)
    assert learning_rate(4999, 2e-4, 5000) == pytest.approx(2e-4)
    assert learning_rate(10**6, 2e-4, 5000) == 2e-4
    assert learning_rate(0, 1e-3, 0) == 1e-3
    assert ema_decay(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay(10**6, 0.9999, True) == 0.9999
    assert ema_decay(0, 0.9999, False) == 0.9999


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_the_ranks_in_sync(tmp_path, npz):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical weights; rank 0 writes."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "ddpm", "train", "--preset", "tiny", "--data", str(npz),
           "--out", str(run), "--quiet", "--train.steps", "6", "--train.sample_every", "0",
           "--train.ckpt_every", "3", "--model.dropout", "0.1", "--train.check_sync", "true"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_max_param_diff"] == 0.0
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 7))  # one writer
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["batch_size"] == 8  # the global batch: 4 per process


@pytest.mark.slow
def test_a_super_resolution_stage_trains_resumes_exactly_and_cascades(tmp_path, capsys):
    """ddpm train on a stage (the tiny U-Net with a low-resolution input and its augmentation level):
    the SR condition is drawn from the run's generators, so a resumed run repeats the uninterrupted one."""
    from ddpm.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    stage = ["--model.low_res_channels", "3", "--model.noise_level_embedding", "true", "--train.sample_every", "0"]
    common = ["--preset", "tiny", "--data", str(data), "--quiet", *stage]
    assert main(["train", *common, "--out", str(tmp_path / "whole"), "--train.steps", "4"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "parts"), "--train.steps", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "parts"), "--resume", "--train.steps", "4", "--quiet"]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "parts")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert (tmp_path / "whole" / "samples" / "step_00000004.png").is_file()  # input / stage / original rows
    base = tmp_path / "base"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(base), "--quiet", "--train.steps", "1",
                 "--train.sample_every", "0", "--model.image_size", "4", "--model.ch_mult", "1",
                 "--model.attn_resolutions", "4"]) == 0
    capsys.readouterr()
    assert main(["sample", str(base), "--upsampler", str(tmp_path / "whole"), "--out", str(tmp_path / "s"),
                 "--num-images", "2", "--steps", "2", "--quiet"]) == 0
    assert "at 4x4, then" in capsys.readouterr().out and (tmp_path / "s" / "grid.png").is_file()
