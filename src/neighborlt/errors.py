"""User-facing errors: one clear line naming the file and the fix, never a deep traceback."""

from __future__ import annotations


class NeighborLTError(Exception):
    """An error caused by the user's input or environment.

    The message is a single line that names what is wrong, where (file and line when known) and how
    to fix it. The CLI prints it as ``error: <message>`` and exits with status 2.
    """


class DataError(NeighborLTError):
    """Bad or missing dataset files (corrupt image, label out of range, missing archive, ...)."""


class ConfigError(NeighborLTError):
    """An invalid option or configuration value."""


def where(path: object, line: int | None = None) -> str:
    """Format a ``file:line`` location for error messages."""
    return f"{path}:{line}" if line is not None else f"{path}"
