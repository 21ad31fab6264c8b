"""The ``openai`` neighbour backend against a real chat-completions server on 127.0.0.1, driven by the real
``openai`` client: good and malformed answers, 429 then success, time-outs, a server that dies mid-run, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from servers.chat_server import ChatServer, Reply, default_responder

from neighborlt.errors import NeighborLTError
from neighborlt.neighbors import NeighborsConfig, NeighborSearchError, TargetClass, run_neighbors, search
from neighborlt.neighbors.openai_backend import check_template, render_prompt
from neighborlt.rundir import RunDir

pytestmark = pytest.mark.network


def write_classes(run: Path, names: list[str], shots: list[str] | None = None,
                  synonyms: dict[str, list[str]] | None = None) -> Path:
    """A classes.json following the schema in docs/architecture.md."""
    shots = shots or ["many"] * len(names)
    counts = {"many": 500, "medium": 50, "few": 5}
    rows = [{"index": i, "name": n, "id": n, "wnid": None, "synonyms": (synonyms or {}).get(n, [n]),
             "train_count": counts[s], "test_count": 10, "shot": s} for i, (n, s) in enumerate(zip(names, shots))]
    totals = {g: sum(r["train_count"] for r in rows if r["shot"] == g) for g in counts}
    doc = {"schema": 1, "dataset": "test", "thresholds": {"many": 100, "few": 20}, "classes": rows, "totals": totals}
    run.mkdir(parents=True, exist_ok=True)
    (run / "classes.json").write_text(json.dumps(doc), encoding="utf-8")
    return run / "classes.json"


def cfg_for(srv: ChatServer, tmp_path: Path, **kw) -> NeighborsConfig:
    base = {"backend": "openai", "model": "test-model", "base_url": srv.base_url, "cache_dir": str(tmp_path / "cache"),
                "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "max_retries": 3, "concurrency": 4}
    base.update(kw)
    return NeighborsConfig(**base)


ANSWERS = {
    "cat": 'Sure! You should return: ["Lynx", "wildcat", "Dog", "cats", "ocelot", "lynx", "../../etc/passwd"]',
    "dog": "1. Wolves\n2. Red fox\n3. Domestic cat\n4. Jackal\n5. Coyote",
    "tiger": "- lion\n- leopard\n- lynx\n- jaguar\n- cheetah",
}


def answer_table(no: int, name: str, prompt: str, body: dict) -> Reply:
    return Reply(content=ANSWERS[name]) if name in ANSWERS else default_responder(no, name, prompt, body)


def test_good_answers_leak_filter_and_many_to_many(tmp_path: Path) -> None:
    targets = [TargetClass(0, "cat", synonyms=("cat", "domestic cat")), TargetClass(1, "dog"),
               TargetClass(2, "tiger")]
    with ChatServer(answer_table) as srv:
        cfg = cfg_for(srv, tmp_path, per_class=4, split_ratio="1:1:1")
        doc = search(targets, cfg)
        assert sorted(srv.calls) == ["cat", "dog", "tiger"]
        found = {t["name"]: t["found"] for t in doc["targets"]}
        # target names and synonyms ("dog", "cats", "domestic cat") never appear; unsafe names dropped
        assert found["cat"] == ["lynx", "wildcat", "ocelot"]
        assert found["dog"] == ["wolf", "red fox", "jackal", "coyote"]
        assert found["tiger"] == ["lion", "leopard", "lynx", "jaguar"]
        aux = {a["name"]: a for a in doc["auxiliary"]}
        assert aux["lynx"]["parents"] == ["cat", "tiger"] and len(aux["lynx"]["answer_ids"]) == 2
        assert doc["stats"]["dropped"]["target_class"] == 3  # Dog, cats, Domestic cat
        assert doc["stats"]["dropped"]["unsafe"] == 1 and doc["stats"]["dropped"]["duplicate"] == 1
        assert doc["stats"]["requests"] == 3 and doc["stats"]["prompt_tokens"] > 0
        assert doc["stats"]["completion_tokens"] > 0
        # a second search is served from the cache: no request reaches the server
        doc2 = search(targets, cfg)
        assert len(srv.calls) == 3 and doc2["stats"]["cached"] == 3 and doc2["stats"]["requests"] == 0
        assert doc2["targets"] == doc["targets"]


def test_prompt_template_and_context(tmp_path: Path) -> None:
    p = render_prompt(check_template("Context: {context_line}List {n} like {name}."), "tabby {x}", 3,
                      "species of the iNaturalist dataset")
    assert p == ("Context: The provided category is one of the species of the iNaturalist dataset.\n"
                 "List 3 like tabby {x}.")
    with pytest.raises(NeighborLTError):
        check_template("List like {name} from {dataset}")
    seen: list[str] = []

    def capture(no: int, name: str, prompt: str, body: dict) -> Reply:
        seen.append(prompt)
        return Reply(content='["x ray fish"]')

    with ChatServer(capture) as srv:
        search([TargetClass(0, "goldfish")], cfg_for(srv, tmp_path, context="fish of a home aquarium", per_class=7))
    assert "one of the fish of a home aquarium." in seen[0]
    assert "contains 7 visually similar categories" in seen[0] and '"goldfish"' in seen[0]


def test_malformed_answers_never_crash(tmp_path: Path) -> None:
    replies = {
        "a": Reply(content="I'm sorry, I cannot help with that."),
        "b": Reply(content='["unterminated", "list'),
        "c": Reply(content='{"neighbours": ["x"]} \x00\x01 /etc/passwd \\\\server\\share'),
        "d": Reply(content="```json\n[\"sea lion\", \"walrus\"]\n```"),
        "e": Reply(content=""),
    }
    bodies = iter([Reply(body=b"<html>502 bad gateway</html>"), Reply(body=b'{"choices": []}')])

    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        if name == "f":  # 200 with a non-JSON body, then 200 without choices, then a good answer
            return next(bodies, Reply(content='["fennec"]'))
        return replies[name]

    with ChatServer(responder) as srv:
        doc = search([TargetClass(i, n) for i, n in enumerate("abcdef")], cfg_for(srv, tmp_path, concurrency=1))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert found["a"] == [] and found["e"] == []
    assert found["d"] == ["sea lion", "walrus"] and found["f"] == ["fennec"]
    assert all("/" not in n and "\x00" not in n for names in found.values() for n in names)
    assert doc["stats"]["retries"] == 2 and doc["stats"]["targets_without_neighbours"] >= 2


def test_429_then_success_with_backoff(tmp_path: Path) -> None:
    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        if no < 2:
            return Reply(status=429, headers={"Retry-After": "0"})
        if no == 2:
            return Reply(status=503)
        return default_responder(no, name, prompt, body)

    with ChatServer(responder) as srv:
        doc = search([TargetClass(0, "heron")], cfg_for(srv, tmp_path))
        assert len(srv.calls) == 4
    assert doc["targets"][0]["found"][:2] == ["heron lookalike 1", "heron lookalike 2"]
    assert doc["stats"]["retries"] == 3 and doc["stats"]["errors"] == {"HTTP 429": 2, "HTTP 503": 1}


def test_timeout_is_retried(tmp_path: Path) -> None:
    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        r = default_responder(no, name, prompt, body)
        r.delay = 1.5 if no == 0 else 0.0
        return r

    with ChatServer(responder) as srv:
        doc = search([TargetClass(0, "egret")], cfg_for(srv, tmp_path, timeout_s=0.3))
        assert len(srv.calls) == 2
    assert doc["targets"][0]["found"] and doc["stats"]["errors"] == {"time-out after 0.3 s": 1}


def test_retries_exhausted_raise_one_line(tmp_path: Path) -> None:
    with ChatServer(lambda *a: Reply(status=500)) as srv:
        with pytest.raises(NeighborSearchError) as ei:
            search([TargetClass(0, "ibis")], cfg_for(srv, tmp_path, max_retries=2))
        assert len(srv.calls) == 3
    msg = str(ei.value)
    assert "\n" not in msg and "re-run the same command to resume" in msg and ei.value.stats["retries"] == 2


def test_http_401_is_a_user_error_and_key_never_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-SECRET-do-not-store-123"
    monkeypatch.setenv("NLT_TEST_KEY", secret)
    run = tmp_path / "run"
    write_classes(run, ["cat", "dog"])
    with ChatServer() as srv:
        cfg = cfg_for(srv, tmp_path, api_key_env="NLT_TEST_KEY")
        run_neighbors(cfg, run)
        assert srv.auth == {f"Bearer {secret}"}
    for root in (run, tmp_path / "cache"):
        for p in root.rglob("*"):
            if p.is_file():
                assert secret not in p.read_text(encoding="utf-8", errors="replace"), p
    with ChatServer(lambda *a: Reply(status=401)) as srv:
        with pytest.raises(NeighborLTError, match="HTTP 401") as ei:
            search([TargetClass(0, "newt")], cfg_for(srv, tmp_path))
        assert len(srv.calls) == 1 and secret not in str(ei.value)


def test_server_dies_mid_run_then_resume(tmp_path: Path) -> None:
    names = [f"bird {i}" for i in range(10)]
    run = tmp_path / "run"
    write_classes(run, names)
    with ChatServer(die_after=4) as srv:
        cfg = cfg_for(srv, tmp_path, concurrency=1, max_retries=1)
        with pytest.raises(NeighborSearchError, match="6 of 10 requests unanswered"):
            run_neighbors(cfg, run)
        first = list(srv.calls)
    assert first[:4] == names[:4] and not (run / "neighbors.json").exists()
    log = list(RunDir(run).read_log("neighbors"))
    assert log[-1]["event"] == "failed" and log[-1]["requests"] == 4 and log[-1]["unanswered"] == 6
    with ChatServer() as srv2:  # a new server (new port): the cache key holds no URL, so nothing is re-asked
        res = run_neighbors(cfg.model_copy(update={"base_url": srv2.base_url, "concurrency": 4}), run)
        assert sorted(srv2.calls) == sorted(names[4:])
        assert res.doc["stats"]["cached"] == 4 and res.doc["stats"]["requests"] == 6
        assert all(len(t["found"]) == 5 for t in res.doc["targets"])
        again = run_neighbors(cfg.model_copy(update={"base_url": srv2.base_url}), run)
        assert again.skipped and len(srv2.calls) == 6
    done = list(RunDir(run).read_log("neighbors"))[-1]
    assert done["event"] == "done" and done["requests"] == 6 and done["prompt_tokens"] > 0
    assert json.loads((run / "records" / "neighbors.config.json").read_text())["model"] == "test-model"


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    import threading

    active = [0, 0]
    lock = threading.Lock()

    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        import time

        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return default_responder(no, name, prompt, body)

    with ChatServer(responder) as srv:
        search([TargetClass(i, f"moth {i}") for i in range(24)], cfg_for(srv, tmp_path, concurrency=3))
    assert 2 <= active[1] <= 3


def test_cli_openai(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neighborlt.cli import app

    run = tmp_path / "run"
    write_classes(run, ["cat", "dog", "tiger"], shots=["many", "medium", "few"])
    with ChatServer(answer_table) as srv:
        res = CliRunner().invoke(app, ["neighbors", str(run), "--backend", "openai", "--model", "m",
                                       "--base-url", srv.base_url, "--split-ratio", "0:1:3", "-k", "1",
                                       "--cache-dir", str(tmp_path / "c")], env={**os.environ})
        assert res.exit_code == 0, res.output
        assert sorted(srv.calls) == ["dog", "tiger"]  # head class skipped by 0:1:3
    doc = json.loads((run / "neighbors.json").read_text())
    asked = {t["name"]: t["asked"] for t in doc["targets"]}
    assert asked == {"cat": 0, "dog": 1, "tiger": 3}
    assert {t["name"]: t["found"] for t in doc["targets"]}["tiger"] == ["lion", "leopard", "lynx"]
