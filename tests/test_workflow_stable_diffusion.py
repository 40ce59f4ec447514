"""Stable Diffusion from a local directory: tiny random pipelines saved by diffusers (SD-1's form:
1x1-convolution projections, ε; SD-2's: linear projections, per-level heads, upcast attention,
v-prediction, "!" padding), loaded by ddpm and sampled with every sampler; our images against
diffusers' StableDiffusionPipeline for the same x_T, prompts, negative prompt and DDIM steps, under
Stable Diffusion's own scheduler options (steps_offset 1, set_alpha_to_one false) and others; the
scheduler configs of Stable Diffusion's schedulers; the Python pipeline; user errors.

Everything is offline: the CLIP is the tiny random one of tests/test_text.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_text import WIDTH, save_tiny_clip

import ddpm
from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings
from ddpm.loading import load_model
from ddpm.models import ConditionalUNet
from ddpm.models.diffusers_io import DDIMOptions, ddim_options_from_diffusers, scheduler_from_diffusers
from ddpm.samplers import SAMPLERS
from ddpm.text import CLIPTextEncoder

# Measured max |ours - diffusers| over the images (in [0, 1]) of every case below: 1.4e-6 (float32
# in both; ours keeps the schedule in float64, diffusers in float32, and sums in another order).
ATOL = 1e-5
PROMPTS = ["a photo of a cat", "a dog on the left"]
NEGATIVE = "seven and three"
STEPS = 10
# Stable Diffusion's scheduler options (runwayml/stable-diffusion-v1-5's scheduler_config.json),
# the paper's DDIM (diffusers' defaults), and trailing spacing.
SCHEDULERS = {
    "sd": {"steps_offset": 1, "set_alpha_to_one": False},
    "paper": {},
    "trailing": {"timestep_spacing": "trailing", "set_alpha_to_one": False},
}
SLOW = pytest.mark.slow
SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def libraries():
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers and diffusers read the environment
    transformers = pytest.importorskip("transformers", reason="Stable Diffusion's CLIP comes from transformers")
    diffusers = pytest.importorskip("diffusers", reason="diffusers' pipeline is the reference")
    return transformers, diffusers


def save_pipeline(libraries, directory: Path, style: str, scheduler: dict) -> Path:
    """A tiny random StableDiffusionPipeline in SD-1's or SD-2's form, saved by diffusers."""
    transformers, diffusers = libraries
    clip = directory.parent / f"{directory.name}-clip"
    clip.mkdir()
    save_tiny_clip(transformers, clip, **({"pad_token": "!"} if style == "sd2" else {}))
    torch.manual_seed(0)
    form = ({"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}
            if style == "sd2" else {"attention_head_dim": 2})
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=8, **form)
    # scaling_factor 1: decode(z), whose pixels stay inside (0, 1), so that clamping hides nothing.
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=16,
                                  scaling_factor=1.0, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    prediction = "v_prediction" if style == "sd2" else "epsilon"
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=transformers.CLIPTextModel.from_pretrained(clip),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, scheduler=diffusers.DDIMScheduler(
            **SCALED_LINEAR, clip_sample=False, prediction_type=prediction, **scheduler))
    pipe.save_pretrained(directory)
    # As Stable Diffusion's, whose schedulers were written as PNDM's: fields DDIM does not read.
    path = directory / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "skip_prk_steps": True}))
    return directory


@pytest.fixture(scope="module")
def pipelines(libraries, tmp_path_factory):
    """``pipelines(style, scheduler)``: the directory of that tiny pipeline, built once."""
    built: dict[tuple[str, str], Path] = {}

    def get(style: str, scheduler: str = "sd") -> Path:
        if (style, scheduler) not in built:
            directory = tmp_path_factory.mktemp("pipelines") / f"{style}-{scheduler}"
            built[style, scheduler] = save_pipeline(libraries, directory, style, SCHEDULERS[scheduler])
        return built[style, scheduler]

    return get


def diffusers_images(libraries, directory: Path, latents, guidance_scale: float, negative: str | None) -> np.ndarray:
    _, diffusers = libraries
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(directory, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPTS, negative_prompt=None if negative is None else [negative] * len(PROMPTS),
                num_inference_steps=STEPS, guidance_scale=guidance_scale, latents=latents.clone(), eta=0.0,
                output_type="np").images


# --- against diffusers ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("guidance_scale,negative", [(1.0, None), (7.5, NEGATIVE)])
@pytest.mark.parametrize("style,scheduler", [("sd1", "sd"), ("sd2", "sd"), pytest.param("sd1", "paper", marks=SLOW),
                                             pytest.param("sd2", "trailing", marks=SLOW)])
def test_our_images_equal_stable_diffusion_pipelines(libraries, pipelines, style, scheduler, guidance_scale,
                                                     negative):
    directory = pipelines(style, scheduler)
    pipe = ddpm.load_pipeline(directory)
    latents = pipe.initial_latents(len(PROMPTS), seed=0)
    ours = pipe.generate(PROMPTS, negative, sampler="ddim", steps=STEPS, guidance_scale=guidance_scale,
                         latents=latents)
    theirs = diffusers_images(libraries, directory, latents, guidance_scale, negative)
    ours01 = ((ours.images + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert ours01.shape == theirs.shape == (2, 16, 16, 3)
    assert ((theirs > 0) & (theirs < 1)).mean() > 0.95  # not a comparison of clamped values
    assert np.abs(ours01 - theirs).max() <= ATOL
    # The uint8 images: the same rounding (x · 255) in both, so at most one level where a value sits
    # on a rounding boundary.
    uint8 = pipe(PROMPTS, negative, sampler="ddim", steps=STEPS, guidance_scale=guidance_scale, latents=latents)
    assert uint8.dtype == np.uint8 and uint8.shape == (2, 16, 16, 3)
    assert np.abs(uint8.astype(int) - (theirs * 255).round().astype(int)).max() <= 1


@pytest.mark.slow
def test_the_scheduler_options_and_the_negative_prompt_change_the_images(pipelines):
    """The cases above could not all agree by accident: each option moves the images by far more than ATOL."""
    def images(scheduler: str, negative: str | None = None, guidance_scale: float = 1.0) -> np.ndarray:
        pipe = ddpm.load_pipeline(pipelines("sd1", scheduler))
        return pipe.generate(PROMPTS, negative, sampler="ddim", steps=STEPS, guidance_scale=guidance_scale,
                             latents=pipe.initial_latents(2)).images.numpy()

    sd, paper = images("sd"), images("paper")
    assert np.abs(sd - paper).max() > 100 * ATOL  # steps_offset and the final alpha-bar
    assert np.abs(images("sd", NEGATIVE, 7.5) - images("sd", None, 7.5)).max() > 100 * ATOL
    assert np.abs(images("sd", None, 7.5) - sd).max() > 100 * ATOL


@pytest.mark.parametrize("spacing,offset,steps", [("leading", 1, 50), ("leading", 0, 30), ("leading", 3, 7),
                                                  ("trailing", 0, 30), ("trailing", 0, 7), ("linspace", 0, 30),
                                                  ("linspace", 0, 1), ("leading", 1, 1000 // 3)])
def test_ddim_timesteps_are_diffusers_set_timesteps(libraries, spacing, offset, steps):
    _, diffusers = libraries
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    options = ddim_options_from_diffusers(dict(scheduler.config))
    assert options.timesteps(1000, steps) == sorted(scheduler.timesteps.tolist())


def test_a_leading_offset_past_the_last_timestep_is_one_user_error():
    with pytest.raises(UserError, match="past T - 1 = 999"):
        DDIMOptions("leading", 1, True).timesteps(1000, 1000)


# --- what is loaded, and every sampler -----------------------------------------------------------


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_a_stable_diffusion_directory_loads_as_unet_vae_clip_and_scheduler(pipelines, style):
    directory = pipelines(style)
    loaded = load_model(directory)
    assert type(loaded.model) is ConditionalUNet and loaded.model.config.use_linear_projection == (style == "sd2")
    assert loaded.autoencoder is not None and loaded.autoencoder.config.scaling_factor == 1.0
    assert isinstance(loaded.conditioning.encoder, CLIPTextEncoder) and loaded.conditioning.pooled is False
    assert loaded.diffusion.schedule == "scaled_linear" and loaded.diffusion.timesteps == 1000
    assert loaded.diffusion.mean_type == ("v" if style == "sd2" else "eps")
    assert loaded.ddim == DDIMOptions("leading", 1, False)
    assert loaded.image_shape == (3, 16, 16)
    settings = loaded.sampler_settings(SamplerSettings("ddim", 4))
    assert settings.timesteps == (1, 251, 501, 751)
    assert settings.final_alpha_cumprod == pytest.approx(1 - 0.00085)
    # Our own spacing when asked for one, and the other samplers untouched.
    assert loaded.sampler_settings(SamplerSettings("ddim", 4, spacing="trailing")).timesteps is None
    assert loaded.sampler_settings(SamplerSettings("unipc", 4)) == SamplerSettings("unipc", 4)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_draws_from_a_stable_diffusion_directory(pipelines, sampler):
    pipe = ddpm.load_pipeline(pipelines("sd2"))
    steps = None if sampler == "dpm-adaptive" else 3
    images = pipe("a cat", NEGATIVE, num_images=2, sampler=sampler, steps=steps, guidance_scale=7.5, seed=1)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3) and images.std() > 0


def test_a_seed_is_reproduced_from_its_latents(pipelines):
    pipe = ddpm.load_pipeline(pipelines("sd1"))
    drawn = pipe(PROMPTS, num_images=2, sampler="ddim", steps=3, seed=5)  # [p0, p0, p1, p1]
    again = pipe(PROMPTS, num_images=2, sampler="ddim", steps=3, latents=pipe.initial_latents(4, seed=5))
    np.testing.assert_array_equal(drawn, again)
    assert pipe.generate(PROMPTS, num_images=2, steps=3).prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    # Image i of a seed is the same alone or in a batch.
    np.testing.assert_array_equal(pipe(PROMPTS[0], sampler="ddim", steps=3, seed=5)[0], drawn[0])


@pytest.mark.slow
def test_ddpm_sample_on_a_stable_diffusion_directory(pipelines, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", str(pipelines("sd1")), "--out", str(out), "--prompt", "a photo of a cat", "--prompt",
                 "a dog", "--negative-prompt", NEGATIVE, "--guidance-scale", "7.5", "--sampler", "ddim", "--steps",
                 "3", "--num-images", "2", "--pngs", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "diffusers pipeline" in printed and "CLIPTextEncoder, frozen" in printed
    assert "2 images with ddim: 3 network evaluations each" in printed
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert (out / "prompts.txt").read_text() == "a photo of a cat\na dog\n"


# --- scheduler configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "HeunDiscreteScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_stable_diffusions_schedulers_give_its_process(libraries, name, prediction):
    _, diffusers = libraries
    scheduler = getattr(diffusers, name)(**SCALED_LINEAR, prediction_type=prediction, steps_offset=1)
    values = {"_class_name": name, **scheduler.config}
    expected = {"timesteps": 1000, "schedule": "scaled_linear", "mean_type": "eps" if prediction == "epsilon" else "v",
                "var_type": "fixed_small"}
    assert scheduler_from_diffusers(values) == expected


@pytest.mark.parametrize("change,message", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "not a scheduler of DDPM's discrete process"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
    ({"trained_betas": [0.1, 0.2]}, "unsupported trained_betas"),
    ({"rescale_betas_zero_snr": True}, "unsupported rescale_betas_zero_snr=True"),
    ({"beta_end": 0.02}, "only latent diffusion's scaled_linear schedule"),
    ({"timestep_spacing": "karras"}, "timestep_spacing 'karras' is not leading, trailing or linspace"),
])
def test_an_unsupported_scheduler_is_one_line(pipelines, tmp_path, capsys, change, message):
    directory = tmp_path / "sd"
    shutil.copytree(pipelines("sd1"), directory)
    path = directory / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert main(["sample", str(directory), "--out", str(tmp_path / "out"), "--prompt", "a cat", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "scheduler_config.json" in err[0]
    assert not (tmp_path / "out").exists()


# --- user errors ---------------------------------------------------------------------------------


def without(source: Path, destination: Path, *names: str) -> Path:
    shutil.copytree(source, destination)
    for name in names:
        target = destination / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return destination


@pytest.mark.parametrize("removed,message", [
    (["text_encoder"], "the pipeline has no text_encoder/ folder"),
    (["vae"], "the pipeline has no vae/ folder"),
    (["tokenizer"], "the pipeline has no tokenizer/ folder"),
    (["scheduler"], "the pipeline has no scheduler/ folder"),
    (["unet"], "the pipeline has no unet/ folder"),
    (["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json"],
     "a CLIP tokenizer needs vocab.json and merges.txt or tokenizer.json"),
])
def test_an_incomplete_pipeline_is_one_user_error(pipelines, tmp_path, removed, message):
    directory = without(pipelines("sd1"), tmp_path / "sd", *removed)
    with pytest.raises(UserError, match=message):
        load_model(directory)


def test_a_half_precision_variant_alone_is_one_user_error(pipelines, tmp_path):
    directory = without(pipelines("sd1"), tmp_path / "sd")
    weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(UserError, match="only the variant diffusion_pytorch_model.fp16.safetensors"):
        load_model(directory)


def test_a_prompt_for_an_unconditional_model_and_a_label_for_a_text_model_are_user_errors(pipelines, tmp_path, jitter):
    from ddpm.models import UNet, get_preset

    unconditional = tmp_path / "unet"
    jitter(UNet(get_preset("tiny"))).save_diffusers(unconditional)
    with pytest.raises(UserError, match="--prompt needs a text-conditional model; this one is unconditional"):
        ddpm.load_pipeline(unconditional)("a cat", steps=2)
    assert ddpm.load_pipeline(unconditional)(num_images=2, steps=2).shape == (2, 8, 8, 3)
    with pytest.raises(UserError, match="--label needs a class-conditional model; this one is text-conditional"):
        ddpm.load_pipeline(pipelines("sd1"))("a cat", label=3, steps=2)
    with pytest.raises(UserError, match=r"latents must be \[1, 4, 8, 8\]"):
        ddpm.load_pipeline(pipelines("sd1"))("a cat", steps=2, latents=torch.zeros(1, 4, 4, 4))
