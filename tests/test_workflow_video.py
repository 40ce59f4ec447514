"""Video end to end on the tiny video preset: a training step of the one loop's trainer, sampling (plain,
conditioned, extended), the command line, and its one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.config import RUN_PRESETS, RunConfig, get_config
from ddpm.generate import SamplerSettings
from ddpm.models import VideoUNet, get_video_preset
from ddpm.runs import Processes
from ddpm.train import build_state, train_step
from ddpm.video_data import load_videos
from ddpm.video_sampling import generate_video
from ddpm.video_training import VIDEO_RUN_PRESETS, ImageFrames, run_sections, video_preview, video_training_condition

TINY = get_video_preset("tiny-video")
FAST = SamplerSettings("ddim", steps=3)


@pytest.fixture(scope="module")
def clips_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 4, 8, 8), dtype=np.uint8)
    path = tmp_path_factory.mktemp("videos") / "clips.npz"
    np.savez(path, x_train=x, y_train=np.arange(12) % 3, x_test=x[:3])
    return path


@pytest.fixture(scope="module")
def video_model(tmp_path_factory, jitter):
    path = tmp_path_factory.mktemp("models") / "tiny-video"
    jitter(VideoUNet(TINY), seed=7).save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", list(VIDEO_RUN_PRESETS))
def test_presets_are_run_configs(preset, monkeypatch):
    config = RunConfig.from_dict(run_sections(preset))
    assert config.model.ARCH == "video_unet" and config.model == get_video_preset(preset)
    assert RunConfig.from_dict(config.to_dict()) == config  # the arch survives config.json
    # Registered among the run presets, they resolve with overrides like any other.
    assert RUN_PRESETS[preset] is VIDEO_RUN_PRESETS[preset]
    assert get_config(preset, {"train.lr": "0.003"}) == RunConfig.from_dict(run_sections(preset)).replace(
        {"train.lr": "0.003"})


def test_the_trainer_takes_a_joint_video_image_step(clips_npz, tmp_path):
    # ddpm.train's own step on a video batch with VDM's image frames appended and masked.
    config = RunConfig.from_dict(run_sections("tiny-video"))
    data = load_videos(clips_npz, frames=config.model.frames, size=config.model.image_size,
                       channels=config.model.in_channels)
    image_frames = config.data.image_frames
    batch = next(data.batches(config.train.batch_size, seed=0, image_frames=image_frames))
    assert batch.x.shape == (4, 1, 4 + image_frames, 8, 8)
    condition = video_training_condition(config, image_frames)
    assert isinstance(condition, ImageFrames)
    kwargs = condition(batch, torch.Generator(), torch.device("cpu"))
    assert kwargs["images_mask"].tolist() == [[False] * 4 + [True] * image_frames] * 4
    device = torch.device("cpu")
    state = build_state(config, device, Processes())
    before = [p.detach().clone() for p in state.model.parameters()]
    outcome = train_step(state, state.model, config.diffusion.build(), batch, condition, config, device, Processes(),
                         bf16=False)
    assert outcome.applied and np.isfinite(outcome.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    path = video_preview(state.ema, config.diffusion.build(), config, device, False, tmp_path / "step.png")
    with Image.open(path) as img:
        assert img.size[0] > img.size[1]  # a row per clip, a column per frame
    assert path.with_suffix(".gif").is_file()


def test_a_seed_gives_the_same_clips_in_any_batch(video_model):
    model = VideoUNet.from_pretrained(video_model)
    d = RunConfig.from_dict(run_sections("tiny-video")).diffusion.build()
    one = generate_video(model, d, 3, FAST, seed=5, batch_size=1, progress=False)
    three = generate_video(model, d, 3, FAST, seed=5, batch_size=3, progress=False)
    torch.testing.assert_close(one.videos, three.videos, rtol=1e-4, atol=1e-5)
    assert one.nfe == 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["replacement", "reconstruction"])
def test_first_frames_are_kept_and_clips_extended(video_model, method):
    model = VideoUNet.from_pretrained(video_model)
    d = RunConfig.from_dict(run_sections("tiny-video")).diffusion.build()
    first = torch.rand(2, 1, 2, 8, 8) * 2 - 1
    out = generate_video(model, d, 2, FAST, seed=0, first_frames=first, method=method, frames=7, context=2,
                         progress=False)
    assert out.videos.shape == (2, 1, 7, 8, 8)
    torch.testing.assert_close(out.videos[:, :, :2], first)
    assert out.nfe == 3 * 3  # windows (0, 4), (2, 4), (4, 3)
    # The conditioning reaches the drawn frames: other first frames, other continuations.
    other = generate_video(model, d, 2, FAST, seed=0, first_frames=-first, method=method, frames=7, context=2,
                           progress=False)
    assert (other.videos[:, :, 2:] - out.videos[:, :, 2:]).abs().max() > 1e-3


@pytest.mark.slow
def test_sample_and_viz_on_a_video_model(video_model, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(video_model), "--out", str(out), "--num-images", "2", "--sampler", "ddim",
                 "--steps", "2", "--npz", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 clips of 4 frames" in text and "samples.gif" in text
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 4, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == 4
    # Continue the first frame of the GIF just written... of another size: one line, nothing written.
    code = main(["sample", str(video_model), "--out", str(tmp_path / "c"), "--first-frames", str(out / "samples.gif"),
                 "--quiet"])
    assert code == 2 and "frames of" in capsys.readouterr().err
    # A still image of the model's size is one given frame.
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "first.png")
    assert main(["sample", str(video_model), "--out", str(tmp_path / "c"), "--first-frames",
                 str(tmp_path / "first.png"), "--frames", "6", "--steps", "2", "--sampler", "ddim", "--quiet"]) == 0
    assert main(["viz", "reverse", str(video_model), "--out", str(tmp_path / "v"), "--steps", "3", "--quiet"]) == 0
    assert (tmp_path / "v" / "reverse.png").is_file() and (tmp_path / "v" / "reverse.gif").is_file()
    capsys.readouterr()
    # What has no video form refuses in one line: diffusers' layout, image metrics.
    assert main(["export", str(video_model), "--out", str(tmp_path / "e")]) == 2
    assert "no diffusers layout" in capsys.readouterr().err
    assert main(["export", str(video_model), "--out", str(tmp_path / "e"), "--format", "ddpm"]) == 0
    assert main(["eval", str(video_model), "--data", "x.npz", "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    assert "video model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--frames", "0"], "--frames must be at least 1"),
    (["--frames", "9", "--context", "4"], "needs --context between 1 and 3"),
    (["--first-frames", "FIRST", "--num-first-frames", "4"], "leave nothing to draw"),
    (["--first-frames", "MISSING"], "no such file"),
    (["--first-frames", "STILL_GIF"], "still image"),
])
def test_bad_video_requests_get_one_line(video_model, tmp_path, capsys, argv, message):
    clip = np.zeros((5, 8, 8), np.uint8)
    Image.fromarray(clip[0]).save(tmp_path / "still.gif")
    np.save(tmp_path / "first.npy", clip[None])
    names = {"FIRST": tmp_path / "first.npy", "MISSING": tmp_path / "nope.gif", "STILL_GIF": tmp_path / "still.gif"}
    argv = [str(names.get(a, a)) for a in argv]
    code = main(["sample", str(video_model), "--out", str(tmp_path / "o"), "--quiet", "--steps", "2", *argv])
    err = capsys.readouterr().err
    if message == "still image":  # a one-frame GIF is a still image, so one given frame: no error
        assert code == 0
        return
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_video_options_need_a_video_model(tmp_path, capsys, jitter):
    from ddpm.models import UNet, get_preset

    UNet(get_preset("tiny")).save_pretrained(tmp_path / "image")
    assert main(["sample", str(tmp_path / "image"), "--out", str(tmp_path / "o"), "--frames", "8", "--quiet"]) == 2
    assert "need(s) a video model" in capsys.readouterr().err


def test_data_moving_mnist_verb(tmp_path, capsys):
    digits = np.zeros((30, 28, 28), np.uint8)
    digits[:, 8:20, 10:18] = 255
    np.savez(tmp_path / "mnist.npz", x_train=digits, y_train=np.arange(30) % 10, x_test=digits[:5],
             y_test=np.arange(5))
    out = tmp_path / "mm.npz"
    assert main(["data", "moving-mnist", "--mnist", str(tmp_path / "mnist.npz"), "--out", str(out), "--num-videos",
                 "6", "--num-test", "2", "--size", "32", "--digits", "1", "--frames", "8"]) == 0
    assert str(out) in capsys.readouterr().out
    assert load_videos(out).videos.shape == (6, 1, 8, 32, 32)
    assert main(["data", "moving-mnist", "--mnist", str(tmp_path / "nope.npz"), "--out", str(out)]) == 2
    assert "--mnist" in capsys.readouterr().err


@pytest.mark.slow
def test_ddpm_train_on_videos_resumes_exactly_and_previews_clips(clips_npz, tmp_path, capsys):
    import json

    from ddpm.checkpoints import latest_training_checkpoint

    common = ["--preset", "tiny-video", "--data", str(clips_npz), "--quiet", "--train.sample_every", "0"]
    assert main(["train", *common, "--out", str(tmp_path / "whole"), "--train.steps", "4"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "parts"), "--train.steps", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "parts"), "--resume", "--train.steps", "4", "--quiet"]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "parts")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # the same clips and image frames, step for step
    a, b = (latest_training_checkpoint(tmp_path / name / "checkpoints")[1] for name in ("whole", "parts"))
    assert all(torch.equal(a.group("ema")[k], b.group("ema")[k]) for k in a.group("ema"))
    assert {p.suffix for p in (tmp_path / "whole" / "samples").iterdir()} == {".png", ".gif"}
