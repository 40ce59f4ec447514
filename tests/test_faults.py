"""Fault injection: bad input costs one line, interrupted runs lose nothing, faults are contained.

- A table of user mistakes (data, configuration, checkpoints) run through the ``ddpm`` command:
  each ends with one ``ddpm: error:`` line naming the file or option, exit code 2, and nothing
  written.
- SIGINT / SIGTERM during training: a checkpoint, exit 130 / 143, and ``--resume`` continues.
- ``kill -9`` at random moments, checkpoints being written included: the previous checkpoint stays
  loadable, and the run resumed after every kill ends with exactly the losses of a run never
  killed.
- NaN losses: skipped and counted; too many in a row stop the run with the last good state saved.
- A malicious pickle where weights are expected is refused without running it.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.autoencoder_losses import AutoencoderLoss
from ddpm.checkpoints import latest_training_checkpoint, list_training_checkpoints, load_training_checkpoint
from ddpm.cli import main
from ddpm.config import get_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.models import UNet, get_preset
from ddpm.runs import Diverged
from ddpm.train import train
from ddpm.train_autoencoder import get_config as autoencoder_config
from ddpm.train_autoencoder import train_autoencoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kill_loop import kill_loop, train_command, train_env, wait_for_steps  # noqa: E402

QUIET = {"progress": False, "log": lambda message: None}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, made once."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    good = root / "good.npz"
    np.savez(good, x_train=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8), y_train=np.arange(32) % 4)
    f: dict[str, Path] = {"root": root, "good": good}
    np.savez(root / "nokeys.npz", images=np.zeros((4, 8, 8), np.uint8))
    np.savez(root / "badtype.npz", x_train=np.full((4, 8, 8), -3.5))
    np.savez(root / "badshape.npz", x_train=np.zeros((4, 8), np.uint8))
    np.savez(root / "badlabels.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, -5, 2]))
    np.savez(root / "fewlabels.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1]))
    (root / "empty").mkdir()
    (root / "noimages").mkdir()
    (root / "noimages" / "readme.txt").write_text("hello")
    (root / "allbad").mkdir()
    (root / "allbad" / "a.png").write_bytes(b"not a png")
    (root / "allbad" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "text.npz").write_text("not a zip")
    # A run to resume with an incompatible config, and checkpoints to break.
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(good), "--out", str(run), "--quiet",
                 "--train.steps", "2", "--train.sample_every", "0"]) == 0
    f["run"] = run
    ckpt = list_training_checkpoints(run / "checkpoints")[-1]
    for name, damage in {"truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
                         "corrupted": lambda p: p.write_bytes(b"\0" * 64 + p.read_bytes()[64:]),
                         "missing": lambda p: p.unlink()}.items():
        broken = root / f"ckpt_{name}"
        _copytree(ckpt, broken)
        damage(broken / "ema.safetensors")
        f[f"ckpt_{name}"] = broken
    notckpt = root / "not_a_checkpoint"
    notckpt.mkdir()
    (notckpt / "meta.json").write_text('{"hello": "world"}')
    f["not_a_checkpoint"] = notckpt
    other = root / "other_arch"
    _copytree(ckpt, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["config"]["model"]["ch"] = 64  # weights of the ch=32 model, config of a ch=64 one
    (other / "meta.json").write_text(json.dumps(meta))
    f["other_arch"] = other
    weird = root / "weird_diffusers"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [32, 64],
                                                   "resnet_time_scale_shift": "scale_shift", "sample_size": 8}))
    f["weird_diffusers"] = weird
    # Images for the image-to-image verbs (the run draws 8x8 RGB images).
    for name, pixels in (("img", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
                         ("grey", rng.integers(0, 256, (8, 8), dtype=np.uint8)),
                         ("small", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)),
                         ("mask", np.repeat(np.array([[255] * 4 + [0] * 4], np.uint8), 8, 0)),
                         ("white", np.full((8, 8), 255, np.uint8)), ("black", np.zeros((8, 8), np.uint8)),
                         ("small_mask", np.full((6, 8), 255, np.uint8))):
        f[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(f[name])
    f["bad_noise"] = root / "bad_noise.npy"
    np.save(f["bad_noise"], np.zeros((2, 1, 8, 8), np.float32))
    return f


def _copytree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


# ---------------------------------------------------------------------------- bad input


T = "train --preset tiny --out {out} --quiet --train.steps 2 --train.sample_every 0"
BAD_INPUTS = [
    # data
    (T + " --data {root}/nowhere", "no such file or folder"),
    (T + " --data {root}/empty", "no image files"),
    (T + " --data {root}/noimages", "no image files"),
    (T + " --data {root}/allbad", "could be read"),
    (T + " --data {root}/text.npz", "cannot read it as .npz"),
    (T + " --data {root}/nokeys.npz", "no x_train array"),
    (T + " --data {root}/badtype.npz", "x_train"),
    (T + " --data {root}/badshape.npz", "x_train"),
    (T + " --data {root}/badlabels.npz", "y_train"),
    (T + " --data {root}/fewlabels.npz", "y_train"),
    (T + " --data {good} --data.split test", "no x_test"),
    # configuration
    ("train --preset imagenet --data {good} --out {out}", "invalid choice"),
    (T + " --data {good} --train.nonsense 1", "unrecognized arguments"),
    (T + " --data {good} --train.steps 0", "train.steps"),
    (T + " --data {good} --train.steps -5", "train.steps"),
    (T + " --data {good} --train.batch_size 0", "train.batch_size"),
    (T + " --data {good} --train.batch_size 64", "fewer than train.batch_size"),
    (T + " --data {good} --train.lr 0", "train.lr"),
    (T + " --data {good} --train.lr=-1e-4", "train.lr"),
    (T + " --data {good} --diffusion.timesteps 0", "diffusion.timesteps"),
    (T + " --data {good} --diffusion.timesteps 10", "beta_T"),
    (T + " --data {good} --model.ch 48", "GroupNorm"),
    (T + " --data {good} --model.image_size 12", "no level's resolution"),
    (T + " --data {good} --model.image_size 9", "not divisible"),
    (T + " --data {good} --train.ema_decay 1", "train.ema_decay"),
    (T + " --data {good} --diffusion.var_type learned_range", "learned_sigma"),
    (T + " --data {good} --train.device cuda", "CUDA"),
    (T + " --data {good} --train.class_cond true --model.num_classes 3", "num_classes"),
    ("train --out {run} --resume --model.ch 64 --quiet", "model.ch"),
    ("train --out {root}/elsewhere --resume --quiet", "no run to resume"),
    ("train --preset tiny --data {good} --out {run} --quiet", "already holds a run"),
    # checkpoints and models
    ("sample {root}/nowhere --out {out}", "no such run"),
    ("sample {good} --out {out}", "is a file"),
    ("sample {root}/empty --out {out}", "no config.json"),
    ("sample {ckpt_truncated} --out {out}", "ema.safetensors"),
    ("sample {ckpt_corrupted} --out {out}", "ema.safetensors"),
    ("sample {ckpt_missing} --out {out}", "ema.safetensors: no such file"),
    ("sample {not_a_checkpoint} --out {out}", "not a ddpm training checkpoint"),
    ("sample {other_arch} --out {out}", "shape"),
    ("sample {weird_diffusers} --out {out}", "only the DDPM UNet2DModel layout"),
    ("sample {run} --out {out} --label 2", "unconditional"),
    ("sample {run} --out {out} --steps 5000", "sampling steps"),
    ("sample {run} --out {out} --sampler ddim --eta 3", "eta"),
    ("sample {run} --out {out} --sampler dpm++2m --eta 0.5", "the SDE solvers'"),
    ("sample {run} --out {out} --sampler dpm++2m --order 2", "order is UniPC's"),
    ("sample {run} --out {out} --sampler heun --final-step sigma-min", "the final step 'sigma-min' is for"),
    ("sample {run} --out {out} --sampler ddpm --no-lower-order-final", "multistep solvers'"),
    ("eval {run} --data {root}/nowhere --out {out}", "no such file or folder"),
    ("eval {run} --data {good} --out {out} --samples {good} --fid --no-bpd", "torch-fidelity|arr_0"),
    # images in, images out
    ("inpaint {run} --image {img} --mask {small_mask} --out {out}", "must have one size"),
    ("inpaint {run} --image {img} --mask {white} --out {out}", "nothing to inpaint"),
    ("inpaint {run} --image {img} --mask {black} --out {out}", "that is sampling"),
    ("inpaint {run} --image {grey} --mask {mask} --out {out}", r"grey image; the model draws colour \(RGB\) 8x8"),
    ("inpaint {run} --image {img} --mask {mask} --sampler ddim --steps 2 --out {out}", "DDPM's ancestral"),
    ("inpaint {run} --image {img} --mask {root}/nowhere.png --out {out}", "no such image file"),
    ("img2img {run} --image {small} --strength 0.5 --out {out}", "is 6x6; the model draws 8x8 images"),
    ("img2img {run} --image {img} --strength 1.5 --out {out}", r"--strength must lie in \[0, 1\]"),
    ("img2img {run} --image {img} --strength=-0.1 --out {out}", r"--strength must lie in \[0, 1\]"),
    ("img2img {run} --image {img} --strength 0.5 --sampler dpm-adaptive --out {out}", "dpm-adaptive"),
    ("img2img {run} --image {img} {small} --strength 0.5 --out {out}", "differ in size"),
    ("img2img {run} --image {good} --strength 0.5 --out {out}", "not a readable image"),
    ("invert {run} --image {img} --sampler dpm++2m-sde --out {out}", "deterministic"),
    ("interpolate {run} --a {img} --b {bad_noise} --out {out}", "the model's x_T is"),
    ("interpolate {run} --a {img} --b {img} --frames 1 --out {out}", "--frames"),
    ("sample {run} --upsampler {run} --out {out}", "super-resolution model"),
    ("sample {run} --latents {bad_noise} --out {out}", "the model's x_T is"),
    ("sample {run} --latents {good} --out {out}", "not a NumPy .npy"),
    ("sample {run} --dynamic-threshold 2 --out {out}", "percentile"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,message", BAD_INPUTS, ids=[f"{i:02d}" for i in range(len(BAD_INPUTS))])
def test_bad_input_costs_one_line_and_writes_nothing(command, message, files, tmp_path, capsys):
    import re

    out = tmp_path / "out"
    fields = {k: str(v) for k, v in files.items()}
    argv = command.format(out=out, **fields).split()
    run_files = sorted(p.name for p in files["run"].rglob("*"))
    if "invalid choice" in message or "unrecognized" in message:
        with pytest.raises(SystemExit) as exit_info:  # argparse's own one-line usage error
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ddpm: error: ") and re.search(message, err[0]), err[0]
    assert "Traceback" not in err[0]
    assert not out.exists()
    assert sorted(p.name for p in files["run"].rglob("*")) == run_files  # the existing run untouched


# Under /proc no directory can be made (ENOENT even for root): an --out that cannot be created.
UNWRITABLE = "/proc/ddpm-cannot-create/out"
WRITERS = [
    "train --preset tiny --data {good} --train.steps 2 --train.sample_every 0",
    "train-autoencoder --preset tiny --data {good} --train.steps 2 --train.sample_every 0",
    "sample {run} --steps 2 --num-images 2",
    "eval {run} --data {good} --split train --limit 2",
    "viz forward --data {good}",
    "viz schedules",
    "viz reverse {run} --steps 2 --num-images 2",
    "export {run}",
    "demo --steps 2 --sample-steps 2",
    "inpaint {run} --image {img} --mask {mask} --steps 2 --resamples 1",
    "img2img {run} --image {img} --strength 0.5 --steps 2",
    "invert {run} --image {img} --steps 2",
    "interpolate {run} --a {img} --b {img} --steps 2 --frames 2",
]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc for a directory that cannot be made")
@pytest.mark.parametrize("command", WRITERS, ids=[c.split(" {")[0].split(" --")[0] for c in WRITERS])
def test_an_out_that_cannot_be_created_costs_one_line(command, files, capsys):
    fields = {k: str(v) for k, v in files.items()}
    argv = [*command.format(**fields).split(), "--out", UNWRITABLE, "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ddpm: error: cannot create {UNWRITABLE}"), err


def test_debug_shows_the_traceback(files, tmp_path):
    with pytest.raises(UserError):
        main(["train", "--preset", "tiny", "--data", str(files["root"] / "nowhere"), "--out", str(tmp_path / "o"),
              "--debug"])


def test_mixed_and_damaged_images_are_converted_or_skipped(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (8, 8), 10).save(folder / "grey.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(folder / "rgba.png")
    Image.new("P", (16, 12)).save(folder / "palette.png")
    Image.new("RGB", (4, 4), (200, 0, 0)).save(folder / "small.png")
    for i in range(8):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"rgb{i}.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(folder), "--out", str(out), "--quiet",
                 "--train.steps", "1", "--train.sample_every", "0", "--train.batch_size", "4"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable" in err and "upscaled 1 image" in err
    assert all(line.startswith("ddpm: warning: ") for line in err.strip().splitlines())


# ---------------------------------------------------------------------------- signals and kill -9


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(files, tmp_path, signum, code):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(files["good"], run, 100_000, False, ("--train.ckpt_every", "100000")),
                            env=train_env(), stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: stopped: interrupted by SIG") and "--resume" in lines[0]
    path, ckpt = latest_training_checkpoint(run / "checkpoints")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ckpt.meta["step"] == steps[-1] >= 3  # the step it stopped at was saved
    done = subprocess.run(train_command(files["good"], run, ckpt.meta["step"] + 2, True), env=train_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert latest_training_checkpoint(run / "checkpoints")[1].meta["step"] == ckpt.meta["step"] + 2


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(files, tmp_path):
    steps = 60
    counts = kill_loop(files["good"], tmp_path / "killed", kills=8, steps=steps, seed=1)
    assert counts["lost"] == 0 and counts["survived"] == counts["kills"] >= 3
    # The run resumed after every kill took exactly the steps of a run never killed.
    subprocess.run(train_command(files["good"], tmp_path / "whole", steps, False), env=train_env(), check=True,
                   timeout=300)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("killed", "whole")]
    assert len(losses[0]) == steps and losses[0] == losses[1]
    a = load_training_checkpoint(list_training_checkpoints(tmp_path / "killed" / "checkpoints")[-1])
    b = load_training_checkpoint(list_training_checkpoints(tmp_path / "whole" / "checkpoints")[-1])
    assert all(torch.equal(a.group("ema")[k], b.group("ema")[k]) for k in a.group("ema"))


# ---------------------------------------------------------------------------- numerical faults


def _poison(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss NaN at the given (1-based) training steps."""
    original = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        terms = original(self, *args, **kwargs)
        if calls["n"] in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("timestep_sampler", ["uniform", "loss-aware"])
def test_isolated_nan_steps_are_skipped_and_counted(files, tmp_path, monkeypatch, timestep_sampler):
    # With T = 10 the loss-aware sampler's history (10 losses per t) is full after about 20 steps
    # of batch 8; from then on it draws t by the history, which a NaN loss would poison.
    _poison(monkeypatch, {3, 5, 30})
    run = tmp_path / "run"
    config = get_config("tiny", {"data.source": str(files["good"]), "train.steps": "40", "train.sample_every": "0",
                                 "diffusion.timesteps": "10", "diffusion.schedule": "cosine",
                                 "train.timestep_sampler": timestep_sampler, "train.ckpt_every": "1000"})
    result = train(config, run, **QUIET)
    assert result.step == 40 and result.skipped_steps == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_steps"] == 3
    ckpt = latest_training_checkpoint(run / "checkpoints")[1]
    assert all(torch.isfinite(v).all() for v in ckpt.group("model").values())


@pytest.mark.slow
@pytest.mark.parametrize("bf16", ["false", "true"])
def test_consecutive_nans_stop_the_run_with_the_last_good_state(files, tmp_path, monkeypatch, bf16):
    _poison(monkeypatch, set(range(4, 100)))
    run = tmp_path / "run"
    config = get_config("tiny", {"data.source": str(files["good"]), "train.steps": "50", "train.sample_every": "0",
                                 "train.max_bad_steps": "3", "train.ckpt_every": "100", "train.bf16": bf16,
                                 "train.device": "cpu"})
    with pytest.raises(Diverged, match="learning rate") as info:
        train(config, run, **QUIET)
    assert "step_00000003" in str(info.value)
    # The bfloat16 hint only where bfloat16 autocast was on.
    assert ("--train.bf16 false" in str(info.value)) == (bf16 == "true")
    path, ckpt = latest_training_checkpoint(run / "checkpoints")
    assert ckpt.meta["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt.group("model").values())


def _poison_discriminator(monkeypatch, bad_steps: set[int]) -> None:
    """Make the autoencoder's discriminator loss NaN at the given (1-based) GAN steps."""
    original = AutoencoderLoss.discriminator_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, terms = original(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] in bad_steps else loss), terms

    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", poisoned)


def _gan_autoencoder(files, **overrides: str):
    """The tiny autoencoder with its PatchGAN on from the first step."""
    return autoencoder_config("tiny", {"data.source": str(files["good"]), "loss.disc_weight": "0.5",
                                       "loss.disc_start": "0", "loss.disc_layers": "1", "loss.disc_channels": "8",
                                       "train.sample_every": "0", "train.ckpt_every": "100", **overrides})


def _finite(ckpt) -> bool:
    return all(torch.isfinite(v).all() for group in ("model", "disc") for v in ckpt.group(group).values())


@pytest.mark.slow
def test_a_nan_in_the_autoencoders_gan_phase_is_skipped_not_saved(files, tmp_path, monkeypatch):
    _poison_discriminator(monkeypatch, {2, 5})
    run = tmp_path / "run"
    result = train_autoencoder(_gan_autoencoder(files, **{"train.steps": "8"}), run, **QUIET)
    assert result.step == 8 and result.skipped_steps == 2
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 2
    assert _finite(latest_training_checkpoint(run / "checkpoints")[1])


@pytest.mark.slow
def test_consecutive_nans_stop_the_autoencoder_with_the_last_good_state(files, tmp_path, monkeypatch):
    _poison_discriminator(monkeypatch, set(range(4, 100)))
    run = tmp_path / "run"
    with pytest.raises(Diverged, match="learning rate") as info:
        train_autoencoder(_gan_autoencoder(files, **{"train.steps": "50", "train.max_bad_steps": "3"}), run, **QUIET)
    assert "step_00000003" in str(info.value)
    path, ckpt = latest_training_checkpoint(run / "checkpoints")
    assert ckpt.meta["step"] == 3 and _finite(ckpt)
    assert not (run / "autoencoder").exists()


# ---------------------------------------------------------------------------- untrusted files


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_malicious_pickle_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "evil"
    UNet(get_preset("tiny")).save_diffusers(model_dir)
    (model_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": _Boom(str(marker))}, model_dir / "diffusion_pytorch_model.bin")
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "s"), "--steps", "2", "--quiet"]) == 2
    assert not marker.exists()
    assert "diffusion_pytorch_model.bin" in capsys.readouterr().err
    # The same bytes under a checkpoint's name: not safetensors, refused.
    ckpt_dir = tmp_path / "ckpt"
    _copytree(model_dir, ckpt_dir)
    (ckpt_dir / "model.safetensors").write_bytes((model_dir / "diffusion_pytorch_model.bin").read_bytes())
    with pytest.raises(UserError):
        UNet.from_pretrained(ckpt_dir)
    # torch.load(weights_only=False) would have run it: the test's payload is real.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(model_dir / "diffusion_pytorch_model.bin", weights_only=True)
    torch.load(model_dir / "diffusion_pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_paths_in_a_checkpoint_cannot_leave_it(files, tmp_path):
    bad = tmp_path / "step_00000001"
    _copytree(list_training_checkpoints(files["run"] / "checkpoints")[-1], bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["groups"] = ["../../outside"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="invalid groups"):
        load_training_checkpoint(bad)
    # A checkpoint directory that is a link to elsewhere is not one of the run's checkpoints.
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_00000009").symlink_to(files["run"] / "checkpoints" / "step_00000002", target_is_directory=True)
    assert list_training_checkpoints(root) == []
    # --overwrite removes a linked run file, never what it points at.
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    train(get_config("tiny", {"data.source": str(files["good"]), "train.steps": "1", "train.sample_every": "0"}),
          run, overwrite=True, **QUIET)
    assert (outside / "keep.txt").read_text() == "keep"
