"""``neighborlt neighbors RUN_DIR``: stage 2, neighbour category search (parses options, calls the library)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..neighbors.base import NeighborsConfig
from ._common import build_config, default_help

RATIO_HELP = (
    "head:medium:tail ratio of neighbours per class. 'auto' = 1 : ceil(Nh/Nm) : ceil(Nh/Nt) with Nh, Nm, Nt the "
    "training images of the many/medium/few classes; or explicit, e.g. 1:1:3; 0:1:3 skips head classes. A class "
    "of group g gets min(max-per-class, round(per-class * r_g)) neighbours."
)


def _h(field: str, text: str) -> str:
    return default_help(NeighborsConfig, field, text)


def register(app: typer.Typer) -> None:
    """Mount the ``neighbors`` command on the root app."""

    @app.command("neighbors")
    def neighbors_cmd(
        run_dir: Annotated[
            Path, typer.Argument(help="Run directory holding classes.json (from `neighborlt classes`).")
        ],
        backend: Annotated[str | None, typer.Option(help=_h("backend", "openai | wordnet | embedding | taxonomy | file"))] = None,
        per_class: Annotated[int | None, typer.Option(
            "--per-class", "-k", help=_h("per_class", "K: neighbours per class for a ratio part of 1."))] = None,
        split_ratio: Annotated[str | None, typer.Option(help=_h("split_ratio", RATIO_HELP))] = None,
        max_per_class: Annotated[int | None, typer.Option(
            help=_h("max_per_class", "Cap on neighbours asked for one class."))] = None,
        model: Annotated[str | None, typer.Option(help="Chat model id (openai backend), e.g. gpt-4o.")] = None,
        base_url: Annotated[str | None, typer.Option(
            help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (default: api.openai.com).")] = None,
        api_key_env: Annotated[str | None, typer.Option(
            help=_h("api_key_env", "Env var holding the API key (never stored)."))] = None,
        context: Annotated[str | None, typer.Option(
            help="Dataset context line, e.g. 'species of the iNaturalist dataset'.")] = None,
        prompt_file: Annotated[Path | None, typer.Option(
            help="Prompt template file with {name}, {n} and optional {context_line} fields (default: the paper's "
                 "prompt).")] = None,
        temperature: Annotated[float | None, typer.Option(help=_h("temperature", "Sampling temperature (openai)."))]
        = None,
        concurrency: Annotated[int | None, typer.Option(help=_h("concurrency", "Requests in flight (openai)."))] = None,
        timeout: Annotated[float | None, typer.Option(
            help=_h("timeout_s", "Seconds per request before it is retried."))] = None,
        max_retries: Annotated[int | None, typer.Option(
            help=_h("max_retries", "Retries on 429/5xx/time-out/connection errors."))] = None,
        backoff: Annotated[float | None, typer.Option(
            help=_h("backoff_s", "First back-off in seconds (doubles per retry)."))] = None,
        backoff_max: Annotated[float | None, typer.Option(
            help=_h("backoff_max_s", "Longest back-off in seconds."))] = None,
        wordnet_max_level: Annotated[int | None, typer.Option(
            help=_h("wordnet_max_level", "WordNet: 1 siblings, 2 + first cousins, 3 + second cousins."))] = None,
        vocabulary: Annotated[str | None, typer.Option(
            help=_h("vocabulary", "Embedding vocabulary: wordnet, wordnet:<synset>, or a file."))] = None,
        embedding_model: Annotated[str | None, typer.Option(
            help=_h("embedding_model", "Offline sentence-transformers model."))] = None,
        taxonomy_file: Annotated[Path | None, typer.Option(
            help="child,parent hierarchy file (taxonomy backend).")] = None,
        mapping_file: Annotated[Path | None, typer.Option(
            help="JSON/CSV target->neighbours mapping (file backend).")] = None,
        cache_dir: Annotated[Path | None, typer.Option(
            help="Raw-answer cache (default <cache>/neighbors/answers).")] = None,
        force: Annotated[bool, typer.Option(
            help="Re-run even if neighbors.json is up to date (cached answers reused).")] = False,
        max_tokens: Annotated[int | None, typer.Option(
            help=_h("max_tokens", "Completion token limit per request (openai)."))] = None,
        retry_empty: Annotated[bool | None, typer.Option(
            "--retry-empty/--no-retry-empty", help=_h("retry_empty", "Ask cached answers again that parsed to no "
                                                                     "name or were refused."))] = None,
        strict_retry: Annotated[bool | None, typer.Option(
            "--strict-retry/--no-strict-retry", help=_h("strict_retry", "openai: when an answer parses to no name, "
                                                                        "ask once more for a JSON list only."))] = None,
        json_mode: Annotated[str | None, typer.Option(
            help=_h("json_mode", "openai: request JSON output (response_format): off | auto (fall back when the "
                                 "server rejects it) | on (rejection is an error). Changes the prompt."))] = None,
        example_copy_min: Annotated[int | None, typer.Option(
            help=_h("example_copy_min", "Drop the prompt-example names from an answer holding at least this many of "
                                        "them (target not the example's class); 0 turns the guard off."))] = None,
        generic_cap_fraction: Annotated[float | None, typer.Option(
            help=_h("generic_cap_fraction", "openai: drop a name proposed for more than max(generic-cap-min, this * "
                                            "targets) targets as generic; 0 turns the guard off."))] = None,
        generic_cap_min: Annotated[int | None, typer.Option(
            help=_h("generic_cap_min", "Floor of the generic-name cap (targets)."))] = None,
        relevance_threshold: Annotated[float | None, typer.Option(
            help=_h("relevance_threshold", "Drop names whose text-embedding similarity to the target (offline "
                                           "--embedding-model) is below this, e.g. 0.2; default off."))] = None,
    ) -> None:
        """Find visually similar non-target categories for each target class and write RUN_DIR/neighbors.json."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ..errors import ConfigError
        from ..neighbors import run_neighbors

        template = None
        if prompt_file is not None:
            try:
                template = prompt_file.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{prompt_file}: cannot read the prompt template ({e.strerror})") from None
        given = {"backend": backend, "per_class": per_class, "split_ratio": split_ratio, "max_per_class": max_per_class,
                 "model": model, "base_url": base_url, "api_key_env": api_key_env, "context": context,
                 "prompt_template": template, "temperature": temperature, "concurrency": concurrency,
                 "timeout_s": timeout, "max_retries": max_retries, "backoff_s": backoff, "backoff_max_s": backoff_max,
                 "wordnet_max_level": wordnet_max_level, "vocabulary": vocabulary, "embedding_model": embedding_model,
                 "taxonomy_file": str(taxonomy_file) if taxonomy_file else None,
                 "mapping_file": str(mapping_file) if mapping_file else None,
                 "cache_dir": str(cache_dir) if cache_dir else None, "max_tokens": max_tokens,
                 "retry_empty": retry_empty, "strict_retry": strict_retry, "json_mode": json_mode,
                 "example_copy_min": example_copy_min, "generic_cap_fraction": generic_cap_fraction,
                 "generic_cap_min": generic_cap_min, "relevance_threshold": relevance_threshold}
        # flags not given stay out: the defaults live only in NeighborsConfig (the help shows them)
        cfg = build_config(NeighborsConfig, **{k: v for k, v in given.items() if v is not None})
        console = Console(stderr=True)
        with Progress(
            TextColumn("neighbours"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("neighbours", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            res = run_neighbors(cfg, run_dir, progress=progress, force=force)
        st = res.doc["stats"]
        state = "up to date" if res.skipped else "written"
        console.print(
            f"{res.path} {state}: {st['auxiliary_classes']} auxiliary classes for {len(res.doc['targets'])} targets; "
            f"{st['requests']} requests, {st['cached']} cached, {st['prompt_tokens']}+{st['completion_tokens']} "
            f"tokens, {len(res.doc['unmatched'])} unmatched"
        )
        guards = {k: v for k, v in st.get("dropped", {}).items() if v}
        if guards:
            console.print("dropped: " + ", ".join(f"{v} {k}" for k, v in sorted(guards.items())))
