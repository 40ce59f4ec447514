"""Read and write diffusers' ``UNet2DModel`` directories in the DDPM layout, without diffusers.

The paper's trained weights are published in this form (google/ddpm-cifar10-32,
ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256): a ``config.json`` with
``"_class_name": "UNet2DModel"`` and ``diffusion_pytorch_model.safetensors`` (or a ``.bin``
pickle, read only with ``torch.load(..., weights_only=True)``).

Only the DDPM block layout is accepted: ``DownBlock2D``/``AttnDownBlock2D`` levels mirrored by
``UpBlock2D``/``AttnUpBlock2D``, ``UNetMidBlock2D`` with attention, SiLU, GroupNorm(32, 1e-6),
DDPM's sinusoidal embedding (``flip_sin_to_cos=False``, ``freq_shift=1``), stride-2 downsampling
padded bottom-right (``downsample_padding=0``) and additive time conditioning. Anything else raises
:class:`UserError` naming the field.

Names map through one table, :func:`_module_table`, used in both directions by :func:`_remap`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpm.checkpoints import load_json, load_state_dict, save_json, save_state_dict
from ddpm.errors import UserError
from ddpm.models.unet import NORM_EPS, UNet, UNetConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"

# UNet2DModel's fixed choices that make it DDPM's network: the accepted values of each field, the
# first of which is written on export. A key missing from an old config.json takes diffusers'
# default (second element), as diffusers does.
_FIXED: dict[str, tuple[tuple[Any, ...], Any]] = {
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
    "class_embed_type": ((None,), None),
    "time_embedding_dim": ((None,), None),  # None means 4 * block_out_channels[0], DDPM's width.
}
# Fields translated into UNetConfig, with diffusers' defaults.
_MAPPED: dict[str, Any] = {
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
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,  # None: the same as norm_num_groups.
    # Only used by the "learned" time embedding, which is rejected above.
    "num_train_timesteps": None,
}
_DOWN = {False: "DownBlock2D", True: "AttnDownBlock2D"}
_UP = {False: "UpBlock2D", True: "AttnUpBlock2D"}


def config_from_diffusers(values: Mapping[str, Any], source: str | Path = "config") -> UNetConfig:
    """Our :class:`UNetConfig` for a diffusers ``UNet2DModel`` config, or :class:`UserError`.

    diffusers has no null label: a model with ``num_class_embeds = N`` becomes ``num_classes =
    N - 1`` whose null label is row ``N - 1``; labels ``0 .. N-1`` pick the same rows in both.
    """

    def fail(message: str) -> UserError:
        return UserError(f"{source}: {message}; only the DDPM UNet2DModel layout is supported")

    if values.get("_class_name") != "UNet2DModel":
        raise fail(f"_class_name is {values.get('_class_name')!r}, not 'UNet2DModel'")
    unknown = sorted(k for k in values if not k.startswith("_") and k not in _FIXED | _MAPPED)
    if unknown:
        raise fail(f"unsupported field(s) {', '.join(unknown)}")
    for key, (accepted, default) in _FIXED.items():
        value = values.get(key, default)
        if value not in accepted:
            raise fail(f"unsupported {key}={value!r} (DDPM needs {accepted[0]!r})")
    v = {key: values.get(key, default) for key, default in _MAPPED.items()}

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

    size = v["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        raise fail(f"sample_size {size!r} is not one square size")
    in_channels, out_channels = v["in_channels"], v["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise fail(f"out_channels {out_channels} is neither in_channels {in_channels} nor twice it")
    num_classes = 0
    if v["num_class_embeds"] is not None:
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
        raise fail(
            f"attention_head_dim={head_dim} gives a different number of heads per level for "
            f"widths {attended}"
        )
    groups = v["norm_num_groups"]
    if v["attn_norm_num_groups"] not in (None, groups):
        raise fail(f"attn_norm_num_groups={v['attn_norm_num_groups']!r} differs from norm_num_groups={groups!r}")
    resolutions = [size // 2**i for i in range(len(widths))]
    try:
        return UNetConfig(
            image_size=size,
            in_channels=in_channels,
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=v["layers_per_block"],
            attn_resolutions=tuple(r for r, a in zip(resolutions, attention) if a),
            dropout=v["dropout"],
            learned_sigma=out_channels == 2 * in_channels,
            num_classes=num_classes,
            num_heads=heads.pop(),
            norm_groups=groups,
        )
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json for a :class:`UNetConfig` (inverse of
    :func:`config_from_diffusers`); :class:`UserError` if diffusers cannot express it."""
    if config.ch_mult[0] != 1:
        # diffusers' input convolution and time embedding take block_out_channels[0], DDPM's ch.
        raise UserError(
            f"ch_mult {list(config.ch_mult)} has no diffusers equivalent (needs ch_mult[0] = 1)"
        )
    attended = config.attention_channels
    if config.num_heads == 1:
        head_dim = None  # One head of the full width, at every level.
    elif len({w // config.num_heads for w in attended}) == 1:
        head_dim = attended[0] // config.num_heads
    else:
        raise UserError(
            f"num_heads={config.num_heads} over widths {list(attended)} has no diffusers "
            "equivalent (diffusers fixes the head width, not the number of heads)"
        )
    levels = config.attention_levels
    return {
        "_class_name": "UNet2DModel",
        **{key: accepted[0] for key, (accepted, _) in _FIXED.items()},
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": [_DOWN[a] for a in levels],
        "up_block_types": [_UP[a] for a in reversed(levels)],
        "block_out_channels": list(config.level_channels),
        "layers_per_block": config.num_res_blocks,
        "dropout": config.dropout,
        "attention_head_dim": head_dim,
        "num_class_embeds": config.num_classes + 1 if config.num_classes else None,
        "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": None,
        "num_train_timesteps": None,
    }


def _module_table(config: UNetConfig) -> list[tuple[str, tuple[str, ...]]]:
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


def _remap(
    state: Mapping[str, Tensor], config: UNetConfig, to_diffusers: bool
) -> dict[str, Tensor]:
    """Rename (and split or concatenate) a state dict between our names and diffusers'.

    Keys the table does not cover keep their names, for the loader to report as unexpected.
    """
    rest = dict(state)
    out: dict[str, Tensor] = {}
    for ours, theirs in _module_table(config):
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


# The attention parameter names of diffusers before 0.14 (its AttentionBlock), still those of the
# published google/ddpm-* files; diffusers renames them on load (_fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_attention_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        match = _LEGACY_ATTENTION.match(key)
        if match:
            module, name, param = match.groups()
            key = f"{module}.{_LEGACY_NAMES[name]}.{param}"
            if value.ndim == 4:  # A 1x1 convolution's weight [C, C, 1, 1] is a linear map's.
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def state_dict_from_diffusers(state: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DModel`` state dict (current or legacy attention names) in our names."""
    return _remap(_modern_attention_names(state), config, to_diffusers=False)


def state_dict_to_diffusers(state: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our state dict in diffusers ``UNet2DModel`` names."""
    return _remap(state, config, to_diffusers=True)


def _read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    path = directory / SAFETENSORS_NAME
    if path.is_file():
        return load_state_dict(path), path
    path = directory / PICKLE_NAME
    if not path.is_file():
        raise UserError(f"{directory}: neither {SAFETENSORS_NAME} nor {PICKLE_NAME} found")
    try:
        # weights_only: the unpickler builds tensors and containers only and refuses any other
        # callable, so a malicious file cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a loadable weights-only PyTorch file ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state, path


def load_diffusers(path: str | Path, device: str | torch.device = "cpu") -> UNet:
    """A :class:`UNet` with the weights of a diffusers ``UNet2DModel`` directory.

    The outputs equal diffusers' for the same inputs (``unet(x, t, y)`` vs
    ``model(x, t, class_labels=y).sample``). Raises :class:`UserError` for a missing directory or
    file, an unsupported layout, or weights that do not fit.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a diffusers model directory")
    config_path = directory / CONFIG_NAME
    values = load_json(config_path)
    if not isinstance(values, dict):
        raise UserError(f"{config_path}: not a diffusers config (not a JSON object)")
    config = config_from_diffusers(values, source=config_path)
    state, weights_path = _read_weights(directory)
    model = UNet(config)
    model.load_weights(state_dict_from_diffusers(state, config), source=weights_path)
    return model.to(device)


def save_diffusers(model: UNet, path: str | Path) -> None:
    """Write ``model`` as a diffusers ``UNet2DModel`` directory (config.json and
    diffusion_pytorch_model.safetensors) that ``UNet2DModel.from_pretrained`` loads."""
    directory = Path(path)
    config = config_to_diffusers(model.config)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(
        directory / SAFETENSORS_NAME,
        state_dict_to_diffusers(model.state_dict(), model.config),
        metadata={"format": "pt"},
    )
    save_json(directory / CONFIG_NAME, config)
