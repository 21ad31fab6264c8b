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


# --- answer-quality guards, --retry-empty, the strict retry and JSON mode (issue 13) -----------------------------


def test_example_copy_remarks_and_the_examples_own_class(tmp_path: Path) -> None:
    answers = {  # what small local models answered with the paper's prompt
        "automobile": '["husky", "alaskan malamute", "shiba inuus", "sedan"]',
        "deer": '["Husky", "Alaskan Malamute", "elk", "moose"]',
        "dog": '["wolf", "coyote", "dingo"]',  # one example name alone is a plausible answer
        "cat": '["fox (not a cat)", "lynx", "tabby (synonym)", "racoon (not a mammal)"]',
        "husky": '["alaskan malamute", "samoyed", "wolf"]',  # the example's own class keeps them
    }
    with ChatServer(lambda no, name, p, b: Reply(content=answers[name])) as srv:
        doc = search([TargetClass(i, n) for i, n in enumerate(answers)],
                     cfg_for(srv, tmp_path, per_class=5, split_ratio="1:1:1"))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert found["automobile"] == ["sedan"] and found["deer"] == ["elk", "moose"]
    assert found["dog"] == ["wolf", "coyote", "dingo"] and found["cat"] == ["fox", "lynx", "racoon"]
    assert found["husky"] == ["alaskan malamute", "samoyed", "wolf"]
    st = doc["stats"]
    # "husky" is a target here, so the leak filter takes it first; "alaskan malamute" twice is the copy
    assert st["dropped"]["target_class"] == 2 and st["dropped"]["example_copy"] == 3
    assert st["dropped"]["retracted"] == 1 and st["repaired"]["remark"] == 2
    with ChatServer(lambda no, name, p, b: Reply(content=answers[name])) as srv:  # the guard can be turned off
        doc = search([TargetClass(0, "deer")], cfg_for(srv, tmp_path / "off", example_copy_min=0))
    assert doc["targets"][0]["found"][:2] == ["husky", "alaskan malamute"] and "example_copy" not in \
        doc["stats"]["dropped"]


def test_generic_name_for_many_targets_is_dropped(tmp_path: Path) -> None:
    names = [f"moth {i}" for i in range(10)]

    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        shared = ["lynx"] if name in names[:3] else []  # 3 targets: at the cap, kept
        return Reply(content=json.dumps(["animal", f"{name} lookalike", *shared]))

    run = tmp_path / "run"
    write_classes(run, names)
    with ChatServer(responder) as srv:
        res = run_neighbors(cfg_for(srv, tmp_path, split_ratio="1:1:1"), run)
        st = res.doc["stats"]
        assert st["generic_cap"] == 3 and st["generic_names"] == ["animal"] and st["dropped"]["generic"] == 10
        assert all("animal" not in t["found"] for t in res.doc["targets"])
        assert {a["name"]: len(a["parents"]) for a in res.doc["auxiliary"]}["lynx"] == 3
        done = list(RunDir(run).read_log("neighbors"))[-1]
        assert done["dropped"]["generic"] == 10 and done["generic_names"] == ["animal"]
        off = search([TargetClass(i, n) for i, n in enumerate(names)],
                     cfg_for(srv, tmp_path, split_ratio="1:1:1", generic_cap_fraction=0.0))
        assert all("animal" in t["found"] for t in off["targets"]) and off["stats"]["generic_cap"] == 0
    # offline backends share names between related targets by design: no cap
    doc = search([TargetClass(0, "automobile"), TargetClass(1, "truck")],
                 NeighborsConfig(backend="wordnet", cache_dir=str(tmp_path / "wn"), generic_cap_min=1,
                                 generic_cap_fraction=1.0))
    assert doc["stats"]["generic_cap"] == 0 and doc["stats"]["many_parent_auxiliary"] >= 1


def test_strict_retry_after_an_answer_that_parses_to_nothing(tmp_path: Path) -> None:
    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        if "JSON list of names only" in prompt:
            return Reply(content='["wolf", "dingo"]')
        return Reply(content="Sure! Dogs look a lot like several other animals.")

    with ChatServer(responder) as srv:
        doc = search([TargetClass(0, "dog")], cfg_for(srv, tmp_path))
        assert [len(b["messages"]) for b in srv.bodies] == [1, 3]
        assert srv.bodies[1]["messages"][1]["role"] == "assistant" and srv.calls == ["dog", "dog"]
        assert doc["targets"][0]["found"] == ["wolf", "dingo"]
        assert doc["stats"]["strict_retries"] == 1 and doc["stats"]["strict_recovered"] == 1
        rec = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
        assert rec["extra"]["strict_retry"] == "recovered" and rec["extra"]["first_text"].startswith("Sure!")
        off = search([TargetClass(0, "dog")], cfg_for(srv, tmp_path / "off", strict_retry=False))
        assert off["targets"][0]["found"] == [] and len(srv.calls) == 3 and off["stats"]["strict_retries"] == 0


def test_retry_empty_asks_cached_empty_and_refused_answers_again(tmp_path: Path) -> None:
    targets = [TargetClass(0, "owl"), TargetClass(1, "newt")]

    def refuse(no: int, name: str, prompt: str, body: dict) -> Reply:
        if name == "owl":
            return Reply(content="I'm sorry, I cannot help with that.")
        return default_responder(no, name, prompt, body)

    with ChatServer(refuse) as srv:
        doc = search(targets, cfg_for(srv, tmp_path))
        assert doc["targets"][0]["found"] == [] and doc["stats"]["strict_retries"] == 1
    with ChatServer() as srv2:
        again = search(targets, cfg_for(srv2, tmp_path))  # today's behaviour: the cache is trusted
        assert srv2.calls == [] and again["targets"][0]["found"] == []
        fixed = search(targets, cfg_for(srv2, tmp_path, retry_empty=True))
        assert srv2.calls == ["owl"] and fixed["stats"]["retried_empty"] == 1 and fixed["stats"]["cached"] == 1
        assert fixed["targets"][0]["found"][0] == "owl lookalike 1"
        search(targets, cfg_for(srv2, tmp_path, retry_empty=True))  # now cached with names: not asked again
        assert srv2.calls == ["owl"]


def test_json_mode_used_where_supported_with_fallback(tmp_path: Path) -> None:
    from neighborlt.neighbors.openai_backend import JSON_INSTRUCTION

    targets = [TargetClass(i, n) for i, n in enumerate(["ant", "bee", "wasp"])]
    with ChatServer() as srv:  # a server with JSON mode: every request carries response_format
        doc = search(targets, cfg_for(srv, tmp_path / "a", json_mode="auto", concurrency=1))
        assert all(b.get("response_format") == {"type": "json_object"} for b in srv.bodies) and len(srv.bodies) == 3
        n = doc["targets"][0]["asked"]
        assert all(b["messages"][0]["content"].endswith(JSON_INSTRUCTION.format(n=n)) for b in srv.bodies)
        assert f"holding {n} names" in srv.bodies[0]["messages"][0]["content"]
    assert doc["stats"]["json_mode"] == "used" and doc["targets"][0]["found"][0] == "ant lookalike 1"
    with ChatServer(reject_response_format=True) as srv:  # HTTP 400 once, then plain requests only
        doc = search(targets, cfg_for(srv, tmp_path / "b", json_mode="auto", concurrency=1))
        assert ["response_format" in b for b in srv.bodies] == [True, False, False, False]
        assert doc["stats"]["json_mode"] == "rejected" and doc["stats"]["retries"] == 0
        assert all(t["found"] for t in doc["targets"])
        with pytest.raises(NeighborLTError, match="rejected response_format"):
            search(targets[:1], cfg_for(srv, tmp_path / "c", json_mode="on"))
        plain = search(targets[:1], cfg_for(srv, tmp_path / "d"))  # off (default): the paper's prompt, unchanged
        assert "response_format" not in srv.bodies[-1] and "json_mode" not in plain["stats"]
        assert srv.bodies[-1]["messages"][0]["content"].endswith("You should return:")


def test_cli_quality_options_reach_the_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neighborlt.cli import app

    run = tmp_path / "run"
    write_classes(run, ["cat", "dog"])
    with ChatServer(reject_response_format=True) as srv:
        res = CliRunner().invoke(app, ["neighbors", str(run), "--backend", "openai", "--model", "m",
                                       "--base-url", srv.base_url, "--cache-dir", str(tmp_path / "c"),
                                       "--json-mode", "auto", "--retry-empty", "--no-strict-retry",
                                       "--example-copy-min", "3", "--generic-cap-fraction", "0.5",
                                       "--generic-cap-min", "4", "--max-tokens", "64"], env={**os.environ})
        assert res.exit_code == 0, res.output
    rec = json.loads((run / "records" / "neighbors.config.json").read_text())
    assert {k: rec[k] for k in ("json_mode", "retry_empty", "strict_retry", "example_copy_min",
                                "generic_cap_fraction", "generic_cap_min", "max_tokens", "relevance_threshold")} == {
        "json_mode": "auto", "retry_empty": True, "strict_retry": False, "example_copy_min": 3,
        "generic_cap_fraction": 0.5, "generic_cap_min": 4, "max_tokens": 64, "relevance_threshold": None}
    bad = CliRunner().invoke(app, ["neighbors", str(run), "--json-mode", "maybe"])
    assert bad.exit_code != 0


def test_answer_cut_at_the_token_limit_loses_its_last_item(tmp_path: Path) -> None:
    """The server says it cut an answer (``finish_reason: "length"``): the backend tells the parser, so the cut last
    item ("Curly", "Chesapeake Bay Ret") is no name; the same text ending normally keeps it. Every item left out is
    counted in the stats."""
    cut = {"poodle": "Barbet, Lagotto Romagnolo, Curly", "retriever": "1. Flat-coated retriever\n2. Chesapeake Bay Ret",
           "beagle": "Harrier, Basset hound, Foxhound"}

    def responder(no: int, name: str, prompt: str, body: dict) -> Reply:
        return Reply(content=cut[name], finish_reason="stop" if name == "beagle" else "length")

    targets = [TargetClass(0, "poodle"), TargetClass(1, "retriever"), TargetClass(2, "beagle")]
    with ChatServer(responder) as srv:
        doc = search(targets, cfg_for(srv, tmp_path, per_class=5, split_ratio="1:1:1", strict_retry=False))
    found = {t["name"]: t["found"] for t in doc["targets"]}
    assert found == {"poodle": ["barbet", "lagotto romagnolo"], "retriever": ["flat-coated retriever"],
                     "beagle": ["harrier", "basset hound", "foxhound"]}
    assert doc["stats"]["dropped"]["cut_off"] == 2
