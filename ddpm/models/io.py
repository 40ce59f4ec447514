"""A model's directory, ours and diffusers': the one place every network is saved and loaded.

Our format is ``config.json`` (the model's config with a ``format`` marker and version) beside
``model.safetensors``. Every network class derives from :class:`SavedModel` and names its config
class, its format and its diffusers layout (a :class:`ddpm.models.diffusers_io.Layout`, or None for
a model diffusers has no class for, such as the text transformer); the methods
``save_pretrained`` / ``from_pretrained`` / ``save_diffusers`` / ``from_diffusers`` /
``load_weights`` are written once, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ddpm.checkpoints import load_json, load_state_dict, save_json, save_state_dict
from ddpm.errors import UserError
from ddpm.models import diffusers_io
from ddpm.models.diffusers_io import Layout

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")
M = TypeVar("M", bound="SavedModel")


def config_from_dict(cls: type[C], values: Mapping[str, Any], what: str) -> C:
    """``cls(**values)`` for a config dataclass; an unknown key raises :class:`UserError` naming the
    valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {what} config key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}")
    return cls(**values)


class ModelConfig:
    """What every network's config dataclass shares: JSON in and out, and named presets."""

    #: What the config describes, in messages ("U-Net", "autoencoder").
    KIND: ClassVar[str] = "model"
    #: Its named configs, set after the class (``XConfig.PRESETS = PRESETS``).
    PRESETS: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists on dumping)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """The config from :meth:`to_dict`'s output; an unknown key raises :class:`UserError`."""
        return config_from_dict(cls, values, cls.KIND)

    @classmethod
    def preset(cls, name: str) -> Any:
        """The config in ``PRESETS`` called ``name``; an unknown name raises :class:`UserError`."""
        if name not in cls.PRESETS:
            raise UserError(f"unknown {cls.KIND} preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls.PRESETS[name]


def load_matching_weights(module: nn.Module, state_dict: Mapping[str, Tensor], source: str | Path, what: str) -> None:
    """Copy ``state_dict`` into ``module`` (a ``what``), or raise :class:`UserError` naming
    ``source`` and the missing, unexpected and wrongly shaped keys when it does not fit."""
    expected = module.state_dict()
    problems = []
    for label, keys in (
        ("missing", [k for k in expected if k not in state_dict]),
        ("unexpected", [k for k in state_dict if k not in expected]),
        ("shape mismatch", [f"{k} {list(state_dict[k].shape)} != {list(v.shape)}"
                            for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise UserError(f"{source}: weights do not fit this {what} config: {'; '.join(problems)}")
    module.load_state_dict(state_dict)


def save_model_directory(directory: str | Path, state_dict: Mapping[str, Tensor], format_name: str,
                         format_version: int, config: Mapping[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (``config`` with a format marker) into
    ``directory``, each atomically."""
    directory = Path(directory)
    # Weights first: a config.json next to them says the pair is complete.
    save_state_dict(directory / WEIGHTS_NAME, state_dict, metadata={"format": format_name})
    save_json(directory / CONFIG_NAME, {"format": format_name, "format_version": format_version, **config})


def read_format(directory: str | Path) -> str | None:
    """The ``format`` marker of the ``config.json`` in ``directory`` (None: not one of ours)."""
    path = Path(directory) / CONFIG_NAME
    values = load_json(path) if path.is_file() else None
    return values.get("format") if isinstance(values, dict) else None


def read_model_config(directory: str | Path, format_name: str, format_version: int, what: str,
                      diffusers_class: str | None, ours: str) -> dict[str, Any]:
    """The config values of a directory written by :func:`save_model_directory`, without the
    format marker; :class:`UserError` for a missing directory, another format (a diffusers
    ``diffusers_class`` directory is pointed to ``ours.from_diffusers``; None: the model has no
    diffusers counterpart) or another version."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory with a saved {what}")
    values = load_json(config_path)
    if not isinstance(values, dict) or values.get("format") != format_name:
        hint = (f" (a diffusers model: load it with {ours}.from_diffusers)"
                if diffusers_class and isinstance(values, dict) and values.get("_class_name") == diffusers_class
                else "")
        raise UserError(f"{config_path}: not a ddpm {what} config (no format {format_name!r}){hint}")
    values = dict(values)
    values.pop("format")
    version = values.pop("format_version", None)
    if version != format_version:
        raise UserError(f"{config_path}: format_version {version!r}, this ddpm reads {format_version}")
    return values


class SavedModel(nn.Module):
    """A network that is built from a config dataclass (``self.config``) and saved in our format
    or in diffusers' layout. Subclasses set the class attributes below."""

    config: Any
    #: The config dataclass (with ``to_dict``).
    CONFIG: ClassVar[type]
    #: The ``format`` marker of our config.json, and its version.
    FORMAT: ClassVar[str]
    FORMAT_VERSION: ClassVar[int] = 1
    #: What the model is called in messages ("U-Net", "autoencoder").
    WHAT: ClassVar[str]
    #: How diffusers names its config fields and weights (None: no diffusers counterpart).
    LAYOUT: ClassVar[Layout | None]

    def load_weights(self, state_dict: Mapping[str, Tensor], source: str | Path = "weights") -> None:
        """Copy ``state_dict`` (our names) into the model, or raise :class:`UserError` naming
        ``source`` and the missing, unexpected and wrongly shaped keys."""
        load_matching_weights(self, state_dict, source, self.WHAT)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (the config with a format marker) and ``model.safetensors``."""
        save_model_directory(directory, self.state_dict(), self.FORMAT, self.FORMAT_VERSION, self.config.to_dict())

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, device: str | torch.device = "cpu") -> M:
        """Load a model written by :meth:`save_pretrained`; :class:`UserError` for a missing or
        foreign directory or weights that do not fit."""
        values = read_model_config(directory, cls.FORMAT, cls.FORMAT_VERSION, cls.WHAT,
                                   cls.LAYOUT.class_name if cls.LAYOUT is not None else None, cls.__name__)
        model = cls.build_saved(config_from_dict(cls.CONFIG, values, cls.WHAT), Path(directory))
        weights_path = Path(directory) / WEIGHTS_NAME
        model.load_weights(load_state_dict(weights_path), source=weights_path)
        return model.to(device)

    @classmethod
    def build_saved(cls: type[M], config: Any, directory: Path) -> M:
        """The model of ``config`` before its weights are loaded, for :meth:`from_pretrained`; a
        model that saves more than its config and weights (a tokenizer) reads it here."""
        return cls(config)

    @classmethod
    def diffusers_layout(cls) -> Layout:
        """:attr:`LAYOUT`; :class:`UserError` for a model that diffusers has no class for."""
        if cls.LAYOUT is None:
            raise UserError(f"a ddpm {cls.WHAT} has no diffusers layout; save it with save_pretrained")
        return cls.LAYOUT

    @classmethod
    def from_diffusers(cls: type[M], path: str | Path, device: str | torch.device = "cpu") -> M:
        """Load a diffusers directory of this model's class, or a pipeline's that holds one in its
        usual folder (``unet/``, ``vae/``). A ``.bin`` is read only with
        ``torch.load(weights_only=True)``, which cannot run code. :class:`UserError` for a missing
        directory or file, a layout we do not implement, or weights that do not fit."""
        layout = cls.diffusers_layout()
        directory, values = diffusers_io.read_config(path, layout)
        config = layout.build_config(cls.CONFIG, values, directory / diffusers_io.CONFIG_NAME)
        state, weights_path = diffusers_io.read_weights(directory)
        model = cls(config)
        model.load_weights(layout.state_from(state, config), source=weights_path)
        return model.to(device)

    def save_diffusers(self, path: str | Path) -> None:
        """Write a directory that diffusers' ``from_pretrained`` of this model's class loads
        (``config.json`` and ``diffusion_pytorch_model.safetensors``)."""
        layout = self.diffusers_layout()
        diffusers_io.write_model(path, layout.config_to(self.config), layout.state_to(self.state_dict(), self.config))
