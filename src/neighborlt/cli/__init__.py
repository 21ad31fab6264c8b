"""The ``neighborlt`` command line: typer sub-commands that only parse arguments and call the library.

Each pipeline area has its own module here exposing ``register(app)``; this file mounts them and turns
:class:`neighborlt.errors.NeighborLTError` into a one-line ``error: ...`` message with exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from ..errors import NeighborLTError

app = typer.Typer(
    name="neighborlt",
    help="Long-tail classification by category extrapolation (auxiliary neighbour classes).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Modules under neighborlt.cli that define ``register(app)``; missing ones are skipped so that areas can
# land independently.
_AREAS = ("data", "classes", "neighbors", "train", "evaluate", "pipeline")


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
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )


_mount()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        app(args=argv, standalone_mode=False)
    except NeighborLTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
