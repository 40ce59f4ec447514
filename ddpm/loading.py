"""Loading a trained model from wherever it lives, with the diffusion it was trained with.

A model can come from a run directory (its newest checkpoint), one checkpoint directory, a
directory saved by :meth:`UNet.save_pretrained`, or a diffusers-layout directory such as the
paper's published weights (``google/ddpm-cifar10-32``: ``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``, with an optional ``scheduler_config.json``).
A latent model comes with its autoencoder: the one its run's ``data.autoencoder`` names, or a
pipeline directory's ``vae/`` beside its ``unet/`` (what ``ddpm export`` writes for it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddpm import checkpoints
from ddpm.conditioning import TextPrompts, frozen_text_encoder, prompts_of, run_network
from ddpm.config import DiffusionConfig, RunConfig
from ddpm.errors import UserError
from ddpm.latent import load_autoencoder, pixel_size
from ddpm.models import diffusers_io
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.diffusers_io import AUTOENCODER_KL, UNET2D
from ddpm.models.io import read_format
from ddpm.models.unet import UNet
from ddpm.models.video_unet import VideoUNet
from ddpm.runtime import num_parameters
from ddpm.tokenizer import WordTokenizer


@dataclass
class LoadedModel:
    """A network with the diffusion it was trained with, and the autoencoder of a latent model."""

    model: nn.Module  # a network of ddpm.models.NETWORKS
    diffusion: DiffusionConfig
    description: str
    run_config: RunConfig | None = None
    autoencoder: AutoencoderKL | None = None
    #: For a text-conditional model: what turns prompts into its arguments (generate's ``conditioning``).
    conditioning: TextPrompts | None = None

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the images the model draws (through the autoencoder for a latent model)."""
        shape = tuple(self.model.sample_shape)
        if self.autoencoder is None:
            return shape
        f = self.autoencoder.config.downsampling_factor
        return (self.autoencoder.config.out_channels, *(side * f for side in shape[1:]))


def load_model(source: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model for sampling or evaluation from a run, checkpoint, pretrained or diffusers directory.

    ``weights`` picks the EMA weights (``"ema"``, what the paper samples from) or the raw ones
    (``"raw"``) of a training checkpoint; other sources have only one set.
    """
    if weights not in ("ema", "raw"):
        raise UserError(f"--weights must be ema or raw, got {weights!r}")
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such run, checkpoint or model directory")
    if path.is_file():
        raise UserError(f"{path} is a file; pass the directory that holds it (a run, checkpoint or model directory)")
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file() and _is_run_config(path / "config.json"):
        found = checkpoints.latest_training_checkpoint(path / "checkpoints")
        if found is None:
            raise UserError(f"{path} has no readable checkpoint yet (checkpoints/step_*)")
        return _from_checkpoint(*found, weights, device)
    if (path / checkpoints.CHECKPOINT_META).is_file():
        return _from_checkpoint(path, checkpoints.load_training_checkpoint(path), weights, device)
    autoencoder = None
    unet_dir, vae_dir = path / UNET2D.pipeline_folder, path / AUTOENCODER_KL.pipeline_folder
    if not (path / "config.json").is_file() and (unet_dir / "config.json").is_file():  # a diffusers pipeline
        if (vae_dir / "config.json").is_file():
            autoencoder = load_autoencoder(vae_dir, device)
        path = unet_dir
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a run, checkpoint or model directory (no config.json, no checkpoints/)")
    if diffusers_io.class_name(path) == UNET2D.class_name:
        model = UNet.from_diffusers(path, device=device)
        if autoencoder is not None:
            pixel_size(model.sample_shape, autoencoder.config, vae_dir)
        return LoadedModel(model.eval(), diffusion_from_diffusers(path), f"diffusers model {path}",
                           autoencoder=autoencoder)
    network = VideoUNet if read_format(path) == VideoUNet.FORMAT else UNet
    model = network.from_pretrained(path, device=device)
    return LoadedModel(model.eval(), DiffusionConfig(), f"model {path}")


def _is_run_config(path: Path) -> bool:
    values = checkpoints.load_json(path)
    return isinstance(values, dict) and {"model", "diffusion", "train"} <= set(values)


def _from_checkpoint(path: Path, ckpt: checkpoints.TrainingCheckpoint, weights: str,
                     device: str | torch.device) -> LoadedModel:
    if "loss" in ckpt.meta["config"]:  # the autoencoder's run configuration (ddpm.train_autoencoder)
        raise UserError(f"{path} is an autoencoder's checkpoint ('ddpm train-autoencoder'), which draws no images; "
                        "train a U-Net on its latents with 'ddpm train --autoencoder RUN'")
    config = RunConfig.from_dict(ckpt.meta["config"])
    tokenizer = WordTokenizer(ckpt.meta["tokenizer"]) if "tokenizer" in ckpt.meta else None
    model = run_network(config, tokenizer)
    group = "ema" if weights == "ema" else "model"
    model.load_weights(ckpt.group(group), source=path / f"{group}.safetensors")
    description = f"{path} (step {ckpt.meta['step']}, {weights} weights)"
    autoencoder = None
    if config.data.autoencoder:
        autoencoder = load_autoencoder(config.data.autoencoder, device)
        pixel_size(config.model.sample_shape, autoencoder.config, config.data.autoencoder)
    model = model.to(device).eval()
    conditioning = None
    if config.text_conditional:
        frozen = frozen_text_encoder(config, model, device) if config.data.text_encoder else None
        conditioning = prompts_of(model, frozen)
    return LoadedModel(model, config.diffusion, description, config, autoencoder, conditioning)


def diffusion_from_diffusers(path: Path) -> DiffusionConfig:
    """Our diffusion for the diffusers scheduler config beside the model at ``path`` (or in its
    pipeline's ``scheduler/``), or the paper's default when there is none; the supported schedules
    are those of :func:`ddpm.models.diffusers_io.scheduler_from_diffusers`."""
    found = diffusers_io.find_scheduler_config(path)
    if found is None:
        return DiffusionConfig()  # the paper's: linear, T = 1000, ε, σ² = β̃
    return DiffusionConfig(**diffusers_io.scheduler_from_diffusers(checkpoints.load_json(found), found))


def describe_run(loaded: LoadedModel) -> str:
    """A one-paragraph summary of what was loaded, for the CLI to print."""
    d = loaded.diffusion
    n_params = num_parameters(loaded.model)
    channels, *size = loaded.model.sample_shape
    shape = "x".join(map(str, [*size[-2:], channels]))
    if isinstance(loaded.model, VideoUNet):
        shape = f"{size[0]} frames of {shape}"
    classes = f", {loaded.num_classes} classes" if loaded.num_classes else ""
    latent = ""
    if loaded.autoencoder is not None:
        ae = loaded.autoencoder.config
        image_channels, *image_size = loaded.image_shape
        latent = (f" latents of a {num_parameters(loaded.autoencoder):,}-parameter autoencoder "
                  f"(f={ae.downsampling_factor}, scaling_factor {ae.scaling_factor:.4g}) for "
                  f"{'x'.join(map(str, [*image_size, image_channels]))} images")
    text = ""
    if loaded.conditioning is not None:
        encoder = loaded.conditioning.encoder
        kind = "trained with it" if encoder.trainable else "frozen"
        text = f", text-conditional ({type(encoder).__name__}, {kind}, context {encoder.context_length})"
    return (f"{loaded.description}: {n_params:,} parameters, {shape}{latent}{classes}{text}; "
            f"diffusion {json.dumps(dataclasses.asdict(d))}")
