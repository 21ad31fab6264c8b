"""One-line messages for invalid configs: the library's stages, the pipeline, ``ablate`` and ``pilot`` validate
their options with these (the CLI too), so no module outside ``neighborlt.cli`` needs the CLI."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

__all__ = ["check_section", "format_validation_error"]


# Short wording for the commonest pydantic error types; the rest keep pydantic's own message.
_SHORT = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "missing": "required, not given",
}


def _key_path(loc: tuple[Any, ...], prefix: str) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _known_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """The field names at ``loc`` (the parent of an unknown key), following nested models; None when unknown."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = cur.model_fields[part].annotation
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return sorted(cur.model_fields)
    return None


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(error: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line for a pydantic ValidationError: the key path of the first problem, what is wrong and the value
    given, e.g. ``train.lambda_s: must be >= 0, got -1``; ``(and N more problems)`` when there are several.

    ``prefix`` is prepended to the key path (the config section, ``train``); ``model`` (the validated class)
    lets an unknown key list the allowed ones."""
    errors = error.errors(include_url=False)
    if not errors:
        return " ".join(str(error).split())
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1) if known and loc else []
        problem = ("unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
                   + (f"; allowed: {', '.join(known)}" if known else ""))
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        problem = str(ctx["error"])
    elif kind in _SHORT:
        try:
            problem = _SHORT[kind].format(**ctx)
        except (KeyError, IndexError):
            problem = err.get("msg", kind)
    else:
        problem = err.get("msg", kind)
    if kind not in ("missing", "extra_forbidden") and "input" in err and not isinstance(err["input"], (dict, BaseModel)):
        problem += f", got {_short_repr(err['input'])}"
    path = _key_path(loc, prefix)
    line = f"{path}: {problem}" if path else problem
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return " ".join(line.split())


def check_section(fields: dict[str, Any], model: type[BaseModel], option: str) -> None:
    """Validate a dict of ``model`` fields given as one option (``--train '{...}'`` of ``ablate`` / ``pilot``) before
    any work, as one line naming the option and the key (an unknown key also gets the closest field name).

    Raises:
        ConfigError: ``--train epoch: unknown key (did you mean 'epochs'?); allowed: ...``
    """
    try:
        model(**fields)
    except ValidationError as e:
        raise ConfigError(f"{option} " + format_validation_error(e, model=model)) from None
