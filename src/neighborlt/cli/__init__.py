"""The ``neighborlt`` command line: typer sub-commands that only parse arguments and call the library.

Each pipeline area has its own module here exposing ``register(app)``; this file mounts them and turns
:class:`neighborlt.errors.NeighborLTError` into a one-line ``error: ...`` message with exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import Any

import typer
from pydantic import ValidationError

from ..errors import NeighborLTError
from ._common import click_error_line, format_validation_error, is_instance_named

app = typer.Typer(
    name="neighborlt",
    help="Long-tail classification by category extrapolation (auxiliary neighbour classes).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Modules under neighborlt.cli that define ``register(app)``; missing ones are skipped so that areas can
# land independently.
_AREAS = ("data", "classes", "neighbors", "retrieve", "pretrain", "train", "evaluate", "report", "pipeline", "viz")


def _mount() -> None:
    for area in _AREAS:
        try:
            mod = importlib.import_module(f"{__name__}.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{area}":
                continue
            raise
        mod.register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )


_mount()


@functools.lru_cache(maxsize=1)
def _command(typer_app: typer.Typer) -> Any:
    """The click command typer builds from ``typer_app`` (every sub-command's signature and annotations read),
    built once per process, so that repeated :func:`main` calls in one process (the API, tests) do not rebuild it."""
    return typer.main.get_command(typer_app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors (bad option or value, bad config, missing file) end in one line on stderr and
    a non-zero exit status, never a traceback."""
    try:
        rv = _command(app)(args=argv, standalone_mode=False)
    except NeighborLTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as e:  # a config built in a command, outside build_config
        print(f"error: {format_validation_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors etc.
        if is_instance_named(e, "NoArgsIsHelpError"):  # `neighborlt` / a group with no arguments: the help text
            e.show()  # type: ignore[attr-defined]
            sys.exit(getattr(e, "exit_code", 2))
        if is_instance_named(e, "ClickException"):
            print(click_error_line(e), file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 1) or 1)
        if is_instance_named(e, "Abort"):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
    # Outside standalone mode click returns the code of a `typer.Exit(code)` instead of exiting.
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        sys.exit(rv)
