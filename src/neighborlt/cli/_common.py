"""Helpers shared by the CLI modules."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..validation import check_section, format_validation_error

__all__ = [
    "build_config",
    "check_section",
    "click_error_line",
    "default_help",
    "format_validation_error",
    "is_instance_named",
    "parse_key_values",
]

M = TypeVar("M", bound=BaseModel)


def build_config(cls: type[M], *, repeated: dict[str, str] | None = None, **fields: Any) -> M:
    """Validate a pydantic config; the first problem becomes a one-line ConfigError naming the option
    (``--n-max: Input should be greater than or equal to 1``), never a pydantic traceback.

    ``repeated`` maps list fields filled by a repeated option to that option (``{"grids": "--grid"}``), so that a
    bad item reads ``--grid 'nope': Input should be ...`` instead of naming the list index."""
    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        parts = err["loc"]
        if parts and str(parts[0]) in (repeated or {}) and all(isinstance(x, int) for x in parts[1:]):
            raise ConfigError(f"{(repeated or {})[str(parts[0])]} {err['input']!r}: {err['msg']}") from None
        loc = "-".join(str(x) for x in parts).replace("_", "-")
        raise ConfigError(f"{'--' + loc + ': ' if loc else ''}{err['msg']}") from None


def default_help(model: type[BaseModel], field: str, text: str) -> str:
    """Help text of a flag whose default is "not given": the text and the field's default from its config (the one
    definition), ``(default: 5)``; a flag left out leaves the field to the config."""
    info = model.model_fields[field]
    default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    return f"{text} (default: {default})"  # not "[default: ...]": rich help would read it as markup


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Parse repeated ``key=value`` options (``--set``, ``--loss-param``); values are JSON when they parse (numbers,
    lists), else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"{flag} {item!r}: use key=value, e.g. {flag} tau=1.0")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def is_instance_named(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` derives from a class called ``name``: click's exceptions live in ``click.exceptions`` or, since
    typer 0.2x vendors click, in ``typer._click.exceptions`` / ``typer.exceptions``; matching the class name covers
    both (and a typer that still uses an external click)."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def click_error_line(e: Exception) -> str:
    """Click's error message on one line, with the command's ``--help`` as the hint."""
    msg = " ".join(str(e.format_message() if hasattr(e, "format_message") else e).split())  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    if ctx is not None and is_instance_named(e, "UsageError"):
        try:
            msg += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
        except (AttributeError, IndexError):
            pass
    return f"error: {msg}"
