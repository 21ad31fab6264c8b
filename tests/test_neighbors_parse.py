"""Answer parsing, normalisation, the split-ratio rule and the answer cache of the neighbour search."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neighborlt.errors import ConfigError
from neighborlt.neighbors import (
    AnswerCache,
    answer_key,
    is_safe_name,
    neighbours_per_shot,
    normalise_name,
    parse_answer,
)
from neighborlt.neighbors.plan import resolve_ratio


@pytest.mark.parametrize("text, expected", [
    ('Sure! Here you go.\nYou should return: ["Wolf", "coyotes", "wolf", "Red_Fox"]\nHope it helps.',
     ["wolf", "coyote", "red fox"]),
    ("['lynx', 'bobcat', \"ocelot\"]", ["lynx", "bobcat", "ocelot"]),
    ("[husky, wolf, dingo]", ["husky", "wolf", "dingo"]),
    ("Here are 3 categories:\n1. Wolves\n2) Red fox - a small canid\n3. **Jackal**", ["wolf", "red fox", "jackal"]),
    ("- alaskan malamute\n* samoyed\n\u2022 akita", ["alaskan malamute", "samoyed", "akita"]),
    ("lynx, bobcat; ocelots", ["lynx", "bobcat", "ocelot"]),
    ("Here are some categories:\nwolf\nred fox\nI hope this helps!", ["wolf", "red fox"]),
    ('Maybe "ferret" and "stoat".', ["ferret", "stoat"]),
    ("I'm sorry, I cannot help with that.", []),
    ("", []),
    ("mice; geese; species; wolves; glasses; buses", ["mouse", "goose", "species", "wolf", "glasses", "bus"]),
])
def test_parse_answer_formats(text: str, expected: list[str]) -> None:
    assert parse_answer(text).names == expected


def test_parse_answer_drops_unsafe_and_duplicates() -> None:
    text = json.dumps(["../../etc/passwd", "C:\\windows", "tiger\x00cat", "x" * 200, "", "  ", "tiger cat",
                       "Tiger  Cat", "one two three four five six seven eight nine", "-rf", "ok\nname", "lynx"])
    res = parse_answer(text)
    assert res.names == ["tiger cat", "lynx"]
    assert res.dropped["duplicate"] == 1
    assert res.dropped["unsafe"] == 9


def test_normalise_name() -> None:
    assert normalise_name("  \"Golden_Retrievers\", ") == "golden retriever"
    assert normalise_name("T-Shirts") == "t-shirt"
    assert normalise_name("Ｗｏｌｆ") == "wolf"  # NFKC full-width
    assert normalise_name("a/b") is None and normalise_name("..") is None and normalise_name("__") is None
    assert normalise_name("kuvasz") == "kuvasz"  # unknown plural-looking words are not mangled


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_parser_fuzz_never_raises_never_unsafe(text: str) -> None:
    res = parse_answer(text)
    assert all(is_safe_name(n) for n in res.names)
    assert len(set(res.names)) == len(res.names)


_hostile = st.sampled_from(["/", "\\", "..", "\x00", "\n", "\u202e", "\t", "[", "]", '"', "'", ",", "_", "-", " ",
                            "1.", "- ", "*", "~", "$HOME", "%00", "\u200b", "C:", "\ufeff"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), _hostile, st.lists(_hostile).map("".join)), max_size=30))
def test_parser_fuzz_lists_of_hostile_items(items: list[str]) -> None:
    for text in (json.dumps(items), "\n".join(f"{i}. {x}" for i, x in enumerate(items)), ", ".join(items)):
        res = parse_answer(text)
        assert all(is_safe_name(n) and "/" not in n and "\\" not in n and ".." not in n for n in res.names)


def test_split_ratio_rule() -> None:
    totals = {"many": 5000, "medium": 1000, "few": 100}
    assert resolve_ratio("auto", totals) == (1.0, 5.0, 50.0)
    assert neighbours_per_shot("auto", totals, per_class=5, max_per_class=20) == {"many": 5, "medium": 20, "few": 20}
    assert neighbours_per_shot("auto", totals, per_class=1, max_per_class=100) == {"many": 1, "medium": 5, "few": 50}
    assert neighbours_per_shot("1:1:3", totals, per_class=2) == {"many": 2, "medium": 2, "few": 6}
    assert neighbours_per_shot("0:1:3", totals, per_class=2) == {"many": 0, "medium": 2, "few": 6}
    # ceil: 5000 / 3000 -> 2; an empty group gets ratio 1
    assert resolve_ratio("auto", {"many": 5000, "medium": 3000, "few": 0}) == (1.0, 2.0, 1.0)
    for bad in ("1:2", "a:b:c", "-1:1:1", "0:0:0", "1:1:1:1"):
        with pytest.raises(ConfigError):
            neighbours_per_shot(bad, totals)


def test_cache_roundtrip_and_corruption(tmp_path) -> None:
    cache = AnswerCache(tmp_path)
    k1 = answer_key("openai", "m", "prompt", "cat")
    assert k1 != answer_key("openai", "m2", "prompt", "cat") != answer_key("openai", "m", "prompt", "dog")
    assert cache.get(k1) is None
    cache.put(k1, {"text": "[\"lynx\"]", "class": "cat"})
    assert cache.get(k1)["text"] == '["lynx"]'
    cache.path(k1).write_text("{truncated", encoding="utf-8")  # a torn file is re-asked, not trusted
    assert cache.get(k1) is None
    with pytest.raises(ValueError):
        cache.path("../../x")
