"""Helpers shared by the CLI modules."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

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
