"""Helpers shared by the CLI modules."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def build_config(cls: type[M], **fields: Any) -> M:
    """Validate a pydantic config; the first problem becomes a one-line ConfigError naming the option
    (``--n-max: Input should be greater than or equal to 1``), never a pydantic traceback."""
    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "-".join(str(x) for x in err["loc"]).replace("_", "-")
        raise ConfigError(f"{'--' + loc + ': ' if loc else ''}{err['msg']}") from None
