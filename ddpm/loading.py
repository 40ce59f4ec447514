"""Loading a trained model from wherever it lives, with the diffusion it was trained with.

A model can come from a run directory (its newest checkpoint), one checkpoint directory, a
directory saved by :meth:`UNet.save_pretrained`, or a diffusers-layout directory such as the
paper's published weights (``google/ddpm-cifar10-32``: ``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``, with an optional ``scheduler_config.json``).
A latent model comes with its autoencoder: the one its run's ``data.autoencoder`` names, or a
pipeline directory's ``vae/`` beside its ``unet/`` (what ``ddpm export`` writes for it).

A diffusers pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``, and for a latent
model ``vae/``) is read whole: Stable Diffusion 1.x/2.x's (``unet/`` a ``UNet2DConditionModel``, with
``text_encoder/`` and ``tokenizer/``: a frozen CLIP) and what ``ddpm export`` writes for a
text-to-image run (the same folders, or ``text_encoder/`` in our text transformer's format). The
scheduler config gives the diffusion (:func:`ddpm.models.diffusers_io.scheduler_from_diffusers`) and
the DDIM options it sets (:class:`ddpm.models.diffusers_io.DDIMOptions`); a safety checker or
feature extractor folder is not read.
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
from ddpm.generate import SamplerSettings
from ddpm.latent import load_autoencoder, pixel_size
from ddpm.models import ConditionalUNet, diffusers_io
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.diffusers_io import AUTOENCODER_KL, UNET2D, UNET2D_CONDITION, DDIMOptions
from ddpm.models.io import read_format
from ddpm.models.text_to_image import TextToImage, check_fit
from ddpm.models.text_transformer import TextTransformer
from ddpm.models.unet import UNet
from ddpm.models.video_unet import VideoUNet
from ddpm.runtime import num_parameters
from ddpm.samplers import default_steps
from ddpm.text import PIPELINE_INDEX, TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER, load_text_encoder
from ddpm.tokenizer import WordTokenizer

#: The folders of a diffusers pipeline that ddpm reads (Stable Diffusion's others, safety_checker/
#: and feature_extractor/, are not).
PIPELINE_FOLDERS = (UNET2D.pipeline_folder, AUTOENCODER_KL.pipeline_folder, TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER,
                    diffusers_io.SCHEDULER_FOLDER)


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
    #: For a diffusers model whose scheduler config sets them: the timesteps and final ᾱ of its DDIM.
    ddim: DDIMOptions | None = None

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

    def sampler_settings(self, settings: SamplerSettings) -> SamplerSettings:
        """``settings`` with the timesteps and the final ᾱ of diffusers' ``DDIMScheduler`` for this
        model's scheduler config (:attr:`ddim`) filled in, for the ddim sampler without a spacing of
        its own; any other settings unchanged. So ``--sampler ddim`` on a Stable Diffusion directory
        is ``DDIMScheduler.from_config(its scheduler config)``, steps_offset and set_alpha_to_one
        included."""
        if self.ddim is None or settings.sampler != "ddim" or settings.spacing or settings.timesteps:
            return settings
        diffusion = self.diffusion.build()
        T = diffusion.num_timesteps
        steps = default_steps("ddim", T) if settings.steps is None else settings.steps
        return dataclasses.replace(settings, steps=steps, timesteps=tuple(self.ddim.timesteps(T, steps)),
                                   final_alpha_cumprod=self.ddim.final_alpha_cumprod(diffusion.alphas_cumprod))


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
    if not (path / "config.json").is_file() and (
            (path / PIPELINE_INDEX).is_file() or (path / UNET2D.pipeline_folder / "config.json").is_file()):
        return _from_pipeline(path, device)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a run, checkpoint or model directory (no config.json, no checkpoints/)")
    if diffusers_io.class_name(path) == UNET2D.class_name:
        diffusion, ddim = scheduler_of(path)
        return LoadedModel(UNet.from_diffusers(path, device=device).eval(), diffusion, f"diffusers model {path}",
                           ddim=ddim)
    network = VideoUNet if read_format(path) == VideoUNet.FORMAT else UNet
    model = network.from_pretrained(path, device=device)
    return LoadedModel(model.eval(), DiffusionConfig(), f"model {path}")


def check_pipeline(path: Path) -> None:
    """:class:`UserError` for a pipeline directory without ``unet/``, or without a folder that its
    ``model_index.json`` lists (a download cut short)."""
    listed = [UNET2D.pipeline_folder]
    if (path / PIPELINE_INDEX).is_file():
        index = checkpoints.load_json(path / PIPELINE_INDEX)
        if not isinstance(index, dict):
            raise UserError(f"{path / PIPELINE_INDEX}: not a diffusers model_index.json (not a JSON object)")
        # A component diffusers leaves out is [null, null].
        listed += [name for name in PIPELINE_FOLDERS if isinstance(index.get(name), list) and any(index[name])]
    for name in dict.fromkeys(listed):
        if not (path / name).is_dir():
            raise UserError(f"{path}: the pipeline has no {name}/ folder (an incomplete download? "
                            f"'huggingface-cli download REPO --local-dir DIR' fetches every folder)")


def _from_pipeline(path: Path, device: str | torch.device) -> LoadedModel:
    """A diffusers pipeline directory: its U-Net, scheduler, autoencoder (``vae/``) and text encoder."""
    check_pipeline(path)
    unet_dir, vae_dir = path / UNET2D.pipeline_folder, path / AUTOENCODER_KL.pipeline_folder
    autoencoder = load_autoencoder(vae_dir, device) if vae_dir.is_dir() else None
    diffusion, ddim = scheduler_of(unet_dir)
    conditioning = None
    if diffusers_io.class_name(unet_dir) == UNET2D_CONDITION.class_name:
        model, conditioning = _text_to_image(path, ConditionalUNet.from_diffusers(unet_dir, device), device)
        if autoencoder is not None and autoencoder.config.latent_channels != model.sample_shape[0]:
            raise UserError(f"{unet_dir}: in_channels {model.sample_shape[0]} are not the "
                            f"{autoencoder.config.latent_channels} latent channels of {vae_dir}")
    else:
        model = UNet.from_diffusers(unet_dir, device=device)
        if autoencoder is not None:
            pixel_size(model.sample_shape, autoencoder.config, vae_dir)
    return LoadedModel(model.eval(), diffusion, f"diffusers pipeline {path}", autoencoder=autoencoder,
                       conditioning=conditioning, ddim=ddim)


def _text_to_image(path: Path, unet: ConditionalUNet, device: str | torch.device) -> tuple[nn.Module, TextPrompts]:
    """The network and the prompts' conditioning of a text-conditional pipeline: our text transformer
    (``ddpm export`` of a run that trained it) with the U-Net as one :class:`TextToImage`, or the
    U-Net alone with a frozen encoder from ``text_encoder/`` and ``tokenizer/``."""
    encoder_dir = path / TEXT_ENCODER_FOLDER
    if not encoder_dir.is_dir():
        raise UserError(f"{path}: its unet/ is text-conditional (a {UNET2D_CONDITION.class_name}), but the pipeline "
                        f"has no {TEXT_ENCODER_FOLDER}/ folder")
    if read_format(encoder_dir) == TextTransformer.FORMAT:
        network = TextToImage(unet, TextTransformer.from_pretrained(encoder_dir, device))
        return network, prompts_of(network, None)
    if not (path / TOKENIZER_FOLDER).is_dir():
        raise UserError(f"{path}: the pipeline has no {TOKENIZER_FOLDER}/ folder beside {TEXT_ENCODER_FOLDER}/")
    encoder = load_text_encoder(encoder_dir, device)
    check_fit(unet, encoder, str(encoder_dir))
    return unet, prompts_of(unet, encoder)


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
    return scheduler_of(path)[0]


def scheduler_of(path: Path) -> tuple[DiffusionConfig, DDIMOptions | None]:
    """:func:`diffusion_from_diffusers` and the DDIM options the scheduler config sets (None when it
    sets none of ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``: our own DDIM spacing)."""
    found = diffusers_io.find_scheduler_config(path)
    if found is None:
        return DiffusionConfig(), None  # the paper's: linear, T = 1000, ε, σ² = β̃
    values = checkpoints.load_json(found)
    if not isinstance(values, dict):
        raise UserError(f"{found}: not a diffusers scheduler config (not a JSON object)")
    diffusion = DiffusionConfig(**diffusers_io.scheduler_from_diffusers(values, found))
    sets = {"timestep_spacing", "steps_offset", "set_alpha_to_one"} & set(values)
    return diffusion, diffusers_io.ddim_options_from_diffusers(values, found) if sets else None


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
