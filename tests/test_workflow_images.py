"""Images in, images out, end to end through the ``ddpm`` command on tiny models: inpaint, img2img,
invert and its decoding by ``sample --latents``, interpolate, a cascade (``sample --upsampler``), and
dynamic thresholding; pixel and latent models, class labels; every file written is named."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.generate import SamplerSettings, generate
from ddpm.images import read_image
from ddpm.inpaint import inpaint, read_mask
from ddpm.inversion import invert, read_noise
from ddpm.loading import load_model
from ddpm.models import UNet, get_preset
from ddpm.models.autoencoder import PRESETS as AE_PRESETS
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.video_unet import VideoUNet, get_video_preset
from ddpm.superres import upsample

VERBS = ["inpaint", "img2img", "invert", "interpolate"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, jitter) -> dict[str, Path]:
    """Tiny models (saved, untrained but jittered so that they draw something) and input images."""
    root = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    f = {"root": root, "pixel": root / "pixel", "latent": root / "latent", "base": root / "base", "sr": root / "sr"}
    jitter(UNet(dataclasses.replace(get_preset("tiny"), num_classes=2)), scale=0.05).save_pretrained(f["pixel"])
    jitter(UNet(get_preset("tiny-latent")), scale=0.05).save_diffusers(f["latent"] / "unet")
    AutoencoderKL(AE_PRESETS["tiny"]).save_diffusers(f["latent"] / "vae")
    jitter(UNet(dataclasses.replace(get_preset("tiny"), image_size=4)), scale=0.05).save_pretrained(f["base"])
    sr = dataclasses.replace(get_preset("tiny"), low_res_channels=3, noise_level_embedding=True)
    jitter(UNet(sr), scale=0.05).save_pretrained(f["sr"])
    f["video"] = root / "video"
    VideoUNet(get_video_preset("tiny-video")).save_pretrained(f["video"])
    rng = np.random.default_rng(0)
    for name, shape in (("a", (8, 8, 3)), ("b", (8, 8, 3)), ("small", (6, 6, 3))):
        f[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(f[name])
    f["grey"] = root / "grey.png"
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(f["grey"])
    half = np.full((8, 8), 255, np.uint8)
    half[:, 4:] = 0  # the right half is generated
    for name, mask in (("mask", half), ("white", np.full((8, 8), 255, np.uint8)), ("black", np.zeros((8, 8), np.uint8)),
                       ("small_mask", half[:6])):
        f[name] = root / f"{name}.png"
        Image.fromarray(mask).save(f[name])
    return f


def run(command: str, files: dict[str, Path], tmp_path: Path, capsys) -> tuple[int, str, str]:
    argv = shlex.split(command.format(out=tmp_path / "out", **{k: str(v) for k, v in files.items()}))
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def written(out: str) -> list[Path]:
    return [Path(line.split("wrote ", 1)[1]) for line in out.splitlines() if line.startswith("wrote ")]


@pytest.mark.parametrize("verb", VERBS)
def test_every_image_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ddpm" in text and "examples:" in text and f"ddpm {verb} runs/" in text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["replacement", "repaint"])
def test_inpainting_keeps_the_known_pixels_exactly_and_names_every_file(method, files, tmp_path, capsys):
    code, out, err = run(f"inpaint {{pixel}} --image {{a}} {{b}} --mask {{mask}} --out {{out}} --method {method} "
                         "--steps 4 --jump-length 2 --resamples 2 --num-samples 2 --label 1 --guidance-scale 2",
                         files, tmp_path, capsys)
    assert code == 0, err
    paths = written(out)
    assert {p.name for p in paths} == {"grid.png", "000000.png", "000001.png", "000002.png", "000003.png"}
    assert all(p.is_file() for p in paths)
    nfe = 4 if method == "replacement" else 4 + 1 * 1 * 2  # RePaint: K + floor((K-1)/j)·(r-1)·j
    assert f": {nfe} network evaluations each" in out
    keep = read_mask(files["mask"])[0, 0].bool()
    for i, source in enumerate(["a", "a", "b", "b"]):
        result, original = read_image(tmp_path / "out" / "images" / f"{i:06d}.png"), read_image(files[source])
        assert torch.equal(result[:, keep], original[:, keep])  # 1 keeps a pixel (diffusers' convention)
        assert not torch.equal(result[:, ~keep], original[:, ~keep])


def test_img2img_at_strength_zero_writes_the_image_back_and_half_runs_half(files, tmp_path, capsys):
    code, out, err = run("img2img {pixel} --image {a} --strength 0 --out {out}", files, tmp_path, capsys)
    assert code == 0, err
    assert "1 images at strength 0: 0 network evaluations each" in out
    assert torch.equal(read_image(tmp_path / "out" / "images" / "000000.png"), read_image(files["a"]))
    code, out, err = run("img2img {pixel} --image {a} {b} --strength 0.5 --steps 6 --sampler dpm++2m --out {out}",
                         files, tmp_path, capsys)
    assert code == 0, err
    assert "2 images at strength 0.5: 3 network evaluations each" in out
    assert (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.slow
def test_invert_writes_noise_that_sample_latents_decodes_to_the_reconstruction(files, tmp_path, capsys):
    code, out, err = run("invert {pixel} --image {a} {b} --steps 5 --label 0 --out {out}", files, tmp_path, capsys)
    assert code == 0, err
    assert "encoded in 4 network evaluations each and decoded in 5" in out
    latents = read_noise(tmp_path / "out" / "latents.npy")
    assert latents.shape == (2, 3, 8, 8) and {p.name for p in written(out)} == {"latents.npy", "grid.png"}
    decode = re.search(r"^decode: ddpm (.*) --out OUT$", out, re.MULTILINE).group(1)
    assert decode.endswith("--sampler ddim --steps 5 --label 0")
    assert main([*shlex.split(decode), "--out", str(tmp_path / "dec"), "--pngs", "--quiet"]) == 0
    # The same x_T, sampler, steps and label: the reconstruction the invert verb measured.
    loaded = load_model(files["pixel"])
    images = torch.stack([read_image(files["a"]), read_image(files["b"])])
    found = invert(loaded.model, loaded.diffusion.build(), images, SamplerSettings("ddim", 5), label=0, progress=False)
    torch.testing.assert_close(found.latents, latents)
    decoded = torch.stack([read_image(tmp_path / "dec" / "images" / f"{i:06d}.png") for i in range(2)])
    assert torch.equal(decoded, found.reconstruction.uint8())


def test_interpolation_between_an_image_and_a_noise_writes_a_strip_and_a_gif(files, tmp_path, capsys):
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32))
    code, out, err = run(f"interpolate {{pixel}} --a {{a}} --b {noise} --frames 4 --steps 3 --out {{out}}",
                         files, tmp_path, capsys)
    assert code == 0, err
    strip, gif = written(out)
    assert (strip.name, gif.name) == ("interpolation.png", "interpolation.gif")
    with Image.open(gif) as img:
        assert img.n_frames > 1
    assert "--a: " in out and "4 frames decoded with ddim: 3 network evaluations each" in out


@pytest.mark.slow
def test_a_latent_model_inpaints_edits_and_inverts_through_its_autoencoder(files, tmp_path, capsys):
    for command in ("inpaint {latent} --image {grey} --mask {mask} --method replacement --steps 3 --out {out}",
                    "inpaint {latent} --image {grey} --mask {mask} --steps 3 --resamples 1 --out {out}",
                    "img2img {latent} --image {grey} --strength 0.6 --steps 5 --out {out}",
                    "invert {latent} --image {grey} --steps 3 --out {out}"):
        code, out, err = run(command, files, tmp_path, capsys)
        assert code == 0, (command, err)
        assert written(out), command
    loaded = load_model(files["latent"])
    image = read_image(files["grey"])[None]
    mask = read_mask(files["mask"])
    samples = inpaint(loaded.model, loaded.diffusion.build(), image, mask, "replacement", SamplerSettings(steps=3),
                      autoencoder=loaded.autoencoder, progress=False)
    keep = mask[0, 0].bool()
    assert torch.equal(samples.uint8()[0][:, keep], image[0][:, keep])  # the known pixels put back after decoding
    assert read_noise(tmp_path / "out" / "latents.npy").shape == (1, 4, 4, 4)  # the latents' x_T


def test_a_cascade_draws_small_images_and_enlarges_them(files, tmp_path, capsys):
    code, out, err = run("sample {base} --upsampler {sr} --num-images 3 --steps 3 --upsampler-steps 2 --pngs "
                         "--out {out}", files, tmp_path, capsys)
    assert code == 0, err
    assert "3 images: 3 network evaluations each at 4x4, then 2 at 8x8 (augmentation level 0.2)" in out
    names = {p.name for p in written(out)}
    assert {"grid.png", "base_grid.png"} <= names
    assert read_image(tmp_path / "out" / "images" / "000002.png").shape == (3, 8, 8)
    code, out, err = run("sample {sr} --steps 2 --out {out}/alone", files, tmp_path, capsys)
    assert code == 2 and "this is a super-resolution model" in err and len(err.strip().splitlines()) == 1


def test_upsample_sees_each_image_augmented_to_the_level(files):
    """The stage's model gets the low-resolution images noised to the level by each image's own draws (so an
    image is the same in any batch) and the level itself."""
    loaded = load_model(files["sr"])
    seen = []

    class Spy(torch.nn.Module):
        sample_shape, num_classes, config = loaded.model.sample_shape, 0, loaded.model.config

        def forward(self, x, t, low_res, noise_level):
            seen.append((low_res.clone(), noise_level.clone()))
            return loaded.model(x, t, low_res=low_res, noise_level=noise_level)

    low = torch.rand(3, 3, 4, 4) * 2 - 1
    a = upsample(Spy(), loaded.diffusion.build(), low, SamplerSettings("ddim", 2), 0.3, batch_size=3, progress=False)
    b = upsample(Spy(), loaded.diffusion.build(), low, SamplerSettings("ddim", 2), 0.3, batch_size=2, progress=False)
    torch.testing.assert_close(a.images, b.images)
    assert torch.equal(seen[0][1], torch.full((3,), 0.3))
    alpha = np.exp(-(1e-4 + 10 * 0.3**2) / 2)
    assert not torch.allclose(seen[0][0], alpha * low)  # noised, around √ᾱ x
    assert (seen[0][0] - alpha * low).std().item() == pytest.approx(np.sqrt(1 - alpha**2), rel=0.3)


def test_dynamic_thresholding_keeps_samples_in_range_and_is_refused_for_latents(files, tmp_path, capsys):
    code, out, err = run("sample {pixel} --dynamic-threshold --steps 3 --num-images 2 --sampler ddim --out {out}",
                         files, tmp_path, capsys)
    assert code == 0, err
    loaded = load_model(files["pixel"])
    x = generate(loaded.model, loaded.diffusion.build(), 2, SamplerSettings("ddim", 3, dynamic_threshold=0.9),
                 progress=False)
    assert x.images.abs().max() <= 1
    code, out, err = run("sample {latent} --dynamic-threshold 0.99 --steps 3 --out {out}", files, tmp_path, capsys)
    assert code == 2 and "pixel models" in err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A text-conditional run (GLIDE's own text transformer, the tiny-text preset) trained 2 steps on captioned bars."""
    from test_workflow_text import tiny_text, write_bars

    from ddpm.train import train

    out = tmp_path_factory.mktemp("t2i") / "run"
    bars = write_bars(tmp_path_factory.mktemp("bars") / "bars")
    train(tiny_text(bars, **{"train.steps": "2", "train.ckpt_every": "2"}), out, progress=False, log=lambda m: None)
    return out


@pytest.mark.slow  # trains a text model for seconds
def test_prompts_condition_every_image_verb_of_a_text_model(text_run, files, tmp_path, capsys):
    prompt = '--prompt "a bar low" --guidance-scale 2'
    for command in (f"img2img {text_run} --image {{a}} --strength 0.5 --steps 4 {prompt} --out {{out}}",
                    f"inpaint {text_run} --image {{a}} --mask {{mask}} --steps 3 --resamples 1 {prompt} --out {{out}}",
                    f"invert {text_run} --image {{a}} --steps 3 {prompt} --out {{out}}",
                    f"interpolate {text_run} --a {{a}} --b {{b}} --frames 2 --steps 3 {prompt} --out {{out}}"):
        code, out, err = run(command, files, tmp_path, capsys)
        assert code == 0, (command, err)
        assert written(out), command
    assert "--prompt 'a bar low'" in re.search(r"^decode: .*$", run(f"invert {text_run} --image {{a}} --steps 3 "
                                                                   f"{prompt} --out {{out}}", files, tmp_path,
                                                                   capsys)[1], re.MULTILINE).group(0)
    code, out, err = run("img2img {pixel} --image {a} --strength 0.5 --prompt hello --out {out}", files, tmp_path,
                         capsys)
    assert code == 2 and "--prompt needs a text-conditional model" in err


def test_without_steps_the_methods_run_the_chain_the_sampler_runs(files):
    """No --steps: the sampler's default NFE (20), as 'ddpm sample' runs it, so that decoding goes back."""
    from ddpm.img2img import img2img

    loaded = load_model(files["pixel"])
    image = read_image(files["a"])[None]
    found = invert(loaded.model, loaded.diffusion.build(), image, SamplerSettings("ddim"), progress=False)
    assert (found.encode_nfe, found.reconstruction.nfe) == (19, 20)
    edited = img2img(loaded.model, loaded.diffusion.build(), image, 0.5, progress=False)
    assert edited.nfe == 10


@pytest.mark.parametrize("command", ["img2img {video} --image {grey} --strength 0.5 --out {out}",
                                     "interpolate {video} --a {grey} --b {grey} --out {out}",
                                     "sample {video} --latents {root}/none.npy --out {out}"])
def test_a_video_model_is_refused_by_the_image_verbs_in_one_line(command, files, tmp_path, capsys):
    code, out, err = run(command, files, tmp_path, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "video model" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # builds a tiny random Stable Diffusion pipeline with diffusers and transformers
def test_a_stable_diffusion_directory_edits_inpaints_and_inverts_with_prompts(tmp_path, capsys):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from test_workflow_stable_diffusion import SCHEDULERS, save_pipeline

    sd = save_pipeline((transformers, diffusers), tmp_path / "sd", "sd1", SCHEDULERS["sd"])
    channels, height, width = load_model(sd).image_shape
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.full((height, width), 255, np.uint8)
    mask[:, width // 2:] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    files = {"sd": sd, "img": tmp_path / "img.png", "mask": tmp_path / "mask.png"}
    prompt = '--prompt "a photo of a cat" --guidance-scale 3'
    for command in (f"img2img {{sd}} --image {{img}} --strength 0.6 --sampler ddim --steps 5 {prompt} --out {{out}}",
                    f"inpaint {{sd}} --image {{img}} --mask {{mask}} --method replacement --steps 3 {prompt} "
                    "--out {out}",
                    f"invert {{sd}} --image {{img}} --steps 3 {prompt} --out {{out}}"):
        code, out, err = run(command, files, tmp_path, capsys)
        assert code == 0, (command, err)
        assert written(out), command
    keep = torch.from_numpy(mask >= 128)
    result = read_image(tmp_path / "out" / "images" / "000000.png")  # the inpainting's (invert writes no images)
    assert torch.equal(result[:, keep], read_image(files["img"])[:, keep])
