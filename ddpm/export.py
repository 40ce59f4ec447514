"""Writing a trained model out: the diffusers layout (with a matching scheduler config) or ours.

A latent model is written as a pipeline's folders: ``unet/``, ``vae/`` (its autoencoder, with the
``scaling_factor`` it was trained with) and ``scheduler/``; :func:`ddpm.loading.load_model` reads
that back. A text-to-image model adds its text encoder: a frozen one's ``text_encoder/`` and
``tokenizer/`` copied as they were read, or ``text_encoder/`` in our format for the text transformer
a run trained (config.json, model.safetensors, tokenizer.json), which diffusers has no class for.
Where diffusers' ``StableDiffusionPipeline`` can run the model (a latent U-Net attending to a frozen
CLIP's tokens alone, as Stable Diffusion's does) a ``model_index.json`` makes the directory one
that its ``from_pretrained`` loads whole.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from ddpm.checkpoints import save_json
from ddpm.config import DiffusionConfig
from ddpm.errors import UserError
from ddpm.loading import LoadedModel
from ddpm.models import diffusers_io
from ddpm.models.diffusers_io import AUTOENCODER_KL, UNET2D, UNET2D_CONDITION
from ddpm.models.text_encoder import TextEncoder
from ddpm.models.text_to_image import TextToImage, takes_pooled
from ddpm.models.unet_2d_condition import ConditionalUNet
from ddpm.text import PIPELINE_INDEX, TEXT_ENCODER_FOLDER, TOKENIZER_FOLDER, CLIPTextEncoder, PretrainedTextEncoder

#: A transformers tokenizer's files, any of which is copied with a frozen encoder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "spiece.model")


def export_model(loaded: LoadedModel, out_dir: str | Path, fmt: str = "diffusers") -> list[Path]:
    """Write the model in the diffusers layout (with a matching ``scheduler_config.json``) or ours."""
    out_dir = Path(out_dir)
    if fmt not in ("diffusers", "ddpm"):
        raise UserError(f"unknown export format {fmt!r}; choose diffusers or ddpm")
    if loaded.conditioning is not None:
        if fmt != "diffusers":
            raise UserError("a text-to-image model is exported as a pipeline's folders only (unet/, text_encoder/, "
                            "scheduler/, ...); drop --format ddpm")
        return export_text_to_image(loaded, out_dir)
    if loaded.autoencoder is not None:
        if fmt != "diffusers":
            raise UserError("a latent model is exported in the diffusers layout only (unet/, vae/, scheduler/); "
                            "drop --format ddpm")
        return [*_unet_and_vae(loaded, loaded.model, out_dir), _scheduler(loaded, out_dir)]
    if fmt == "ddpm":
        loaded.model.save_pretrained(out_dir)
        return [out_dir]
    loaded.model.save_diffusers(out_dir)
    diffusers_io.write_scheduler(out_dir, scheduler_config(loaded.diffusion), pipeline=False)
    return [out_dir]


def export_text_to_image(loaded: LoadedModel, out_dir: Path) -> list[Path]:
    """A text-to-image model as a pipeline's folders: ``unet/``, ``vae/`` for a latent model,
    ``scheduler/``, the text encoder, and ``model_index.json`` where diffusers' pipeline runs it."""
    assert loaded.conditioning is not None
    unet = loaded.model.unet if isinstance(loaded.model, TextToImage) else loaded.model
    encoder = loaded.conditioning.encoder
    written = [*_unet_and_vae(loaded, unet, out_dir), _scheduler(loaded, out_dir)]
    if isinstance(encoder, PretrainedTextEncoder):
        written += copy_text_encoder(encoder, out_dir)
    else:
        encoder.save_pretrained(out_dir / TEXT_ENCODER_FOLDER)  # our text transformer, with its tokenizer
        written.append(out_dir / TEXT_ENCODER_FOLDER)
    index = stable_diffusion_index(loaded, unet, encoder)
    if index is not None:
        save_json(out_dir / PIPELINE_INDEX, index)
        written.append(out_dir / PIPELINE_INDEX)
    return written


def _unet_and_vae(loaded: LoadedModel, unet: Any, out_dir: Path) -> list[Path]:
    written = [out_dir / UNET2D.pipeline_folder]
    unet.save_diffusers(written[0])
    if loaded.autoencoder is not None:
        written.append(out_dir / AUTOENCODER_KL.pipeline_folder)
        loaded.autoencoder.save_diffusers(written[-1])
    return written


def _scheduler(loaded: LoadedModel, out_dir: Path) -> Path:
    """``scheduler/``: our diffusion as a ``DDPMScheduler`` (x̂_0 clipped for pixels only), with the
    DDIM options of the scheduler the model was read with, if any."""
    config = scheduler_config(loaded.diffusion, clip_sample=loaded.autoencoder is None)
    if loaded.ddim is not None:
        config.update(dataclasses.asdict(loaded.ddim))
    return diffusers_io.write_scheduler(out_dir, config, pipeline=True).parent


def copy_text_encoder(encoder: PretrainedTextEncoder, out_dir: Path) -> list[Path]:
    """A frozen encoder's files as it was read: its config and safetensors weights into
    ``text_encoder/``, its tokenizer's files into ``tokenizer/``."""
    if encoder.model_dir is None or encoder.tokenizer_dir is None:
        raise UserError("this text encoder was not read from a directory, so there are no files to export")
    model_files = [p for p in sorted(encoder.model_dir.iterdir())
                   if p.name in ("config.json", "model.safetensors.index.json") or p.suffix == ".safetensors"]
    tokenizer_files = [encoder.tokenizer_dir / name for name in TOKENIZER_FILES
                       if (encoder.tokenizer_dir / name).is_file()]
    written = []
    for folder, files in ((TEXT_ENCODER_FOLDER, model_files), (TOKENIZER_FOLDER, tokenizer_files)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, out_dir / folder / path.name)
        written.append(out_dir / folder)
    return written


def stable_diffusion_index(loaded: LoadedModel, unet: ConditionalUNet, encoder: TextEncoder) -> dict[str, Any] | None:
    """``StableDiffusionPipeline``'s ``model_index.json`` when that pipeline runs the model as we do
    (a latent U-Net attending to a frozen CLIP's last hidden states, with neither a pooled vector nor
    class labels); else None."""
    if (not isinstance(encoder, CLIPTextEncoder) or encoder.clip_skip is not None or loaded.autoencoder is None
            or takes_pooled(unet) or unet.config.num_class_embeds is not None):
        return None
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
        "unet": ["diffusers", UNET2D_CONDITION.class_name],
        "vae": ["diffusers", AUTOENCODER_KL.class_name],
    }


def scheduler_config(diffusion: DiffusionConfig, clip_sample: bool = True) -> dict[str, Any]:
    """diffusers' ``DDPMScheduler`` config for our diffusion (``clip_sample``: x̂_0 in [-1, 1], pixels only)."""
    return diffusers_io.scheduler_to_diffusers(**dataclasses.asdict(diffusion), clip_sample=clip_sample)
