"""The package's layering, read from its imports (``ast``, nothing is imported): the library never imports the CLI,
and no module reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "neighborlt"


def _imports(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import in ``path`` (relative imports resolved against
    ``package``, the dotted package the file lives in)."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [a.name for a in node.names]
            out.append((node.lineno, module, names))
            out += [(node.lineno, f"{module}.{n}", []) for n in names]  # `from . import cli` imports a module
    return out


def _package(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).parts[:-1])  # a module's package, an __init__'s own package


def test_the_resolver_sees_relative_imports(tmp_path: Path) -> None:
    # the walk must catch every spelling, or the checks below could never fail
    mod = SRC / "pipeline.py"
    f = tmp_path / "probe.py"
    f.write_text("from .cli._common import x\nfrom . import cli\nimport neighborlt.cli.train\n"
                 "from ..cli import main\n", encoding="utf-8")
    found = {m for _, m, _ in _imports(f, "neighborlt.train")}
    assert {"neighborlt.train.cli._common", "neighborlt.train.cli", "neighborlt.cli.train", "neighborlt.cli"} <= found
    assert _package(mod) == "neighborlt" and _package(SRC / "train" / "engine.py") == "neighborlt.train"


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.as_posix() == "__main__.py":  # the CLI itself and `python -m neighborlt`
            continue
        for line, module, _ in _imports(path, _package(path)):
            if module == "neighborlt.cli" or module.startswith("neighborlt.cli."):
                offenders.append(f"{rel}:{line} imports {module}")
    assert not offenders, "library modules import the CLI: " + "; ".join(offenders)


def test_no_private_names_imported_across_modules() -> None:
    """``from neighborlt.x import _name`` in another module (bench scripts included): helpers shared between
    modules are public, so a rename in one module cannot silently break another."""
    offenders = []
    files = [*sorted(SRC.rglob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    for path in files:
        package = _package(path) if SRC in path.parents else "bench"
        for line, module, names in _imports(path, package):
            if not module.startswith("neighborlt"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {module}")
    assert not offenders, "private names imported across modules: " + "; ".join(offenders)


# ---- the CLI repeats no default of a config ------------------------------------------------------------------------

RENAMED = {"timeout": "timeout_s", "backoff": "backoff_s", "backoff_max": "backoff_max_s", "grid": "grids",
           "backend": "neighbors_backend", "pairing": "pairings", "silencing_variant": "silencing_variants"}


def test_cli_defaults_come_from_the_configs() -> None:
    """Every flag of ``neighbors`` / ``ablate`` / ``pilot`` / ``eval`` that sets a config field defaults to "not
    given" (None), so the one default is the config's (the help shows it), as ``train`` does."""
    import typer.main

    from neighborlt.ablate import AblationConfig
    from neighborlt.cli import app
    from neighborlt.evaluate import EvalConfig
    from neighborlt.neighbors import NeighborsConfig
    from neighborlt.pilot import PilotConfig

    commands = typer.main.get_command(app).commands
    configs = {"neighbors": NeighborsConfig, "ablate": AblationConfig, "pilot": PilotConfig, "eval": EvalConfig}
    checked, repeated = 0, []
    for name, model in configs.items():
        for p in commands[name].params:
            field = RENAMED.get(p.name, p.name)
            if field not in model.model_fields or field == "data_dir":
                continue
            checked += 1
            if p.default is not None:
                repeated.append(f"{name} --{p.name.replace('_', '-')} = {p.default!r} (field {field})")
            elif field not in ("train", "protocol_overrides") and model.model_fields[field].default not in (None, "") \
                    and "(default: " not in (p.help or ""):  # JSON sections are merged over a documented base
                repeated.append(f"{name} --{p.name.replace('_', '-')}: the help does not show the config's default")
    assert checked >= 45, checked
    assert not repeated, "CLI defaults that repeat a config's: " + "; ".join(repeated)
