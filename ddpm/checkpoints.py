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
import tempfile
from collections.abc import Iterator, Mapping
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
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit, flush it to disk and
    rename it onto ``path``. On an exception the temporary file is removed and ``path`` untouched.

    ``mode`` is ``"wb"`` or ``"w"`` (text is UTF-8). Missing parent directories are created.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where directories cannot be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
