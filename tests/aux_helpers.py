"""Auxiliary training sets for tests that shrink a protocol in memory (the stages read protocols from split.json):
the rows the local retrieve source proposes for the protocol's WordNet siblings, every one kept, as the filter
manifest would list them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sibling_aux_set(proto: Any) -> Any:
    from neighborlt.data.auxiliary import aux_training_set
    from neighborlt.retrieve import RetrieveConfig
    from neighborlt.retrieve.sources import SourceContext, local_source

    rows = list(local_source(RetrieveConfig(match="wordnet"),
                             SourceContext(names=[], root=Path("."), load_protocol=lambda: proto)))
    index: dict[str, int] = {}
    for r in rows:
        r["class_index"] = index.setdefault(r["name"], len(index))
    return aux_training_set(proto, rows, Path("."), source="sibling rows")
