"""Text-to-image runs out and back in: ``ddpm export`` of a run that trained its own text transformer
(unet/, scheduler/, text_encoder/ in our format; diffusers loads the U-Net, no model_index) and of a
latent run on a frozen CLIP (a whole StableDiffusionPipeline directory, which diffusers loads and
samples as we do); the exported directories read back by load_model and load_pipeline with the same
images; the Python pipeline on class-conditional and unconditional models.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_text import WIDTH, save_tiny_clip
from test_workflow_stable_diffusion import SCHEDULERS, save_pipeline
from test_workflow_text import CAPTIONS, write_bars

import ddpm
from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.loading import load_model
from ddpm.models import UNet, get_preset
from ddpm.models.text_to_image import TextToImage
from ddpm.models.text_transformer import TextTransformer
from ddpm.train_autoencoder import get_config as ae_config
from ddpm.train_autoencoder import train_autoencoder

QUIET = {"progress": False, "log": lambda message: None}
SHORT = ["--train.steps", "2", "--train.sample_every", "0", "--train.ckpt_every", "2", "--quiet"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    return write_bars(tmp_path_factory.mktemp("text") / "bars", 16)


@pytest.fixture(scope="module")
def libraries():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers", reason="the frozen CLIP comes from transformers")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference")
    return transformers, diffusers


@pytest.fixture(scope="module")
def text_run(captioned, tmp_path_factory) -> Path:
    """tiny-text: GLIDE's recipe, the U-Net with its own text transformer, in pixels."""
    run = tmp_path_factory.mktemp("text") / "run"
    assert main(["train", "--preset", "tiny-text", "--data", str(captioned), "--out", str(run), *SHORT]) == 0
    return run


@pytest.fixture(scope="module")
def clip_latent_run(libraries, captioned, tmp_path_factory) -> Path:
    """Stable Diffusion's recipe at the least cost: a frozen CLIP, the tiny autoencoder's latents."""
    root = tmp_path_factory.mktemp("clip-latent")
    clip = save_tiny_clip(libraries[0], root)
    autoencoder = root / "ae"
    train_autoencoder(ae_config("tiny", {"data.source": str(captioned), "train.steps": "2"}), autoencoder, **QUIET)
    run = root / "run"
    # Stable Diffusion's U-Net attends to the tokens only: no pooled vector added to the time embedding.
    assert main(["train", "--preset", "tiny-text-latent", "--data", str(captioned), "--autoencoder", str(autoencoder),
                 "--data.text_encoder", str(clip), "--model.cross_attention_dim", str(WIDTH),
                 "--model.class_embed_type", "none", "--model.projection_class_embeddings_input_dim", "none",
                 "--out", str(run), *SHORT]) == 0
    return run


def same_images(a: Path, b: Path, **options) -> np.ndarray:
    """The images of the pipelines at ``a`` and ``b`` for the same call, asserted equal."""
    first = ddpm.load_pipeline(a)(**options)
    np.testing.assert_array_equal(first, ddpm.load_pipeline(b)(**options))
    return first


def assert_diffusers_loads_the_unet(diffusers, unet_dir: Path) -> None:
    _, info = diffusers.UNet2DConditionModel.from_pretrained(unet_dir, output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.slow
def test_a_run_with_its_own_text_transformer_exports_and_reads_back(libraries, text_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(text_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scheduler", "text_encoder", "unet"]  # no model_index
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors",
                                                                          "tokenizer.json"]
    assert_diffusers_loads_the_unet(libraries[1], out / "unet")
    loaded = load_model(out)
    assert isinstance(loaded.model, TextToImage) and isinstance(loaded.conditioning.encoder, TextTransformer)
    images = same_images(text_run, out, prompt=CAPTIONS[:2], num_images=2, guidance_scale=2.0, steps=4, seed=3)
    assert images.shape == (4, 8, 8, 3)
    assert main(["export", str(text_run), "--out", str(tmp_path / "x"), "--format", "ddpm"]) == 2


@pytest.mark.slow
def test_a_frozen_clip_latent_run_exports_a_stable_diffusion_pipeline(libraries, clip_latent_run, tmp_path):
    _, diffusers = libraries
    out = tmp_path / "export"
    assert main(["export", str(clip_latent_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "unet", "vae"]
    assert_diffusers_loads_the_unet(diffusers, out / "unet")
    images = same_images(clip_latent_run, out, prompt=CAPTIONS[0], num_images=2, guidance_scale=3.0,
                         negative_prompt="a dog", sampler="ddim", steps=5)
    # diffusers loads the whole directory and, with DDIM swapped in, draws what we draw.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = ddpm.load_pipeline(out)
    latents = ours.initial_latents(2)
    theirs = pipe(prompt=CAPTIONS[0], negative_prompt="a dog", num_images_per_prompt=2, guidance_scale=3.0,
                  num_inference_steps=5, latents=latents.clone(), output_type="np").images
    np.testing.assert_allclose((images / 255.0), theirs, atol=1 / 255 + 1e-6)
    drawn = ours.generate(CAPTIONS[0], "a dog", 2, sampler="ddim", steps=5, guidance_scale=3.0, latents=latents)
    assert np.abs(((drawn.images + 1) / 2).permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-5


@pytest.mark.slow
def test_a_stable_diffusion_directory_exports_to_one_diffusers_loads(libraries, tmp_path):
    """Load and export again: the same folders and options, and the same images."""
    _, diffusers = libraries
    source = save_pipeline(libraries, tmp_path / "sd", "sd1", SCHEDULERS["sd"])
    out = tmp_path / "export"
    assert main(["export", str(source), "--out", str(out)]) == 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["steps_offset"], config["set_alpha_to_one"], config["timestep_spacing"]) == (1, False, "leading")
    assert diffusers.StableDiffusionPipeline.from_pretrained(out).tokenizer.model_max_length == 16
    same_images(source, out, prompt="a cat", guidance_scale=7.5, sampler="ddim", steps=3)


@pytest.mark.slow
def test_the_pipeline_draws_from_class_and_unconditional_models(jitter, tmp_path):
    torch.manual_seed(0)
    jitter(UNet(get_preset("tiny"))).save_pretrained(tmp_path / "unconditional")
    conditional = UNet(dataclasses.replace(get_preset("tiny"), num_classes=4))
    jitter(conditional).save_pretrained(tmp_path / "classes")
    pipe = ddpm.load_pipeline(tmp_path / "classes")
    labelled = pipe.generate(num_images=3, label=2, steps=2, guidance_scale=2.0)
    assert labelled.labels.tolist() == [2, 2, 2]
    assert pipe(num_images=3, steps=2).shape == (3, 8, 8, 3)  # the classes in turn
    with pytest.raises(UserError, match="--label 7 is out of range"):
        pipe(label=7, steps=2)
    unconditional = ddpm.load_pipeline(tmp_path / "unconditional")
    assert unconditional(num_images=2, sampler="ddpm", steps=5).dtype == np.uint8
    with pytest.raises(UserError, match="--label needs a class-conditional model"):
        unconditional(label=1)
