"""Latent diffusion end to end on 8x8 images: training the autoencoder (exact resume, the scale, a
signal), a U-Net on its latents, sampling, evaluation and export through the CLI, and user errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_bars_npz
from torch import nn

from ddpm import checkpoints
from ddpm.cli import main
from ddpm.config import get_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate
from ddpm.latent import LatentData, load_autoencoder, pixel_size
from ddpm.loading import load_model
from ddpm.models import UNet
from ddpm.models.autoencoder import AutoencoderKLConfig, DiagonalGaussian
from ddpm.runs import Interrupted
from ddpm.schedules import linear_betas
from ddpm.train import train
from ddpm.train_autoencoder import PRESETS as AE_PRESETS
from ddpm.train_autoencoder import AutoencoderRunConfig, latent_scale, train_autoencoder
from ddpm.train_autoencoder import get_config as ae_config

QUIET = {"progress": False, "log": lambda message: None}
# The tiny U-Net on the tiny autoencoder's 4x4x4 latents.
LATENT = {"model.in_channels": "4", "model.image_size": "4", "train.steps": "4", "train.sample_every": "0",
          "train.ckpt_every": "2"}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """48 grey 8x8 images in 4 classes (bars at the class's row)."""
    return write_bars_npz(tmp_path_factory.mktemp("data") / "bars.npz", 48, 8)


def tiny_ae(npz: Path, **overrides: str):
    return ae_config("tiny", {"data.source": str(npz), **overrides})


@pytest.fixture(scope="module")
def ae_run(npz, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ae") / "run"
    train_autoencoder(tiny_ae(npz), run, **QUIET)
    return run


@pytest.fixture(scope="module")
def ldm_run(npz, ae_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ldm") / "run"
    argv = ["train", "--preset", "tiny", "--data", str(npz), "--autoencoder", str(ae_run), "--out", str(run),
            "--quiet", *[a for key, value in LATENT.items() for a in (f"--{key}", value)]]
    assert main(argv) == 0
    return run


# --- the autoencoder's run -------------------------------------------------------------------------


def test_an_autoencoder_run_writes_its_model_with_the_scale(ae_run, npz):
    assert sorted(p.name for p in ae_run.iterdir()) == ["autoencoder", "checkpoints", "config.json", "metrics.jsonl",
                                                         "samples", "summary.json"]
    metrics = [json.loads(line) for line in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(m["rec"]) and m["kl"] > 0 for m in metrics)
    assert sorted(p.name for p in (ae_run / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    from PIL import Image

    with Image.open(ae_run / "samples" / "step_00000006.png") as img:  # 2 rows of 4 images, scaled up
        assert img.size[0] > 2 * img.size[1] * 0.9
    # The saved model is the trained one, with the scale measured at the end.
    model = load_autoencoder(ae_run)
    scale = json.loads((ae_run / "summary.json").read_text())["scaling_factor"]
    assert model.config.scaling_factor == scale != 1.0
    _, ckpt = checkpoints.latest_training_checkpoint(ae_run / "checkpoints")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt.group("model").items())
    # 1 / std of fresh posterior samples of the same 32 images agrees within sampling error (2,048
    # latent values: about 2 % standard error).
    from ddpm.data import load_images

    x = load_images(npz, 8, 1).to_float(slice(0, 32))
    with torch.no_grad():
        z = model.encode(x).sample(torch.Generator().manual_seed(123))
    assert 1 / z.std().item() == pytest.approx(scale, rel=0.08)
    assert load_autoencoder(ae_run / "autoencoder").config == model.config  # either path works


@pytest.mark.slow
def test_a_resumed_autoencoder_run_repeats_the_uninterrupted_one(tmp_path, npz):
    """With the discriminator on from step 2 (both optimizers, the adaptive weight) and an EMA."""
    config = tiny_ae(npz, **{"loss.disc_weight": "0.5", "loss.disc_start": "2", "loss.disc_layers": "1",
                             "loss.disc_channels": "8", "train.ema_decay": "0.9", "train.keep_last": "5"})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_autoencoder(config, whole, **QUIET)
    train_autoencoder(config.replace({"train.steps": "3"}), parts, **QUIET)
    train_autoencoder(config, parts, resume=True, explicit={"train.steps"}, **QUIET)

    def metrics(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "time")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(parts) == metrics(whole) and "disc_loss" in metrics(whole)[-1]
    _, a = checkpoints.latest_training_checkpoint(whole / "checkpoints")
    _, b = checkpoints.latest_training_checkpoint(parts / "checkpoints")
    assert sorted(a.tensors) == ["disc", "disc_optimizer", "ema", "model", "optimizer", "rng"]
    for group in a.tensors:
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (whole / "autoencoder" / name).read_bytes() == (parts / "autoencoder" / name).read_bytes()
    # Resuming a finished run does nothing and touches nothing.
    before = (parts / "metrics.jsonl").read_bytes()
    assert train_autoencoder(config, parts, resume=True, **QUIET).nothing_to_do
    assert (parts / "metrics.jsonl").read_bytes() == before


def test_a_signal_stops_the_autoencoder_run_with_a_checkpoint(tmp_path, npz, monkeypatch):
    import ddpm.train_autoencoder as module

    step = module.train_step

    def step_then_signal(state, x, cfg):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step(state, x, cfg)

    monkeypatch.setattr(module, "train_step", step_then_signal)
    with pytest.raises(Interrupted) as info:
        train_autoencoder(tiny_ae(npz), tmp_path / "run", **QUIET)
    assert info.value.exit_code == 128 + signal.SIGINT
    assert [p.name for p in checkpoints.list_training_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_00000002"]
    assert not (tmp_path / "run" / "autoencoder").exists()


def test_a_term_some_steps_lack_is_averaged_over_the_steps_that_have_it():
    from ddpm.runs import MetricsWindow, StepOutcome

    window = MetricsWindow()
    window.add(StepOutcome({"rec": 4.0}, 1.0, applied=True), 8)
    window.add(StepOutcome({"rec": 2.0, "gan": 0.5}, 3.0, applied=True), 8)  # the GAN starts here
    window.add(StepOutcome({}, float("nan"), applied=False), 8)  # a skipped step counts only its images
    record = window.record()
    assert (record["rec"], record["gan"], record["grad_norm"]) == (3.0, 0.5, 2.0)


class _FixedEncoder(nn.Module):
    """An autoencoder stand-in whose posterior is N(mean, s^2) with given means."""

    def __init__(self, means: torch.Tensor, s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.means, self.log_var = means, 2 * math.log(s)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean = self.means[x[:, 0, 0, 0].long()]
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, self.log_var)], 1))


def test_scale_by_std_is_one_over_the_std_of_posterior_samples():
    """Latents z = m + s eps, with the means m spread with standard deviation a: std(z) is
    sqrt(a^2 + s^2) (65,536 values: within 1 %), and 1/std of the means alone when s -> 0."""
    generator = torch.Generator().manual_seed(0)
    a, s, n = 3.0, 4.0, 4096
    means = 0.5 + a * torch.randn(n, 4, 2, 2, generator=generator, dtype=torch.float64).float()
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8)
    assert latent_scale(_FixedEncoder(means, s), images, seed=0) == pytest.approx(1 / math.hypot(a, s), rel=0.01)
    exact = 1 / np.std(means.double().numpy(), ddof=1)
    assert latent_scale(_FixedEncoder(means, 1e-6), images, seed=0) == pytest.approx(exact, rel=1e-5)


# --- diffusion in the latent space -----------------------------------------------------------------


def test_latent_sampling_turns_off_x0_clipping_and_decodes(ae_run, monkeypatch):
    seen = []
    original = GaussianDiffusion.sample

    def spy(self, *args, **kwargs):
        seen.append(kwargs["clip_denoised"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "sample", spy)
    autoencoder = load_autoencoder(ae_run)
    unet = UNet(get_config("tiny", LATENT).model).eval()
    diffusion = GaussianDiffusion(linear_betas(50))
    settings = SamplerSettings("ddim", 3)  # clip_denoised=True asked, as for pixels
    latent = generate(unet, diffusion, 2, settings, autoencoder=autoencoder, progress=False, trajectory_every=1)
    pixels = generate(UNet(get_config("tiny").model).eval(), diffusion, 2, settings, progress=False)
    assert seen == [False, True]
    assert latent.images.shape == (2, 1, 8, 8) and pixels.images.shape == (2, 3, 8, 8)
    assert latent.trajectory["x_t"].shape[1:] == latent.trajectory["pred_x0"].shape[1:] == (2, 1, 8, 8)


@pytest.mark.slow
def test_latent_training_sampling_eval_and_export(ldm_run, ae_run, npz, tmp_path, capsys):
    config = json.loads((ldm_run / "config.json").read_text())
    assert config["data"]["autoencoder"] == str(ae_run.resolve())
    assert (ldm_run / "samples" / "step_00000004.png").is_file()
    capsys.readouterr()
    out = tmp_path / "samples"
    assert main(["sample", str(ldm_run), "--out", str(out), "--num-images", "3", "--sampler", "ddim", "--steps", "3",
                 "--npz", "--quiet"]) == 0
    assert "latents of a" in capsys.readouterr().out
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1)  # decoded: pixels, not 4x4x4 latents
    # bits/dim is refused in one line; FID-style evaluation draws pixels.
    assert main(["eval", str(ldm_run), "--data", str(npz), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bits/dim of pixels is not defined for a latent model" in err[0]
    # Export: unet/, vae/ and scheduler/, which load back as the same latent model.
    exported = tmp_path / "export"
    assert main(["export", str(ldm_run), "--out", str(exported)]) == 0
    assert sorted(p.name for p in exported.iterdir()) == ["scheduler", "unet", "vae"]
    assert not json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    a, b = load_model(ldm_run), load_model(exported)
    assert b.autoencoder is not None and b.image_shape == a.image_shape == (1, 8, 8)
    settings = SamplerSettings("ddim", 3)
    torch.testing.assert_close(
        generate(a.model, a.diffusion.build(), 2, settings, autoencoder=a.autoencoder, progress=False).images,
        generate(b.model, b.diffusion.build(), 2, settings, autoencoder=b.autoencoder, progress=False).images)
    assert main(["export", str(ldm_run), "--out", str(tmp_path / "x"), "--format", "ddpm"]) == 2


def test_flips_happen_in_pixel_space_before_encoding(npz, ae_run):
    from ddpm.data import load_images

    data, autoencoder = load_images(npz, 8, 1), load_autoencoder(ae_run)
    latents = LatentData(data, autoencoder, flip=True)
    x = data.to_float(slice(0, 5))
    with torch.no_grad():
        torch.testing.assert_close(latents.mean[:5, 0], autoencoder.encode(x).mean)
        torch.testing.assert_close(latents.mean[:5, 1], autoencoder.encode(x.flip(-1)).mean)
    # A batch is the posterior sample of the image or its mirror, as the epoch's flip bits say, scaled.
    (idx, flips), = [next(data.batch_indices(8, seed=0))]
    z, _, _ = next(latents.batches(8, seed=0, flip=True))
    mean = latents.mean[idx, flips.long()] * autoencoder.config.scaling_factor
    std = latents.std[idx, flips.long()] * autoencoder.config.scaling_factor
    assert ((z - mean).abs() <= 6 * std).all() and not torch.equal(z, mean)


@pytest.mark.slow
def test_a_resumed_latent_run_repeats_the_uninterrupted_one(npz, ae_run, tmp_path):
    """The latents are drawn per step from (seed, step): nothing about them needs saving."""
    config = get_config("tiny", {"data.source": str(npz), "data.autoencoder": str(ae_run), "data.flip": "true",
                                 **LATENT})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config, whole, **QUIET)
    train(config.replace({"train.steps": "2"}), parts, **QUIET)
    train(config, parts, resume=True, explicit={"train.steps"}, **QUIET)
    _, a = checkpoints.latest_training_checkpoint(whole / "checkpoints")
    _, b = checkpoints.latest_training_checkpoint(parts / "checkpoints")
    assert a.meta["step"] == b.meta["step"] == 4
    for group in ("model", "ema", "optimizer"):
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])


def test_fid_of_a_latent_model_compares_pixels(ldm_run, npz, tmp_path, monkeypatch):
    """With a stand-in torch_fidelity: decoded samples and the data at the same pixel size."""
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(calculate_metrics=lambda **kwargs: calls.append(kwargs) or {
        "frechet_inception_distance": 1.0})
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    assert main(["eval", str(ldm_run), "--data", str(npz), "--out", str(tmp_path / "e"), "--no-bpd", "--fid",
                 "--num-samples", "4", "--sampler", "ddim", "--steps", "3", "--quiet"]) == 0
    samples, reference = calls[0]["input1"], calls[0]["input2"]
    assert samples[0].shape == reference[0].shape == (3, 8, 8) and len(samples) == len(reference) == 4


def test_a_run_whose_autoencoder_is_gone_says_so(ldm_run, tmp_path):
    run = Path(shutil.copytree(ldm_run, tmp_path / "run"))
    path, _ = checkpoints.latest_training_checkpoint(run / "checkpoints")
    meta = json.loads((path / checkpoints.CHECKPOINT_META).read_text())
    meta["config"]["data"]["autoencoder"] = str(tmp_path / "gone")
    (path / checkpoints.CHECKPOINT_META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="gone: no such directory"):
        load_model(run)


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--autoencoder", "{tmp}/missing"],
     "no such directory"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--autoencoder", "{ae}",
      "--model.in_channels", "4"], "set --model.image_size 4"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--autoencoder", "{ae}",
      "--model.image_size", "4"], "set --model.in_channels 4"),
    (["train", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--model.in_channels", "4"],
     "needs --autoencoder"),
    (["train-autoencoder", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--loss.perceptual_weight",
      "1"], "lpips_path"),
    (["train-autoencoder", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--lpips", "{tmp}/no.st"],
     "no.st"),
    (["train-autoencoder", "--preset", "tiny", "--data", "{npz}", "--out", "{tmp}/r", "--train.lr", "0"],
     "train.lr"),
    (["sample", "{ae}", "--out", "{tmp}/r"], "an autoencoder's checkpoint"),
])
def test_user_mistakes_cost_one_line(argv, message, npz, ae_run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, npz=npz, ae=ae_run) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error:") and message in err[0], err
    assert not (tmp_path / "r").exists()


# --- presets and help ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(AE_PRESETS))
def test_autoencoder_presets_resolve_and_round_trip(name):
    config = ae_config(name)
    assert config.model == AutoencoderKLConfig.preset(AE_PRESETS[name]["model"])
    assert AutoencoderRunConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("unet,autoencoder,size", [("mnist-latent", "mnist-f4", (28, 28)),
                                                   ("cifar10-latent", "cifar10-f4", (32, 32)),
                                                   ("mnist-pairs-latent", "mnist-pairs-f4", (28, 56))])
def test_latent_presets_fit_their_autoencoders(unet, autoencoder, size):
    assert pixel_size(get_config(unet).model.sample_shape, AutoencoderKLConfig.preset(autoencoder), autoencoder) == size


def test_train_autoencoder_help_says_lpips_is_a_local_file(capsys):
    with pytest.raises(SystemExit):
        main(["train-autoencoder", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lpips PATH" in text and "local safetensors file" in text and "nothing is downloaded" in text
    for option in ("--loss.kl_weight", "--loss.disc_start", "--train.ema_decay", "--train.scale_images"):
        assert option in text
