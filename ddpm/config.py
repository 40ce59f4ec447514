"""Run configuration: a tree of dataclasses, named presets, and overrides from the command line.

A run is described by a :class:`RunConfig` with four sections: ``model`` (the U-Net's
:class:`~ddpm.models.unet.UNetConfig`), ``diffusion``, ``data`` and ``train``. A preset is data
(a dict of section overrides on top of the defaults), and any field can be overridden by a
``section.field=value`` string, which is what the CLI's ``--section.field value`` options produce.
The resolved configuration is printed and saved as ``config.json`` with every run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ddpm.diffusion import MEAN_TYPES, VAR_TYPES, GaussianDiffusion
from ddpm.errors import UserError, check_choice, check_positive
from ddpm.losses import LOSS_TYPES
from ddpm.models import ConditionalUNetConfig, network_config_type
from ddpm.models.presets import get_preset
from ddpm.models.text_transformer import TextTransformerConfig
from ddpm.models.unet import UNetConfig
from ddpm.models.video_unet import VIDEO_PRESETS
from ddpm.samplers import DEFAULT_NFE, DEFAULT_SAMPLER, SAMPLERS
from ddpm.schedules import SCHEDULES, get_betas
from ddpm.timestep_sampling import TIMESTEP_SAMPLERS


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process.

    Attributes:
        timesteps: T, the number of diffusion steps (1000 in the paper).
        schedule: the noise schedule, linear (DDPM), cosine (Improved DDPM) or scaled_linear (latent diffusion).
        mean_type: what the network predicts: eps (DDPM), x0, or v.
        var_type: the reverse variance: fixed_small (β̃), fixed_large (β) or learned_range (Improved DDPM).
    """

    timesteps: int = 1000
    schedule: str = "linear"
    mean_type: str = "eps"
    var_type: str = "fixed_small"

    def __post_init__(self) -> None:
        check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        check_choice("diffusion.mean_type", self.mean_type, MEAN_TYPES)
        check_choice("diffusion.var_type", self.var_type, VAR_TYPES)
        check_positive("diffusion.timesteps", self.timesteps)

    def build(self) -> GaussianDiffusion:
        """The :class:`GaussianDiffusion` this configuration describes."""
        return GaussianDiffusion(get_betas(self.schedule, self.timesteps), self.mean_type, self.var_type)


@dataclass(frozen=True)
class DataConfig:
    """The training data.

    Attributes:
        source: a folder of images, an .npz with x_train/y_train, a torchvision name (mnist, cifar10, ...) or digits.
        split: which split to train on (train or test).
        limit: use at most this many images (0: all).
        flip: random horizontal flips (the paper's CIFAR-10 recipe; off for digits).
        root: where torchvision data sets are downloaded (default ~/.cache/ddpm/datasets or $DDPM_DATA_DIR).
        autoencoder: a trained autoencoder (a 'ddpm train-autoencoder' run or a diffusers AutoencoderKL
            directory): the U-Net learns its scaled latents instead of pixels (latent diffusion).
        caption_column: the field of a folder's metadata.jsonl that holds the captions.
        text_encoder: a frozen text encoder (a local CLIP or T5 directory, or a Stable Diffusion pipeline's)
            for a text-to-image run; empty: the run trains its own small one (the text section).
        stream: read the images from disk as they are trained on (true), hold them in memory (false), or
            stream a folder only when it would not fit in memory (auto); WebDataset shards always stream.
        workers: DataLoader worker processes that decode streamed images (0: the training process itself);
            a shard stream's order depends on it, a folder's does not.
        shard_shuffle: a shard stream shuffles each run of this many consecutive samples of a shard (0: none).
        cache: where the latents and caption embeddings of streamed data are written once (empty: the run
            directory's cache/); keyed by the data and the model, so one folder can serve many runs.
        image_frames: a video run's joint training (VDM section 3): this many independent frames appended
            to every clip as images, their temporal attention masked (0: videos only).
    """

    source: str = ""
    split: str = "train"
    limit: int = 0
    flip: bool = True
    root: str = ""
    autoencoder: str = ""
    caption_column: str = "text"
    text_encoder: str = ""
    stream: bool | None = None
    workers: int = 2
    shard_shuffle: int = 1000
    cache: str = ""
    image_frames: int = 0

    def __post_init__(self) -> None:
        check_choice("data.split", self.split, ("train", "test"))
        for name in ("limit", "workers", "shard_shuffle", "image_frames"):
            check_positive(f"data.{name}", getattr(self, name), allow_zero=True)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe and the run's bookkeeping. Defaults are the paper's CIFAR-10 recipe.

    Attributes:
        steps: optimizer steps to train for.
        batch_size: images per step, summed over all processes.
        lr: Adam's learning rate after warm-up.
        warmup_steps: linear learning-rate warm-up from 0.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        adam_beta1: Adam's β1.
        adam_beta2: Adam's β2.
        weight_decay: Adam's (L2) weight decay.
        ema_decay: decay of the exponential moving average of the weights that sampling uses.
        ema_warmup: use min(ema_decay, (1 + n) / (10 + n)) at step n, so short runs get a useful EMA.
        loss_type: simple (L_simple), vlb (L_vlb) or hybrid (L_simple + 0.001 L_vlb, for learned variances).
        timestep_sampler: uniform, or loss-aware (Improved DDPM's importance sampling, for vlb).
        snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5 in the paper): the
            MSE weighted as the implied x_0's error times min(SNR_t, γ); 0: off, the paper's L_simple.
        class_cond: condition on the data's class labels (needs a labelled data set).
        label_dropout: the chance of dropping a class label to the null class, or a caption to the empty one, in
            a class- or text-conditional run (classifier-free guidance).
        seed: the seed of every random draw in the run (data order, flips, t, noise, dropout).
        log_every: write a metrics line every this many steps.
        sample_every: save a grid of EMA samples every this many steps (0: only at the end).
        sample_count: images in that grid.
        sample_sampler: the sampler for those grids (a name from ddpm.samplers.SAMPLERS; by default the one
            'ddpm sample' uses).
        sample_steps: network evaluations per image of those grids.
        sample_prompts: a text-to-image run's prompts for those grids, one per line (default: the data's first
            distinct captions).
        sample_guidance_scale: classifier-free guidance scale of those grids (1: none).
        low_res_factor: a super-resolution stage's factor: its inputs are the training images shrunk by it.
        max_noise_level: a super-resolution stage's noise-conditioning augmentation (Imagen): each low-resolution
            input is noised to a level drawn from [0, this] (1: Imagen's).
        ckpt_every: save a checkpoint every this many steps (and always at the end).
        keep_last: how many checkpoints to keep.
        time_limit: stop (with a checkpoint) once this many minutes have passed since the command started
            (data loading and latent encoding included; 0: no limit).
        max_bad_steps: stop after this many non-finite losses or gradients in a row.
        device: auto (CUDA if available), cpu, cuda, cuda:N or mps.
        bf16: bfloat16 autocast, true or false on any device; auto: on for CUDA, off for the CPU (measured
            slower there, see bench/RESULTS.md). A run records the value it used.
        channels_last: channels-last memory format on CUDA.
        compile: torch.compile the model.
        threads: CPU threads for PyTorch (0: PyTorch's default).
        tensorboard: also write TensorBoard logs (needs the tensorboard package).
        check_sync: under DDP, check at the end that every process holds the same weights (a diagnostic).
    """

    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    loss_type: str = "simple"
    timestep_sampler: str = "uniform"
    snr_gamma: float = 0.0
    class_cond: bool = False
    label_dropout: float = 0.1
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000
    sample_count: int = 64
    sample_sampler: str = DEFAULT_SAMPLER
    sample_steps: int = DEFAULT_NFE
    sample_prompts: str = ""
    sample_guidance_scale: float = 1.0
    low_res_factor: int = 2
    max_noise_level: float = 1.0
    ckpt_every: int = 10_000
    keep_last: int = 3
    time_limit: float = 0.0
    max_bad_steps: int = 20
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool = True
    compile: bool = False
    threads: int = 0
    tensorboard: bool = False
    check_sync: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "sample_count", "sample_steps", "ckpt_every", "keep_last",
                     "max_bad_steps"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "sample_every", "threads", "seed"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if not self.lr > 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        check_positive("train.low_res_factor", self.low_res_factor)
        if not 0 <= self.max_noise_level <= 1:
            raise UserError(f"train.max_noise_level must be in [0, 1], got {self.max_noise_level}")
        for name in ("grad_clip", "weight_decay", "time_limit", "snr_gamma"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay", "label_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        check_choice("train.loss_type", self.loss_type, LOSS_TYPES)
        check_choice("train.timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        check_choice("train.sample_sampler", self.sample_sampler, tuple(SAMPLERS))
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


SECTIONS: dict[str, type] = {
    "model": UNetConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "text": TextTransformerConfig,
}


class SectionedConfig:
    """A frozen dataclass whose fields are sections (dataclasses themselves), named in ``SECTIONS``:
    JSON in and out, and ``section.field=text`` overrides. :class:`RunConfig` is one, the
    autoencoder's run configuration (:mod:`ddpm.train_autoencoder`) another.

    A section named in ``POLYMORPHIC`` may be of several types: its JSON records the type's ``ARCH``
    as ``"arch"`` (absent: the type in ``SECTIONS``), and the resolver turns that name into a type.
    """

    SECTIONS: ClassVar[dict[str, type]] = {}
    POLYMORPHIC: ClassVar[dict[str, Callable[[str], type]]] = {}
    #: Sections that may be absent (None): left out of the JSON, and their options refused.
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    #: The verb whose ``--help`` lists the options (for error messages).
    VERB: ClassVar[str] = "train"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary, one entry per section."""
        out = {}
        for name in self.SECTIONS:
            section = getattr(self, name)
            if section is None:
                continue
            arch = {"arch": type(section).ARCH} if name in self.POLYMORPHIC else {}
            out[name] = {**arch, **dataclasses.asdict(section)}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls: type[S], values: dict[str, Any]) -> S:
        """The configuration from :meth:`to_dict`'s output; unknown sections or fields are user errors."""
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise UserError(f"unknown config section(s) {', '.join(unknown)}; valid: {', '.join(cls.SECTIONS)}")
        sections = {}
        for name, section_type in cls.SECTIONS.items():
            if name in cls.OPTIONAL and values.get(name) is None:
                sections[name] = None
                continue
            given = dict(values.get(name, {}))
            if name in cls.POLYMORPHIC:
                section_type = cls.POLYMORPHIC[name](given.pop("arch", section_type.ARCH))
            known = {f.name for f in dataclasses.fields(section_type)}
            bad = sorted(set(given) - known)
            if bad:
                raise UserError(f"unknown field(s) {', '.join(f'{name}.{b}' for b in bad)} in the configuration")
            sections[name] = section_type(**given)
        return cls(**sections)

    def replace(self: S, overrides: dict[str, str]) -> S:
        """A copy with ``{"section.field": "text value"}`` overrides applied (parsed by field type)."""
        values = self.to_dict()
        for key, text in overrides.items():
            section, _, name = key.partition(".")
            if section in self.OPTIONAL and getattr(self, section) is None:
                raise UserError(f"--{key}: this run has no {section} section (its options are for the presets "
                                "that have one)")
            types_ = field_types(type(getattr(self, section))) if section in self.SECTIONS else {}
            if name not in types_:
                raise UserError(f"unknown option {key!r}; run 'ddpm {self.VERB} --help' for the list")
            values[section][name] = parse_value(key, text, types_[name])
        return type(self).from_dict(values)


S = TypeVar("S", bound=SectionedConfig)


@dataclass(frozen=True)
class RunConfig(SectionedConfig):
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    SECTIONS: ClassVar[dict[str, type]] = SECTIONS
    POLYMORPHIC: ClassVar[dict[str, Callable[[str], type]]] = {"model": network_config_type}

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"text"})

    model: Any = field(default_factory=UNetConfig)  # a config of ddpm.models.NETWORKS
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: The text transformer a text-to-image run trains with its U-Net (GLIDE); None for other runs
    #: and for one with a frozen encoder (data.text_encoder).
    text: TextTransformerConfig | None = None

    @property
    def text_conditional(self) -> bool:
        """Whether the run's network is conditioned on text (a conditional U-Net)."""
        return isinstance(self.model, ConditionalUNetConfig)

    def __post_init__(self) -> None:
        self._check_text()
        learned_sigma = getattr(self.model, "learned_sigma", False)
        if self.diffusion.var_type == "learned_range" and not learned_sigma:
            raise UserError("diffusion.var_type learned_range needs --model.learned_sigma true")
        if learned_sigma and self.diffusion.var_type != "learned_range":
            raise UserError("model.learned_sigma needs --diffusion.var_type learned_range")
        if self.diffusion.var_type == "learned_range" and self.train.loss_type == "simple":
            raise UserError("a learned variance is trained by the bound: use --train.loss_type hybrid or vlb")
        if self.train.loss_type == "hybrid" and self.diffusion.var_type != "learned_range":
            raise UserError("--train.loss_type hybrid trains a learned variance: add --diffusion.var_type "
                            "learned_range --model.learned_sigma true, or use simple or vlb")

    def _check_text(self) -> None:
        frozen = bool(self.data.text_encoder)
        if not self.text_conditional:
            if self.text is not None or frozen:
                raise UserError("text options (--text.*, --data.text_encoder) are for a text-to-image preset "
                                "(a conditional U-Net: mnist-pairs, mnist-pairs-latent, ...)")
            return
        if self.train.class_cond:
            raise UserError("a text-to-image run is conditioned on its captions; drop --train.class_cond")
        if frozen == (self.text is not None):
            raise UserError("a text-to-image run needs one text encoder: its own (the text section of its preset) or "
                            "a frozen one (--data.text_encoder PATH), not both" if frozen else
                            "a text-to-image run needs a text encoder: a preset with a text section, or "
                            "--data.text_encoder PATH")


# Presets are data: a model preset name plus overrides of the other sections. The paper's
# recipes (Ho et al. 2020, appendix B) for the image sets; the small ones are tuned for CPUs.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "model": "cifar10",
        "diffusion": {"var_type": "fixed_large"},  # the paper's CIFAR-10 samples use σ² = β
        "train": {"steps": 800_000, "batch_size": 128, "lr": 2e-4},
    },
    "celebahq256": {
        "model": "celebahq256",
        "train": {"steps": 500_000, "batch_size": 64, "lr": 2e-5, "sample_count": 16},
    },
    "lsun256": {
        "model": "lsun256",
        "train": {"steps": 1_200_000, "batch_size": 64, "lr": 2e-5, "sample_count": 16},
    },
    "mnist": {
        "model": "mnist",
        "data": {"flip": False},  # a mirrored digit is not a digit
        # Tuned for CPU minutes (see the model preset): small batches, a high learning rate.
        "train": {"steps": 20_000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999,
                  "log_every": 50, "sample_every": 2000, "ckpt_every": 500},
    },
    "digits": {
        "model": "digits",
        "data": {"source": "digits", "flip": False},
        "train": {"steps": 20_000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999,
                  "log_every": 50, "sample_every": 1000, "ckpt_every": 500, "sample_count": 100},
    },
    # Latent diffusion: the U-Net learns an autoencoder's scaled latents (--autoencoder PATH, a
    # 'ddpm train-autoencoder' run with the matching preset: mnist-f4, cifar10-f4), under LDM's
    # scaled_linear schedule (less noise than DDPM's at every t), which beat the linear one on
    # mnist-latent at equal steps (bench/RESULTS.md; docs/theory.md section 12).
    "mnist-latent": {
        "model": "mnist-latent",
        "diffusion": {"schedule": "scaled_linear"},
        "data": {"flip": False},
        "train": {"steps": 20_000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999,
                  "log_every": 50, "sample_every": 2000, "ckpt_every": 500},
    },
    "cifar10-latent": {
        "model": "cifar10-latent",
        "diffusion": {"schedule": "scaled_linear"},
        "train": {"steps": 50_000, "batch_size": 64, "lr": 5e-4, "warmup_steps": 500, "ema_decay": 0.999,
                  "log_every": 50, "sample_every": 5000, "ckpt_every": 1000},
    },
    "tiny": {
        "model": "tiny",
        "diffusion": {"timesteps": 100},
        "data": {"flip": False},
        "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                  "sample_every": 10, "sample_count": 4, "sample_steps": 5, "ckpt_every": 10, "keep_last": 2},
    },
}
# For tests: the tiny recipe on the tiny autoencoder's latents (train-autoencoder --preset tiny).
RUN_PRESETS["tiny-latent"] = {**RUN_PRESETS["tiny"], "model": "tiny-latent",
                              "diffusion": {"timesteps": 100, "schedule": "scaled_linear"}}

# The base stages of the cascades (ddpm.superres.CASCADES): the mnist and cifar10 recipes at half the side
# (the data are resized to it as they load). Their super-resolution stages (U-Net presets mnist-sr and
# cifar10-sr) train with the condition ddpm.superres.SuperResolution.
RUN_PRESETS["mnist-14"] = {**RUN_PRESETS["mnist"], "model": "mnist-14"}
RUN_PRESETS["cifar10-16"] = {**RUN_PRESETS["cifar10"], "model": "cifar10-16"}
RUN_PRESETS["mnist-sr"] = {**RUN_PRESETS["mnist"], "model": "mnist-sr"}  # 14 -> 28
RUN_PRESETS["cifar10-sr"] = {**RUN_PRESETS["cifar10"], "model": "cifar10-sr"}  # 16 -> 32


def _glide(unet: str, text: str, **changes: Any) -> tuple[ConditionalUNetConfig, TextTransformerConfig]:
    """A conditional U-Net preset and a text transformer preset as GLIDE pairs them: the U-Net attends
    to the transformer's token states and adds its pooled state to the time embedding."""
    text_config = TextTransformerConfig.preset(text)
    model = dataclasses.replace(ConditionalUNetConfig.preset(unet), cross_attention_dim=text_config.width,
                                class_embed_type="projection", projection_class_embeddings_input_dim=text_config.width,
                                **changes)
    return model, text_config


# Text-to-image (GLIDE's recipe: a text transformer trained from scratch with the U-Net on the
# captions, 10% empty captions for classifier-free guidance, previews guided at 3) on the captioned
# two-digit MNIST images (28x56), in pixels and on the latents of `train-autoencoder --preset
# mnist-pairs-f4` (--autoencoder RUN). A frozen CLIP or T5 replaces the text section with
# --data.text_encoder PATH (set --model.cross_attention_dim to its width).
_TEXT_TRAIN = {"steps": 20_000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200, "ema_decay": 0.999,
               "log_every": 50, "sample_every": 2000, "ckpt_every": 500, "sample_count": 24,
               "sample_guidance_scale": 3.0}
# The pixel preset trains on 32 images a step with Min-SNR-5 weighting: in 12 CPU minutes (2 threads)
# that reached 0.235 / 0.215 of seen / held-out pairs right at w = 4 against 0.130 / 0.120 for 64 images
# and L_simple (bench/RESULTS.md); 16 images a step did no better. The latent preset keeps the recipe
# it was measured with.
for _name, _unet, _text, _diffusion, _train in (
        ("mnist-pairs", "mnist-pairs", "mnist-pairs", {}, {**_TEXT_TRAIN, "batch_size": 32, "snr_gamma": 5.0}),
        ("mnist-pairs-latent", "mnist-pairs-latent", "mnist-pairs", {"schedule": "scaled_linear"}, _TEXT_TRAIN)):
    _model, _text_config = _glide(_unet, _text)
    RUN_PRESETS[_name] = {"model": _model, "text": _text_config, "diffusion": _diffusion, "data": {"flip": False},
                          "train": _train}
_model, _text_config = _glide("tiny", "tiny", in_channels=3, out_channels=3)
RUN_PRESETS["tiny-text"] = {**RUN_PRESETS["tiny"], "model": _model, "text": _text_config,
                            "train": {**RUN_PRESETS["tiny"]["train"], "sample_guidance_scale": 2.0}}
# Video (Ho et al. 2022): the factorised space-time U-Net on clips [C, T, H, W]. moving-mnist: one
# digit at 32x32, 8 frames (ddpm data moving-mnist --size 32 --digits 1 --frames 8), the `mnist` image
# recipe at 8 clips a step (64 frames), 2 independent frames per clip as images (VDM's ablation favours
# joint training); what it reaches: bench/RESULTS.md (python -m bench.video_mnist).
VIDEO_RUN_PRESETS: dict[str, dict[str, Any]] = {
    "moving-mnist": {"model": VIDEO_PRESETS["moving-mnist"], "data": {"flip": False, "image_frames": 2},
                     "train": {"steps": 20_000, "batch_size": 8, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999,
                               "log_every": 50, "sample_every": 1000, "ckpt_every": 500, "sample_count": 8}},
    "tiny-video": {"model": VIDEO_PRESETS["tiny-video"], "diffusion": {"timesteps": 100},
                   "data": {"flip": False, "image_frames": 1},
                   "train": {"steps": 20, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                             "sample_every": 10, "sample_count": 2, "sample_steps": 5, "ckpt_every": 10,
                             "keep_last": 2}},
}
RUN_PRESETS.update(VIDEO_RUN_PRESETS)
_model, _ = _glide("tiny", "tiny", sample_size=4)  # on the tiny autoencoder's 4x4x4 latents
RUN_PRESETS["tiny-text-latent"] = {**RUN_PRESETS["tiny-text"], "model": _model,
                                   "diffusion": RUN_PRESETS["tiny-latent"]["diffusion"]}


def get_config(preset: str, overrides: dict[str, str] | None = None) -> RunConfig:
    """The resolved configuration of a run preset with ``section.field`` overrides applied."""
    if preset not in RUN_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}")
    spec = RUN_PRESETS[preset]
    model = spec["model"] if dataclasses.is_dataclass(spec["model"]) else get_preset(spec["model"])
    values: dict[str, Any] = {"model": {"arch": model.ARCH, **dataclasses.asdict(model)}}
    for section in ("diffusion", "data", "train"):
        values[section] = dict(spec.get(section, {}))
    frozen = (overrides or {}).get("data.text_encoder")
    if frozen:  # a frozen encoder replaces the preset's own text transformer
        values["data"]["text_encoder"] = frozen
    elif "text" in spec:
        values["text"] = dataclasses.asdict(spec["text"])
    return RunConfig.from_dict(values).replace(overrides or {})


# ---------------------------------------------------------------------------- fields and parsing


def field_types(section_type: type) -> dict[str, Any]:
    """Field name → type annotation, with string annotations resolved."""
    hints = typing.get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)}


def field_docs(section_type: type) -> dict[str, str]:
    """Field name → its one-line description from the class docstring's ``Attributes:`` list."""
    docs: dict[str, str] = {}
    in_attributes, current = False, None
    for line in (section_type.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes or not stripped:
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        if match and match.group(1) in {f.name for f in dataclasses.fields(section_type)}:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current:
            docs[current] += " " + stripped
    return docs


def parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse an override's text by the field's type: int, float, bool, str, a tuple of ints or of
    strings (comma-separated), or a union of these with None (``none``, or empty, is None; for
    ``bool | None`` ``auto`` is) — ``int | tuple[int, ...]`` reads one number as an int."""
    try:
        return _parse(text, annotation)
    except ValueError:
        kind = getattr(annotation, "__name__", str(annotation))
        raise UserError(f"--{key}: cannot read {text!r} as {kind}") from None


def _parse(text: str, annotation: Any) -> Any:
    lowered = text.strip().lower()
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) < len(typing.get_args(annotation)) and lowered in ("", "none", "null", "auto"):
            return None
        items = _items(text)
        scalar = next((a for a in options if typing.get_origin(a) is not tuple), None)
        if scalar is not None and (len(items) == 1 or not any(typing.get_origin(a) is tuple for a in options)):
            return _parse(text, scalar)
        return _parse(text, next(a for a in options if typing.get_origin(a) is tuple))
    if annotation is bool:
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return tuple(_parse(t, item) for t in _items(text))
    return text


def _items(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip().strip("()[]")) if t]
