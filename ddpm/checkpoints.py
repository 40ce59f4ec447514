"""Safe weight and JSON I/O: atomic writes, safetensors only, user errors that name the file.

Every write goes to a temporary file in the target's directory, is flushed to disk and then
renamed over the target (:func:`os.replace` is atomic on POSIX and Windows), so a crash leaves
either the old file or the new one, never half of one. Weights are read with safetensors, which
parses a JSON header and raw tensor bytes and cannot run code, unlike :mod:`pickle`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ddpm.errors import UserError


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; a saved model should get the permissions open() would give it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit rename it onto ``path``.

    Readers see either the old file or the complete new one. On an exception the temporary file
    is removed and ``path`` is untouched. ``mode`` is ``"wb"`` or ``"w"`` (text is UTF-8);
    missing parent folders are created. ``durable`` also flushes the file and the rename to disk
    (checkpoints survive a power cut); sample PNGs skip that, thousands of fsyncs being slow.

    A file-system error (an ``OSError`` with an errno: no space, no permission, a file where a
    folder should be) is the user's to fix and is raised as :class:`UserError` naming the path;
    an ``OSError`` without an errno comes from the writer itself (Pillow raises those) and is a
    bug, so it keeps its traceback.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A dot file with a random suffix: hidden from globs, unique among concurrent writers.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where directories cannot be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dir(path: str | Path) -> Path:
    """Create the directory ``path`` and its parents if missing; a file-system error (no
    permission, a file in the way, a read-only place such as /proc) is a :class:`UserError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror or e}") from e
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def save_state_dict(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors to a safetensors file, atomically.

    Tensors are copied to contiguous CPU memory first: safetensors refuses views that share
    storage (tied weights, slices of one buffer) and non-contiguous tensors. ``metadata`` is a
    string-to-string map stored in the file's header (see :func:`load_metadata`).
    """
    tensors = {
        name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, t in state_dict.items()
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=dict(metadata or {})))


def load_state_dict(
    path: str | Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto ``device``.

    A missing, truncated or non-safetensors file (a pickle included: it is never unpickled)
    raises :class:`UserError` naming the file.
    """
    path = _existing_file(path)
    try:
        return load_file(path, device=str(torch.device(device)))
    except Exception as e:  # safetensors raises its own error type and OSError/ValueError.
        raise _not_safetensors(path, e) from e


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header (empty if none)."""
    path = _existing_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise _not_safetensors(path, e) from e


def _not_safetensors(path: Path, error: Exception) -> UserError:
    return UserError(
        f"{path}: not a readable safetensors file, truncated or of another format ({error})"
    )


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing file or invalid JSON raises :class:`UserError` naming it."""
    path = _existing_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------- training checkpoints
#
# A training checkpoint is a directory ``step_NNNNNNNN/`` holding one safetensors file per group
# of tensors (model, ema, optimizer, sampler, rng) and ``meta.json`` (the step, Adam's
# hyper-parameters, the config). It is written under a temporary name and renamed into place, so
# a directory named ``step_*`` is always complete: a crash (even kill -9) mid-write leaves only a
# ``.step_*.tmp`` directory, which the next save removes, and the previous checkpoints intact.

CHECKPOINT_META = "meta.json"
_CHECKPOINT_NAME = re.compile(r"step_(\d+)")
# Group names become file names: letters and underscores only, so none can leave the directory.
_GROUP_NAME = re.compile(r"[a-z_]+")


@dataclass
class TrainingCheckpoint:
    """A loaded training checkpoint: tensor groups by name, and its metadata."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``name``; empty if the group was empty when saved."""
        return self.tensors.get(name, {})


def save_training_checkpoint(
    root: str | Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_<step>/`` atomically and keep only the newest ``keep_last`` checkpoints."""
    root = make_dir(root)
    for leftover in root.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        groups = sorted(group for group, state in tensors.items() if state)  # safetensors has no empty files
        if not all(_GROUP_NAME.fullmatch(g) for g in groups):
            raise ValueError(f"checkpoint group names must be lower-case words, got {groups}")
        for group in groups:
            save_state_dict(tmp / f"{group}.safetensors", tensors[group])
        # meta.json last: a checkpoint without it was never finished.
        save_json(tmp / CHECKPOINT_META, {**meta, "groups": groups})
        _fsync_directory(tmp)
        if final.exists():  # the same step saved again (e.g. a run resumed and stopped at once)
            old = final.with_name(f".{final.name}.old.tmp")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_training_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_training_checkpoints(root: str | Path) -> list[Path]:
    """The checkpoint directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    # Symbolic links are not followed: a checkpoint lives inside the run directory.
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and not p.is_symlink() and (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_training_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Read a checkpoint directory; anything missing or unreadable raises :class:`UserError`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a checkpoint directory")
    meta = load_json(path / CHECKPOINT_META)
    if not isinstance(meta, dict) or "groups" not in meta or "step" not in meta:
        raise UserError(f"{path / CHECKPOINT_META}: not a ddpm training checkpoint")
    groups = meta["groups"]
    if not isinstance(groups, list) or not all(isinstance(g, str) and _GROUP_NAME.fullmatch(g) for g in groups):
        raise UserError(f"{path / CHECKPOINT_META}: invalid groups {groups!r} (names must be lower-case words)")
    tensors = {group: load_state_dict(path / f"{group}.safetensors", device) for group in groups}
    return TrainingCheckpoint(path, tensors, meta)


def latest_training_checkpoint(
    root: str | Path, warn: Callable[[str], None] | None = None
) -> tuple[Path, TrainingCheckpoint] | None:
    """The newest checkpoint under ``root`` that loads; broken ones are reported and passed over."""
    for path in reversed(list_training_checkpoints(root)):
        try:
            return path, load_training_checkpoint(path)
        except UserError as e:
            if warn is not None:
                warn(f"skipping unreadable checkpoint {path}: {e}")
    return None


def optimizer_state_to_flat(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's ``state_dict`` into tensors (``"<param>.<name>"``) and JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def optimizer_state_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["state"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states_to_flat(per_rank: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Random-generator states of every process as ``"<rank>.<name>"`` tensors."""
    return {f"{rank}.{name}": state for rank, states in enumerate(per_rank) for name, state in states.items()}


def rank_rng_state(flat: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One process's states out of :func:`rng_states_to_flat`'s output (empty if absent)."""
    prefix = f"{rank}."
    return {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)}
