"""The one exception type for a user's mistake, the one warning type about a user's input, and the
checks of a value that raise the exception.

A :class:`UserError` is something the person running ``ddpm`` can fix (a bad path, an option out
of range, a file that is not a checkpoint). The CLI prints its message as one line and exits with
a non-zero code; any other exception is a bug and keeps its traceback. A :class:`DataWarning` is
worth knowing but does not stop the run; the CLI prints it as one line too.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: printed as one line by the CLI, never as a traceback."""

    exit_code: int = 2
    #: How the CLI labels the message: ``ddpm: error: ...``.
    label: str = "error"


class DataWarning(UserWarning):
    """Something about the user's input worth a line on the console that does not stop the run:
    images skipped or upscaled (:mod:`ddpm.data`), prompts cut to a text encoder's context
    (:mod:`ddpm.text`). The CLI prints it as ``ddpm: warning: ...``."""


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (``True`` and ``False`` are not, though Python says so)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name: str, value: object, allow_zero: bool = False) -> None:
    """:class:`UserError` naming ``name`` unless ``value`` is an integer >= 1 (>= 0 with ``allow_zero``)."""
    if not is_int(value) or value < (0 if allow_zero else 1):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else ">= 1"
        raise UserError(f"{name} must be an integer {bound}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    """:class:`UserError` naming ``name`` and the choices unless ``value`` is one of them."""
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
