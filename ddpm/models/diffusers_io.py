"""The diffusers layout, without diffusers: every model's config fields and weight names, the
scheduler's config, and a pipeline's folders, in both directions. The one place that knows them.

A diffusers model directory is a ``config.json`` with a ``_class_name`` beside
``diffusion_pytorch_model.safetensors`` (or a ``.bin`` pickle, read only with
``torch.load(..., weights_only=True)``); a pipeline directory holds one per component folder
(``unet/``, ``vae/``) and ``scheduler/scheduler_config.json``. The paper's trained weights are
published so (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256, ...).

Each model class names a :class:`Layout`: how its config maps to diffusers' fields (fields with one
accepted value are checked, anything else raises :class:`UserError` naming the field) and how its
weight names map (:data:`UNET2D`: DDPM's TF names through one table; :data:`AUTOENCODER_KL` and
:data:`UNET2D_CONDITION`: diffusers' names already). This module works on config values and state
dicts only; the networks (:mod:`ddpm.models.unet`, :mod:`ddpm.models.autoencoder`,
:mod:`ddpm.models.unet_2d_condition`) build themselves from what it returns.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from ddpm.checkpoints import load_json, load_state_dict, save_json, save_state_dict
from ddpm.errors import UserError, is_int
from ddpm.models.layers import NORM_EPS
from ddpm.schedules import SCALED_LINEAR_ENDS, get_betas

if TYPE_CHECKING:
    from ddpm.models.autoencoder import AutoencoderKLConfig
    from ddpm.models.unet import UNetConfig
    from ddpm.models.unet_2d_condition import ConditionalUNetConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

C = TypeVar("C")
Fixed = dict[str, tuple[tuple[Any, ...], Any]]


def _identity(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    return dict(state)


@dataclass(frozen=True)
class Layout:
    """How one diffusers model class maps onto one of ours.

    Attributes:
        class_name: diffusers' ``_class_name``.
        pipeline_folder: the folder of a pipeline directory that holds such a model.
        config_from: diffusers' config values (and their file, for messages) -> our config's fields.
        config_to: our config -> diffusers' config.json (with ``_class_name``).
        state_from, state_to: a state dict in diffusers' names -> ours, and back.
    """

    class_name: str
    pipeline_folder: str
    config_from: Callable[[Mapping[str, Any], str | Path], dict[str, Any]]
    config_to: Callable[[Any], dict[str, Any]]
    state_from: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]] = _identity
    state_to: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]] = _identity

    def build_config(self, config_class: type[C], values: Mapping[str, Any], source: str | Path = "config") -> C:
        """Our config for diffusers' ``values``; :class:`UserError` naming ``source`` if it cannot be."""
        if not isinstance(values, Mapping) or values.get("_class_name") != self.class_name:
            name = values.get("_class_name") if isinstance(values, Mapping) else None
            raise UserError(f"{source}: _class_name is {name!r}, not {self.class_name!r}")
        try:
            return config_class(**self.config_from(values, source))
        except UserError as e:
            message = str(e)
            raise UserError(message if message.startswith(str(source)) else f"{source}: {message}") from None


# ---------------------------------------------------------------------------- files


def read_config(path: str | Path, layout: Layout) -> tuple[Path, dict[str, Any]]:
    """The model directory at ``path`` (or in its pipeline folder) and its config values."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a diffusers model directory")
    inner = directory / layout.pipeline_folder
    if not (directory / CONFIG_NAME).exists() and (inner / CONFIG_NAME).is_file():
        directory = inner  # a whole pipeline's directory: its component
    values = load_json(directory / CONFIG_NAME)
    if not isinstance(values, dict):
        raise UserError(f"{directory / CONFIG_NAME}: not a diffusers config (not a JSON object)")
    return directory, values


def class_name(directory: str | Path) -> str | None:
    """The ``_class_name`` of the diffusers config in ``directory``, or None."""
    path = Path(directory) / CONFIG_NAME
    values = load_json(path) if path.is_file() else None
    return values.get("_class_name") if isinstance(values, dict) else None


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """The state dict of a diffusers model directory (safetensors, else a weights-only ``.bin``)."""
    path = directory / SAFETENSORS_NAME
    if path.is_file():
        return load_state_dict(path), path
    path = directory / PICKLE_NAME
    if not path.is_file():
        # A download of a variant only (diffusion_pytorch_model.fp16.safetensors), which diffusers
        # loads with variant="fp16"; ddpm reads the full-precision file.
        variants = sorted(p.name for p in directory.glob("diffusion_pytorch_model.*.safetensors"))
        hint = f" (only the variant {variants[0]}: download {SAFETENSORS_NAME} too)" if variants else ""
        raise UserError(f"{directory}: neither {SAFETENSORS_NAME} nor {PICKLE_NAME} found{hint}")
    try:
        # weights_only: the unpickler builds tensors and containers only and refuses any other
        # callable, so a malicious file cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a loadable weights-only PyTorch file ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state, path


def write_model(path: str | Path, config: Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """Write a diffusers model directory: the weights, then ``config.json`` (the pair is complete)."""
    directory = Path(path)
    save_state_dict(directory / SAFETENSORS_NAME, state, metadata={"format": "pt"})
    save_json(directory / CONFIG_NAME, config)


# The attention parameter names of diffusers before 0.14 (its AttentionBlock), still those of the
# published google/ddpm-* files and of some autoencoders (stabilityai/sd-vae-ft-mse); diffusers
# renames them on load (_fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_attention_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with the legacy attention names renamed, and attention weights stored as 1x1
    convolutions ``[C, C, 1, 1]`` (the LDM code's) taken as the linear maps they are."""
    out = {}
    for key, value in state.items():
        match = _LEGACY_ATTENTION.match(key)
        if match:
            module, name, param = match.groups()
            key = f"{module}.{_LEGACY_NAMES[name]}.{param}"
        if ".attentions." in key and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def _check_fixed(values: Mapping[str, Any], fixed: Fixed, fail: Callable[[str], UserError]) -> None:
    for key, (accepted, default) in fixed.items():
        value = values.get(key, default)
        if value not in accepted:
            raise fail(f"unsupported {key}={value!r} (needs {accepted[0]!r})")


def _check_known(values: Mapping[str, Any], known: set[str], fail: Callable[[str], UserError]) -> None:
    unknown = sorted(k for k in values if not k.startswith("_") and k not in known)
    if unknown:
        raise fail(f"unsupported field(s) {', '.join(unknown)}")


def _square(size: Any) -> Any:
    """diffusers' ``sample_size`` as one side (it may be ``[s, s]``)."""
    return size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size


def _positive(value: object) -> bool:
    return is_int(value) and value > 0  # type: ignore[operator]


# ---------------------------------------------------------------------------- UNet2DModel (DDPM)

# UNet2DModel's fixed choices that make it DDPM's network: the accepted values of each field, the
# first of which is written on export. A key missing from an old config.json takes diffusers'
# default (second element), as diffusers does.
_UNET2D_FIXED: Fixed = {
    "center_input_sample": ((False,), False),
    "time_embedding_type": (("positional",), "positional"),
    "freq_shift": ((1,), 0),
    "flip_sin_to_cos": ((False,), True),
    "mid_block_type": (("UNetMidBlock2D",), "UNetMidBlock2D"),
    "mid_block_scale_factor": ((1,), 1),
    "downsample_padding": ((0,), 1),
    "downsample_type": (("conv",), "conv"),
    "upsample_type": (("conv",), "conv"),
    "act_fn": (("silu", "swish"), "silu"),
    "norm_eps": ((NORM_EPS,), 1e-5),
    "resnet_time_scale_shift": (("default",), "default"),
    "add_attention": ((True,), True),
    "time_embedding_dim": ((None,), None),  # None means 4 * block_out_channels[0], DDPM's width.
}
# Fields translated into UNetConfig, with diffusers' defaults.
_UNET2D_MAPPED: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "num_class_embeds": None,
    "class_embed_type": None,  # "timestep": a super-resolution model's augmentation level (noise_level_embedding)
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,  # None: the same as norm_num_groups.
    # Only used by the "learned" time embedding, which is rejected above.
    "num_train_timesteps": None,
}
#: A private field of our export (diffusers ignores config keys that start with "_"): the low-resolution
#: image's channels of a super-resolution model, the last of ``in_channels``. Without it they are
#: inferred: ``in_channels - out_channels`` when the model outputs fewer channels than it takes.
LOW_RES_CHANNELS_KEY = "_ddpm_low_res_channels"
_DOWN = {False: "DownBlock2D", True: "AttnDownBlock2D"}
_UP = {False: "UpBlock2D", True: "AttnUpBlock2D"}


def unet2d_config_from_diffusers(values: Mapping[str, Any], source: str | Path = "config") -> dict[str, Any]:
    """:class:`~ddpm.models.unet.UNetConfig`'s fields for a ``UNet2DModel`` config in the DDPM layout.

    diffusers has no null label: a model with ``num_class_embeds = N`` becomes ``num_classes =
    N - 1`` whose null label is row ``N - 1``; labels ``0 .. N-1`` pick the same rows in both. A
    super-resolution model (SR3's low-resolution channels after x_t's, Imagen's augmentation level as
    ``class_embed_type="timestep"``) becomes ``low_res_channels`` and ``noise_level_embedding``.
    """

    def fail(message: str) -> UserError:
        return UserError(f"{source}: {message}; only the DDPM UNet2DModel layout is supported")

    _check_known(values, set(_UNET2D_FIXED) | set(_UNET2D_MAPPED), fail)
    _check_fixed(values, _UNET2D_FIXED, fail)
    v = {key: values.get(key, default) for key, default in _UNET2D_MAPPED.items()}

    widths = v["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths or not all(_positive(w) for w in widths):
        raise fail(f"block_out_channels {widths!r} is not a list of positive integers")
    widths, ch = list(widths), widths[0]
    if any(w % ch for w in widths):
        raise fail(f"block_out_channels {widths} are not multiples of the first, ch={ch}")
    down, up = list(v["down_block_types"]), list(v["up_block_types"])
    for key, types, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        if not set(types) <= set(allowed.values()):
            raise fail(f"unsupported {key} {types} (DDPM's are {' and '.join(allowed.values())})")
    attention = [d == _DOWN[True] for d in down]
    if len(down) != len(widths) or up != [_UP[a] for a in reversed(attention)]:
        raise fail(f"up_block_types {up} do not mirror down_block_types {down}")

    size = _square(v["sample_size"])
    if not isinstance(size, int):
        raise fail(f"sample_size {size!r} is not one square size")
    in_channels, low_res_channels = _split_input_channels(values, v["in_channels"], v["out_channels"], fail)
    num_classes = 0
    if v["class_embed_type"] not in (None, "timestep"):
        raise fail(f"unsupported class_embed_type={v['class_embed_type']!r} (needs None, or 'timestep' for a "
                   "super-resolution model's augmentation level)")
    if v["num_class_embeds"] is not None and v["class_embed_type"] is None:
        if not _positive(v["num_class_embeds"]) or v["num_class_embeds"] < 2:
            raise fail(f"num_class_embeds={v['num_class_embeds']!r} leaves no class but the null")
        num_classes = v["num_class_embeds"] - 1

    # Attention layers of every attended level and of the middle.
    attended = [w for w, a in zip(widths, attention) if a] + [widths[-1]]
    head_dim = v["attention_head_dim"]
    if head_dim is not None and not _positive(head_dim):
        raise fail(f"attention_head_dim={head_dim!r} is not a positive integer")
    heads = {1} if head_dim is None else {w // head_dim for w in attended}
    if (head_dim is not None and any(w % head_dim for w in attended)) or len(heads) != 1:
        raise fail(f"attention_head_dim={head_dim} gives a different number of heads per level for widths {attended}")
    groups = v["norm_num_groups"]
    if v["attn_norm_num_groups"] not in (None, groups):
        raise fail(f"attn_norm_num_groups={v['attn_norm_num_groups']!r} differs from norm_num_groups={groups!r}")
    resolutions = [size // 2**i for i in range(len(widths))]
    return {
        "image_size": size,
        "in_channels": in_channels,
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": v["layers_per_block"],
        "attn_resolutions": tuple(r for r, a in zip(resolutions, attention) if a),
        "dropout": v["dropout"],
        "learned_sigma": v["out_channels"] == 2 * in_channels,
        "num_classes": num_classes,
        "num_heads": heads.pop(),
        "norm_groups": groups,
        "low_res_channels": low_res_channels,
        "noise_level_embedding": v["class_embed_type"] == "timestep",
    }


def _split_input_channels(values: Mapping[str, Any], total: Any, out_channels: Any,
                          fail: Callable[[str], UserError]) -> tuple[int, int]:
    """(x_t's channels, the low-resolution image's) of diffusers' ``in_channels``, by
    :data:`LOW_RES_CHANNELS_KEY` or inferred from ``out_channels``."""
    if not (_positive(total) and _positive(out_channels)):
        raise fail(f"in_channels {total!r} and out_channels {out_channels!r} must be positive integers")
    low_res = values.get(LOW_RES_CHANNELS_KEY)
    if low_res is None:
        low_res = total - out_channels if out_channels < total else 0
    if not is_int(low_res) or not 0 <= low_res < total:
        raise fail(f"{LOW_RES_CHANNELS_KEY}={low_res!r} is not a count of in_channels {total}")
    channels = total - low_res
    if out_channels not in (channels, 2 * channels):
        raise fail(f"out_channels {out_channels} is neither the {channels} channels of x_t nor twice them")
    return channels, low_res


def unet2d_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json for a :class:`~ddpm.models.unet.UNetConfig`;
    :class:`UserError` if diffusers cannot express it."""
    if config.ch_mult[0] != 1:
        # diffusers' input convolution and time embedding take block_out_channels[0], DDPM's ch.
        raise UserError(f"ch_mult {list(config.ch_mult)} has no diffusers equivalent (needs ch_mult[0] = 1)")
    attended = config.attention_channels
    if config.num_heads == 1:
        head_dim = None  # One head of the full width, at every level.
    elif len({w // config.num_heads for w in attended}) == 1:
        head_dim = attended[0] // config.num_heads
    else:
        raise UserError(f"num_heads={config.num_heads} over widths {list(attended)} has no diffusers equivalent "
                        "(diffusers fixes the head width, not the number of heads)")
    if config.num_classes and config.noise_level_embedding:
        raise UserError("a class-conditional super-resolution U-Net (num_classes with noise_level_embedding) has no "
                        "diffusers equivalent: UNet2DModel has one class embedding, labels or the augmentation level")
    levels = config.attention_levels
    low_res = {LOW_RES_CHANNELS_KEY: config.low_res_channels} if config.low_res_channels else {}
    return {
        "_class_name": "UNet2DModel",
        **low_res,
        **{key: accepted[0] for key, (accepted, _) in _UNET2D_FIXED.items()},
        "sample_size": config.image_size,
        "in_channels": config.in_channels + config.low_res_channels,
        "out_channels": config.out_channels,
        "down_block_types": [_DOWN[a] for a in levels],
        "up_block_types": [_UP[a] for a in reversed(levels)],
        "block_out_channels": list(config.level_channels),
        "layers_per_block": config.num_res_blocks,
        "dropout": config.dropout,
        "attention_head_dim": head_dim,
        "num_class_embeds": config.num_classes + 1 if config.num_classes else None,
        "class_embed_type": "timestep" if config.noise_level_embedding else None,
        "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": None,
        "num_train_timesteps": None,
    }


def _unet2d_table(config: UNetConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our module, its diffusers module(s)) for every module with weights.

    Several diffusers modules for one of ours are concatenated along the output dimension (the
    attention's q, k, v). Modules that a given config lacks (a shortcut between equal widths) are
    listed anyway and skipped by :func:`_remap` when neither side has them.
    """

    def resblock(ours: str, theirs: str) -> list[tuple[str, tuple[str, ...]]]:
        names = [("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                 ("norm2", "norm2"), ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut")]
        return [(f"{ours}.{a}", (f"{theirs}.{b}",)) for a, b in names]

    def attn(ours: str, theirs: str) -> list[tuple[str, tuple[str, ...]]]:
        return [
            (f"{ours}.norm", (f"{theirs}.group_norm",)),
            (f"{ours}.qkv", (f"{theirs}.to_q", f"{theirs}.to_k", f"{theirs}.to_v")),
            (f"{ours}.proj_out", (f"{theirs}.to_out.0",)),
        ]

    table = [
        ("conv_in", ("conv_in",)),
        ("temb.dense0", ("time_embedding.linear_1",)),
        ("temb.dense1", ("time_embedding.linear_2",)),
        ("class_emb", ("class_embedding",)),
        ("level_emb.dense0", ("class_embedding.linear_1",)),
        ("level_emb.dense1", ("class_embedding.linear_2",)),
    ]
    num_levels = len(config.ch_mult)
    for i, attended in enumerate(config.attention_levels):
        # diffusers numbers its up blocks in execution order, lowest resolution first.
        for ours, theirs, blocks, resample in (
            (f"down.{i}", f"down_blocks.{i}", config.num_res_blocks, "downsamplers"),
            (f"up.{i}", f"up_blocks.{num_levels - 1 - i}", config.num_res_blocks + 1, "upsamplers"),
        ):
            for j in range(blocks):
                table += resblock(f"{ours}.block.{j}", f"{theirs}.resnets.{j}")
                if attended:
                    table += attn(f"{ours}.attn.{j}", f"{theirs}.attentions.{j}")
            table.append((f"{ours}.resample.conv", (f"{theirs}.{resample}.0.conv",)))
    table += resblock("mid.block_1", "mid_block.resnets.0")
    table += attn("mid.attn_1", "mid_block.attentions.0")
    table += resblock("mid.block_2", "mid_block.resnets.1")
    table += [("norm_out", ("conv_norm_out",)), ("conv_out", ("conv_out",))]
    return table


def _remap(state: Mapping[str, Tensor], config: UNetConfig, to_diffusers: bool) -> dict[str, Tensor]:
    """Rename (and split or concatenate) a state dict between our names and diffusers'.

    Keys the table does not cover keep their names, for the loader to report as unexpected.
    """
    rest = dict(state)
    out: dict[str, Tensor] = {}
    for ours, theirs in _unet2d_table(config):
        src, dst = ((ours,), theirs) if to_diffusers else (theirs, (ours,))
        for param in ("weight", "bias"):
            keys = [f"{name}.{param}" for name in src]
            if not all(k in rest for k in keys):
                continue
            parts = [rest.pop(k) for k in keys]
            whole = parts[0] if len(parts) == 1 else torch.cat(parts)
            for name, part in zip(dst, whole.chunk(len(dst))):
                out[f"{name}.{param}"] = part
    out.update(rest)
    return out


def unet2d_state_from_diffusers(state: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict (current or legacy attention names) in our names."""
    return _remap(modern_attention_names(state), config, to_diffusers=False)


def unet2d_state_to_diffusers(state: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our U-Net's state dict in ``UNet2DModel`` names."""
    return _remap(state, config, to_diffusers=True)


#: The DDPM U-Net (:class:`ddpm.models.unet.UNet`) as diffusers' ``UNet2DModel``.
UNET2D = Layout("UNet2DModel", "unet", unet2d_config_from_diffusers, unet2d_config_to_diffusers,
                unet2d_state_from_diffusers, unet2d_state_to_diffusers)


# ---------------------------------------------------------------------------- AutoencoderKL

# diffusers AutoencoderKL fields with one value here: (accepted values, diffusers' default for a
# config.json without the field). The first accepted value is written on export.
_AUTOENCODER_FIXED: Fixed = {
    "act_fn": (("silu", "swish"), "silu"),
    "shift_factor": ((None,), None),
    "latents_mean": ((None,), None),
    "latents_std": ((None,), None),
    "use_quant_conv": ((True,), True),
    "use_post_quant_conv": ((True,), True),
    "mid_block_add_attention": ((True,), True),
    # Whether pipelines run the model in float32; ours runs in the caller's dtype.
    "force_upcast": ((True, False), True),
}
# Fields of AutoencoderKLConfig and diffusers' defaults for them.
_AUTOENCODER_MAPPED: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 32,
}
_AUTOENCODER_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def autoencoder_config_from_diffusers(values: Mapping[str, Any], source: str | Path = "config") -> dict[str, Any]:
    """:class:`~ddpm.models.autoencoder.AutoencoderKLConfig`'s fields for an ``AutoencoderKL``
    config, or :class:`UserError` naming the field that this implementation does not support."""

    def fail(message: str) -> UserError:
        return UserError(f"{source}: {message}; only diffusers' plain AutoencoderKL layout is supported")

    _check_known(values, set(_AUTOENCODER_FIXED) | set(_AUTOENCODER_MAPPED) | set(_AUTOENCODER_BLOCKS), fail)
    _check_fixed(values, _AUTOENCODER_FIXED, fail)
    mapped = {key: values.get(key, default) for key, default in _AUTOENCODER_MAPPED.items()}
    mapped["sample_size"] = _square(mapped["sample_size"])
    widths = mapped["block_out_channels"]
    levels = len(widths) if isinstance(widths, (list, tuple)) else None
    for key, block in _AUTOENCODER_BLOCKS.items():
        types = values.get(key, [block])  # diffusers' default: one level
        if not isinstance(types, (list, tuple)) or list(types) != [block] * len(types) or \
                (levels and len(types) != levels):
            raise fail(f"unsupported {key} {types} (needs {levels} x {block})")
    return mapped


def autoencoder_config_to_diffusers(config: AutoencoderKLConfig) -> dict[str, Any]:
    """The ``AutoencoderKL`` config.json for ``config``."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        **{key: accepted[0] for key, (accepted, _) in _AUTOENCODER_FIXED.items()},
        **{key: [block] * levels for key, block in _AUTOENCODER_BLOCKS.items()},
        **{key: getattr(config, key) for key in _AUTOENCODER_MAPPED},
    }


def _autoencoder_state_from_diffusers(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    return modern_attention_names(state)  # our names are diffusers' own


#: Latent diffusion's autoencoder (:class:`ddpm.models.autoencoder.AutoencoderKL`), whose weight
#: names are diffusers' own.
AUTOENCODER_KL = Layout("AutoencoderKL", "vae", autoencoder_config_from_diffusers, autoencoder_config_to_diffusers,
                        _autoencoder_state_from_diffusers)


# ---------------------------------------------------------------------------- UNet2DConditionModel

# UNet2DConditionModel's fields with one value for Stable Diffusion 1.x/2.x's network: (accepted
# values, diffusers' default for a config.json without the field); the first is written on export.
_UNET2D_CONDITION_FIXED: Fixed = {
    "center_input_sample": ((False,), False),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    "only_cross_attention": ((False,), False),
    "mid_block_only_cross_attention": ((None, False), None),  # None: only_cross_attention's value
    "dual_cross_attention": ((False,), False),
    "act_fn": (("silu", "swish"), "silu"),
    "mid_block_scale_factor": ((1,), 1),
    "reverse_transformer_layers_per_block": ((None,), None),
    "encoder_hid_dim": ((None,), None),
    "encoder_hid_dim_type": ((None,), None),
    "addition_embed_type": ((None,), None),
    "addition_time_embed_dim": ((None,), None),
    "addition_embed_type_num_heads": ((64,), 64),  # read only by addition_embed_type "text"
    "class_embeddings_concat": ((False,), False),
    "resnet_time_scale_shift": (("default",), "default"),
    "resnet_skip_time_act": ((False,), False),
    "resnet_out_scale_factor": ((1,), 1.0),
    "time_embedding_type": (("positional",), "positional"),
    "time_embedding_dim": ((None,), None),  # None: 4 * block_out_channels[0]
    "time_embedding_act_fn": ((None,), None),
    "timestep_post_act": ((None,), None),
    "time_cond_proj_dim": ((None,), None),
    "conv_in_kernel": ((3,), 3),
    "conv_out_kernel": ((3,), 3),
    "attention_type": (("default",), "default"),
    "cross_attention_norm": ((None,), None),
}
# ConditionalUNetConfig's fields, which have diffusers' names, and diffusers' defaults for them.
_UNET2D_CONDITION_MAPPED: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "class_embed_type": None,
    "projection_class_embeddings_input_dim": None,
    "num_class_embeds": None,
}
# Fields diffusers allows per level (or per layer) that are one number here.
_UNET2D_CONDITION_SCALARS = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block")


def unet2d_condition_config_from_diffusers(values: Mapping[str, Any], source: str | Path = "config") -> dict[str, Any]:
    """:class:`~ddpm.models.unet_2d_condition.ConditionalUNetConfig`'s fields for a
    ``UNet2DConditionModel`` config in Stable Diffusion 1.x/2.x's layout; :class:`UserError` naming
    the field that this implementation does not support.

    The names are the same; a field missing from the file takes diffusers' default. diffusers
    refuses ``num_attention_heads`` (its head counts are ``attention_head_dim``); it is read here as
    diffusers' code means it, ``num_attention_heads or attention_head_dim``.
    """

    def fail(message: str) -> UserError:
        return UserError(f"{source}: {message}; only Stable Diffusion 1.x/2.x's UNet2DConditionModel layout "
                         "is supported")

    _check_known(values, set(_UNET2D_CONDITION_FIXED) | set(_UNET2D_CONDITION_MAPPED), fail)
    _check_fixed(values, _UNET2D_CONDITION_FIXED, fail)
    mapped = {key: values.get(key, default) for key, default in _UNET2D_CONDITION_MAPPED.items()}
    for key in _UNET2D_CONDITION_SCALARS:
        if isinstance(mapped[key], (list, tuple)):
            raise fail(f"unsupported per-level {key}={mapped[key]!r} (needs one number)")
    if mapped["norm_num_groups"] is None:
        raise fail("unsupported norm_num_groups=None (no output normalisation)")
    if mapped["class_embed_type"] not in (None, "projection"):
        raise fail(f"unsupported class_embed_type={mapped['class_embed_type']!r} (needs null or 'projection')")
    return mapped


def unet2d_condition_config_to_diffusers(config: ConditionalUNetConfig) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config.json for ``config``. The head counts are written as
    ``attention_head_dim``, the field diffusers reads them from."""
    values = config.to_dict()
    if config.num_attention_heads is not None:
        values["attention_head_dim"], values["num_attention_heads"] = config.num_attention_heads, None
    return {
        "_class_name": "UNet2DConditionModel",
        **{key: accepted[0] for key, (accepted, _) in _UNET2D_CONDITION_FIXED.items()},
        **{key: values[key] for key in _UNET2D_CONDITION_MAPPED},
    }


#: Stable Diffusion's U-Net (:class:`ddpm.models.unet_2d_condition.ConditionalUNet`), whose weight
#: names are diffusers' own. No legacy renaming: this class's attention always had the current names,
#: and its 1x1-convolution projections (``proj_in``, ``proj_out``) must keep their shape.
UNET2D_CONDITION = Layout("UNet2DConditionModel", "unet", unet2d_condition_config_from_diffusers,
                          unet2d_condition_config_to_diffusers)


# ---------------------------------------------------------------------------- the scheduler

_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# None: the schedulers without a variance (DPMSolverMultistepScheduler's default), whose sampling
# never reads one; our fixed_small is the paper's.
_VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                   "fixed_large_log": "fixed_large", "learned_range": "learned_range", None: "fixed_small"}
_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}

#: The diffusers schedulers of DDPM's discrete process (``beta_schedule`` over ``num_train_timesteps``
#: steps, the network called at integer timesteps): Stable Diffusion's pipelines ship one of these, and
#: diffusers' ``from_config`` swaps them freely. A config without ``_class_name`` is read as one.
#: Others (flow matching, consistency models, continuous-time schedulers) are not this process.
SCHEDULER_CLASSES = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
)
# Fields that would change the training process itself, with the one value we accept (and
# diffusers' default): custom betas, the zero-terminal-SNR rescaling (Lin et al. 2024), and the
# continuous "timesteps" (0.25 log sigma) some Euler configs feed the network.
_SCHEDULER_FIXED: Fixed = {
    "trained_betas": ((None,), None),
    "rescale_betas_zero_snr": ((False,), False),
    "timestep_type": (("discrete",), "discrete"),
}


def find_scheduler_config(model_dir: Path) -> Path | None:
    """The ``scheduler_config.json`` beside a model's ``config.json``, or in a pipeline's ``scheduler/``."""
    candidates = [model_dir / SCHEDULER_CONFIG_NAME, model_dir.parent / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME]
    return next((p for p in candidates if p.is_file()), None)


def scheduler_from_diffusers(values: Mapping[str, Any], source: str | Path = "scheduler") -> dict[str, Any]:
    """:class:`~ddpm.config.DiffusionConfig`'s fields for a diffusers scheduler config (a class of
    :data:`SCHEDULER_CLASSES`): the training process and what the network predicts.

    Only the schedules we implement are accepted: linear from 1e-4 to 0.02 over 1000 steps (DDPM),
    ``scaled_linear`` from 0.00085 to 0.012 (latent diffusion) and ``squaredcos_cap_v2`` (cosine);
    for T ≠ 1000 the linear ends must be scaled by 1000 / T, as ours are. The sampling-only fields
    are not read here; :func:`ddim_options_from_diffusers` reads those our DDIM honours.
    """
    name = values.get("_class_name")
    if name is not None and name not in SCHEDULER_CLASSES:
        raise UserError(f"{source}: a {name}, not a scheduler of DDPM's discrete process "
                        f"({', '.join(SCHEDULER_CLASSES)})")
    _check_fixed(values, _SCHEDULER_FIXED, lambda message: UserError(f"{source}: {message}"))
    T = values.get("num_train_timesteps", 1000)
    if not _positive(T):
        raise UserError(f"{source}: num_train_timesteps must be a positive integer, got {T!r}")
    theirs = values.get("beta_schedule", "linear")
    schedule = next((ours for ours, name in _SCHEDULES.items() if name == theirs), None)
    if schedule is None:
        raise UserError(f"{source}: beta_schedule {theirs!r} is not supported "
                        f"({', '.join(_SCHEDULES.values())})")
    if schedule in ("linear", "scaled_linear"):
        # diffusers takes the ends as given; ours follow from the schedule's name and T.
        expected = get_betas(schedule, T)[[0, -1]].tolist()
        ends = (values.get("beta_start", 1e-4), values.get("beta_end", 0.02))
        if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ends, expected)):
            ours = ("the paper's linear schedule is supported (beta from 1e-4 to 0.02 for T=1000, both scaled by "
                    "1000/T otherwise)" if schedule == "linear" else
                    "latent diffusion's scaled_linear schedule is supported (beta from 0.00085 to 0.012)")
            raise UserError(f"{source}: only {ours}; got {ends[0]} to {ends[1]} for T={T}")
    prediction, variance = values.get("prediction_type", "epsilon"), values.get("variance_type", "fixed_small")
    mean_type = next((ours for ours, name in _PREDICTION_TYPES.items() if name == prediction), None)
    var_type = _VARIANCE_TYPES.get(variance) if isinstance(variance, (str, type(None))) else None
    if mean_type is None or var_type is None:
        raise UserError(f"{source}: prediction_type / variance_type {prediction!r} / {variance!r} is not supported")
    return {"timesteps": T, "schedule": schedule, "mean_type": mean_type, "var_type": var_type}


@dataclass(frozen=True)
class DDIMOptions:
    """What diffusers' ``DDIMScheduler.from_config`` reads from a scheduler config beyond the process:
    which timesteps N steps visit and where the last one lands. The defaults are DDIMScheduler's,
    which a config without the field (a DDPMScheduler's) gets; Stable Diffusion's configs set
    ``steps_offset = 1`` and ``set_alpha_to_one = False``.

    Attributes:
        timestep_spacing: ``leading`` (j·(T//N) + steps_offset), ``trailing`` (round(T − jT/N) − 1)
            or ``linspace`` (round(j(T−1)/(N−1))).
        steps_offset: added to every ``leading`` timestep.
        set_alpha_to_one: the last step goes to ᾱ = 1 (x̂_0); otherwise to ᾱ of timestep 0, the
            paper's x_1, which keeps √(1 − ᾱ_1) of noise.
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def timesteps(self, T: int, steps: int) -> list[int]:
        """The 0-based timesteps of ``steps`` DDIM steps, increasing (``DDIMScheduler.set_timesteps``)."""
        if not 1 <= steps <= T:
            raise UserError(f"the number of sampling steps must be between 1 and T={T}, got {steps}")
        # numpy's arithmetic (arange and linspace multiply j by the step), so that a tie rounds alike.
        if self.timestep_spacing == "leading":
            kept = [j * (T // steps) + self.steps_offset for j in range(steps)]
        elif self.timestep_spacing == "trailing":
            kept = [round(T - j * (T / steps)) - 1 for j in range(steps)]
        else:
            kept = [round(j * ((T - 1) / (steps - 1))) if steps > 1 else 0 for j in range(steps)]
        if max(kept) >= T:
            raise UserError(f"steps_offset {self.steps_offset} puts the first of {steps} DDIM steps at timestep "
                            f"{max(kept)}, past T - 1 = {T - 1}; take fewer steps")
        return sorted(kept)

    def final_alpha_cumprod(self, alphas_cumprod: Tensor) -> float:
        """ᾱ where the last step lands: 1, or ᾱ of timestep 0 (diffusers' ``final_alpha_cumprod``)."""
        return 1.0 if self.set_alpha_to_one else float(alphas_cumprod[0])


def ddim_options_from_diffusers(values: Mapping[str, Any], source: str | Path = "scheduler") -> DDIMOptions:
    """The :class:`DDIMOptions` of a diffusers scheduler config; :class:`UserError` for values
    DDIMScheduler refuses."""
    options = DDIMOptions(values.get("timestep_spacing", "leading"), values.get("steps_offset", 0),
                          values.get("set_alpha_to_one", True))
    if options.timestep_spacing not in ("leading", "trailing", "linspace"):
        raise UserError(f"{source}: timestep_spacing {options.timestep_spacing!r} is not leading, trailing or "
                        "linspace")
    if not is_int(options.steps_offset) or options.steps_offset < 0:
        raise UserError(f"{source}: steps_offset must be an integer >= 0, got {options.steps_offset!r}")
    if not isinstance(options.set_alpha_to_one, bool):
        raise UserError(f"{source}: set_alpha_to_one must be true or false, got {options.set_alpha_to_one!r}")
    return options


def scheduler_to_diffusers(timesteps: int, schedule: str, mean_type: str, var_type: str,
                           clip_sample: bool = True) -> dict[str, Any]:
    """diffusers' ``DDPMScheduler`` config for our diffusion (``clip_sample``: x̂_0 in [-1, 1], pixels only)."""
    # diffusers does not rescale the linear schedule with T; writing the scaled ends makes its
    # linspace(beta_start, beta_end, T) equal to ours.
    scale = 1000 / timesteps
    ends = SCALED_LINEAR_ENDS if schedule == "scaled_linear" else (1e-4 * scale, 0.02 * scale)
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": timesteps,
        "beta_schedule": _SCHEDULES[schedule],
        "beta_start": ends[0],
        "beta_end": ends[1],
        "prediction_type": _PREDICTION_TYPES[mean_type],
        "variance_type": var_type,
        "clip_sample": clip_sample,
    }


def write_scheduler(directory: Path, config: Mapping[str, Any], pipeline: bool) -> Path:
    """Write a scheduler config beside a model (``pipeline``: into the pipeline's ``scheduler/``)."""
    path = directory / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME if pipeline else directory / SCHEDULER_CONFIG_NAME
    save_json(path, config)
    return path
