"""The one exception type for a user's mistake.

A :class:`UserError` is something the person running ``ddpm`` can fix (a bad path, an option out
of range, a file that is not a checkpoint). The CLI prints its message as one line and exits with
a non-zero code; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: printed as one line by the CLI, never as a traceback."""

    exit_code: int = 2
    #: How the CLI labels the message: ``ddpm: error: ...``.
    label: str = "error"
