"""The ``ddpm`` command end to end on the tiny preset: train, sample, eval, viz, export, demo, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 8, 8)).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "noise.npz"
    np.savez(path, x_train=x, y_train=np.arange(40) % 2, x_test=x[:8], y_test=np.arange(8) % 2)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, npz) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--data", str(npz), "--out", str(out), "--quiet",
                 "--train.steps", "4", "--train.sample_every", "0", "--lr", "0.002"]) == 0
    return out


def valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("verb", ["train", "sample", "eval", "viz", "export", "demo", "viz forward",
                                  "viz schedules", "viz reverse"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ddpm" in text and len(text) > 300


@pytest.mark.slow
def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ["--model.ch", "--model.ch_mult", "--diffusion.schedule", "--diffusion.var_type",
                   "--train.lr", "--lr", "--train.ema_decay", "--data.flip", "--train.class_cond"]:
        assert option in text
    assert "Adam's learning rate" in text  # help text comes from the dataclass docstrings


@pytest.mark.slow
def test_train_prints_what_it_wrote(run, npz, capsys):
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.002


def test_sample_writes_grid_pngs_and_npz(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(run), "--out", str(out), "--num-images", "6", "--sampler", "ddim", "--steps", "5",
                 "--pngs", "--npz", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "grid.png") in printed and str(out / "samples.npz") in printed
    valid_png(out / "grid.png")
    assert len(list((out / "images").glob("*.png"))) == 6
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 8, 8, 3) and f["arr_0"].dtype == np.uint8


@pytest.mark.slow
def test_sampling_is_reproducible_from_the_command_line(run, tmp_path):
    for name in ("a", "b"):
        main(["sample", str(run), "--out", str(tmp_path / name), "--num-images", "3", "--steps", "4", "--npz",
              "--no-grid", "--quiet", "--seed", "7"])
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.slow
def test_eval_writes_the_bound_report(run, npz, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", str(run), "--data", str(npz), "--out", str(out), "--limit", "4", "--quiet"]) == 0
    report = json.loads((out / "bpd.json").read_text())
    assert report["num_images"] == 4 and len(report["terms"]) == 100
    assert report["bpd"] == pytest.approx(sum(report["terms"]) + report["prior_bpd"], rel=1e-9)
    assert 0 < report["bpd"] < 50
    valid_png(out / "bound.png")
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.slow
def test_viz_pictures(run, npz, tmp_path):
    out = tmp_path / "v"
    assert main(["viz", "forward", "--data", str(npz), "--out", str(out), "--num-images", "3", "--quiet"]) == 0
    assert main(["viz", "schedules", "--out", str(out), "--timesteps", "200"]) == 0
    assert main(["viz", "reverse", str(run), "--out", str(out), "--steps", "10", "--quiet"]) == 0
    for name in ("forward_linear.png", "schedules.png", "reverse.png"):
        valid_png(out / name)
    with Image.open(out / "reverse.gif") as gif:
        assert gif.n_frames > 5


def test_export_to_diffusers_and_back(run, tmp_path):
    from ddpm.loading import load_model
    from ddpm.models.unet import UNet

    out = tmp_path / "x"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "scheduler_config.json").read_text())["num_train_timesteps"] == 100
    ours = load_model(run, "ema").model
    back = UNet.from_diffusers(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert a.equal(b), name
    # The exported directory is itself a model `ddpm sample` takes.
    assert main(["sample", str(out), "--out", str(tmp_path / "s"), "--num-images", "2", "--steps", "3",
                 "--quiet"]) == 0


@pytest.mark.slow
def test_resume_from_the_command_line(run, npz, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--out", str(copy), "--resume", "--train.steps", "6", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_preset_given_with_resume_is_named_as_ignored(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--resume", "--preset", "mnist", "--train.steps", "5", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ddpm: note: --preset mnist is ignored with --resume: the run's saved configuration wins "
                   "(change a resumable field with --section.field)"]
    assert json.loads((copy / "config.json").read_text())["model"]["ch"] == 32  # tiny's, not mnist's 16


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "tiny", "--data", "/no/such/place", "--out", "{tmp}/r"], "no such file or folder"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--train.lr", "-1"], "train.lr"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--train.steps", "many"], "cannot read"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--model.image_size", "9"], "divisible"),
    (["sample", "/no/such/run", "--out", "{tmp}/s"], "no such run"),
    (["eval", "{npz}", "--data", "{npz}", "--out", "{tmp}/e"], "is a file"),
])
def test_user_mistakes_cost_one_line(argv, message, npz, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, npz=npz) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error:") and message in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_installed_command_runs():
    done = subprocess.run([sys.executable, "-m", "ddpm", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout


@pytest.mark.parametrize("steps", [None, "4", "2"])
def test_resuming_a_finished_run_has_nothing_to_do(run, tmp_path, capsys, steps):
    """A run at or past train.steps: one line, exit 0, and not a byte of the run changes."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    capsys.readouterr()
    argv = ["train", "--out", str(copy), "--resume", "--quiet"] + (["--train.steps", steps] if steps else [])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [out.strip()] and out.startswith("nothing to do:") and not err
    after = {p.relative_to(copy): p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    assert after == before


def test_sample_prints_the_network_evaluations(run, tmp_path, capsys):
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--num-images", "3", "--sampler", "ddim",
                 "--steps", "4", "--quiet"]) == 0
    assert "4 network evaluations each" in capsys.readouterr().out


@pytest.mark.slow
def test_steps_pick_the_sampler_and_the_solver_options_reach_it(run, tmp_path, capsys, monkeypatch):
    """Without --sampler, --steps N takes the sampler of DEFAULT_SAMPLER_BY_NFE for N; --eta, --order,
    --final-step and --no-lower-order-final reach the solver (the same images as the library's call)."""
    from ddpm import samplers
    from ddpm.generate import SamplerSettings, generate
    from ddpm.loading import load_model

    monkeypatch.setattr(samplers, "DEFAULT_SAMPLER_BY_NFE", {3: "ddim", 20: samplers.DEFAULT_SAMPLER})
    assert main(["sample", str(run), "--out", str(tmp_path / "a"), "--num-images", "2", "--steps", "4", "--quiet"]) == 0
    assert "2 images with ddim: 4 network evaluations each" in capsys.readouterr().out
    options = ["--sampler", "unipc-bh1", "--order", "2", "--final-step", "sigma-min", "--no-lower-order-final"]
    assert main(["sample", str(run), "--out", str(tmp_path / "b"), "--num-images", "2", "--steps", "4", "--npz",
                 "--no-grid", "--quiet", *options]) == 0
    loaded = load_model(run)
    settings = SamplerSettings("unipc-bh1", 4, order=2, final_step="sigma-min", lower_order_final=False)
    expected = generate(loaded.model, loaded.diffusion.build(), 2, settings, progress=False).uint8()
    with np.load(tmp_path / "b" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], expected.permute(0, 2, 3, 1).numpy())
