"""Answer parsing, normalisation, the split-ratio rule and the answer cache of the neighbour search."""

from __future__ import annotations

import json
import re

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
from neighborlt.neighbors.parse import is_instruction, split_enumeration, split_remark
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


def test_a_backslash_in_a_python_list_is_dropped_without_a_compiler_warning() -> None:
    """``ast.literal_eval`` warns about ``'red\\, fox'`` (an invalid escape); such a list is split instead, its
    backslash item counted as unsafe, and nothing is printed."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = parse_answer(r"['grey wolf', 'red\, fox', 'lynx']")
    assert [str(w.message) for w in seen] == []
    assert res.names == ["grey wolf", "lynx"] and res.dropped["unsafe"] == 1


# --- the four failure classes of issue 13 ------------------------------------------------------------------------

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=9)
_names = st.lists(st.lists(_words, min_size=1, max_size=3).map(" ".join), min_size=1, max_size=12)


def _expected(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if is_instruction(n):  # "aaa json aaa", "note aaa aaa": three words that restate a prompt are dropped
            continue
        nm = normalise_name(n)
        if nm is not None and nm.replace("-", " ") not in {o.replace("-", " ") for o in out}:
            out.append(nm)
    return out


@pytest.mark.parametrize("text, expected", [
    ('["wolf", "red fox", "coy', ["wolf", "red fox"]),
    ("['wolf', 'red fox', 'coy", ["wolf", "red fox"]),
    ('Sure! You should return: ["wolf", "red fox",', ["wolf", "red fox"]),
    ("[wolf, red fox, coy", ["wolf", "red fox"]),
    ('{"categories": ["wolf", "jackal"', ["wolf", "jackal"]),
    # an echoed (complete) example list, then the real answer cut off: the cut one is the answer
    ('["alaskan malamute", "samoyed"]\nProvided category: "cat". You should return: ["lynx", "ocelot", "marg',
     ["lynx", "ocelot"]),
    ("[Note: I was cut off here", []),
])
def test_cut_off_list_keeps_complete_items(text: str, expected: list[str]) -> None:
    res = parse_answer(text)
    assert res.names == expected
    if expected:
        assert res.repaired["cut_off_list"] == 1


@settings(max_examples=200, deadline=None)
@given(_names, st.integers(min_value=0, max_value=10_000), st.sampled_from([", ", ",", ",\n  "]))
def test_cut_off_list_property(names: list[str], cut: int, sep: str) -> None:
    full = "[" + sep.join(json.dumps(n) for n in names) + "]"
    cut = cut % (len(full) + 1)
    text = full[:cut]
    # an item is complete when its closing quote is inside the cut text
    complete, pos = [], 1
    for n in names:
        end = pos + len(json.dumps(n))
        if end <= cut:
            complete.append(n)
        pos = end + len(sep)
    assert parse_answer(text).names == _expected(complete)


@pytest.mark.parametrize("text, expected", [
    ("[wolf; red fox; coyote]", ["wolf", "red fox", "coyote"]),
    ("[wolf | red fox | coyote]", ["wolf", "red fox", "coyote"]),
    ('["wolf"; "red fox"; "coyote"]', ["wolf", "red fox", "coyote"]),
    ("['wolf' | 'red fox']", ["wolf", "red fox"]),
    ("Answer: [wolf;fox]", ["wolf", "fox"]),
])
def test_semicolon_and_pipe_inside_brackets(text: str, expected: list[str]) -> None:
    assert parse_answer(text).names == expected


@settings(max_examples=200, deadline=None)
@given(_names, st.sampled_from([";", "; ", " | ", "|", ", "]), st.booleans())
def test_separators_property(names: list[str], sep: str, quoted: bool) -> None:
    items = [json.dumps(n) for n in names] if quoted else names
    assert parse_answer("[" + sep.join(items) + "]").names == _expected(names)


@pytest.mark.parametrize("text, expected", [
    ("1) first 2) second 3) third", ["first", "second", "third"]),
    ("1. wolf 2. red fox 3. coyote", ["wolf", "red fox", "coyote"]),
    ("Here are 3 categories: 1) wolf 2) red fox 3) jackal", ["wolf", "red fox", "jackal"]),
    ("(1) wolf (2) dingo", ["wolf", "dingo"]),
    ("1) wolf - a wild canid 2) dingo", ["wolf", "dingo"]),
    ("1) wolf 2) red fox 3", ["wolf", "red fox"]),  # cut off after the next number
    ("1. boeing 747 2. airbus a380", ["boeing 747", "airbus a380"]),
])
def test_one_line_enumeration(text: str, expected: list[str]) -> None:
    res = parse_answer(text)
    assert res.names == expected and res.repaired["enumeration"] == 1


@pytest.mark.parametrize("junk", ["first 2) second 3) third", "wolf 2. fox", "1) wolf", "wolf 3)", "2. wolf",
                                  "a (b (c))", "fox (not", "fox)"])
def test_junk_with_numbering_is_never_a_name(junk: str) -> None:
    assert not is_safe_name(junk) and normalise_name(junk) is None
    assert junk not in parse_answer(json.dumps([junk, "lynx"])).names


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), _hostile, st.sampled_from(["2)", "3.", "(4)", " 5) x", "6. y"])),
                min_size=1, max_size=12), st.sampled_from([") ", ". ", ") - "]))
def test_enumeration_fuzz_junk_never_becomes_a_name(items: list[str], mark: str) -> None:
    res = parse_answer(" ".join(f"{i + 1}{mark}{x}" for i, x in enumerate(items)))
    assert all(is_safe_name(n) for n in res.names)
    assert not any(re.search(r"(?:^|\s)\(?\d{1,3}[.)](?:\s|$)", n) for n in res.names)


def test_split_enumeration() -> None:
    assert split_enumeration("just a line") is None and split_enumeration("1) alone") is None
    assert split_enumeration("1) a 3) b") is None  # not consecutive
    assert split_enumeration("x 1) a 2) b 2) c") == ["a", "b 2) c"]  # the longest run; junk stays junk


@settings(max_examples=200, deadline=None)
@given(st.lists(_words, min_size=2, max_size=10), st.sampled_from([") ", ". "]), st.integers(0, 3))
def test_enumeration_property(names: list[str], mark: str, start: int) -> None:
    text = "Sure: " + " ".join(f"{i + 1 + start}{mark}{n}" for i, n in enumerate(names))
    res = parse_answer(text)
    assert res.names == _expected(names)
    assert not any(ch.isdigit() for n in res.names for ch in n)


@pytest.mark.parametrize("ctrl", ["\x00", "\r", "\x01", "\x1f", "\x7f", "\x85", "\r\n", "\u2028"])
def test_control_character_between_items_keeps_the_next_item(ctrl: str) -> None:
    for text in (f'["wolf",{ctrl} "fox", "coyote"]', f"[wolf,{ctrl}fox, coyote]", f"wolf,{ctrl}fox, coyote",
                 f"1. wolf{ctrl}2. fox{ctrl}3. coyote", f'["wolf"{ctrl}, "fox", "coyote"]'):
        assert parse_answer(text).names == ["wolf", "fox", "coyote"], repr(text)
    # inside a word it never glues the word together: that one name is unsafe, the others stay
    res = parse_answer(f'["wo{ctrl}lf", "fox"]') if ctrl not in ("\r", "\r\n", "\u2028", "\x85") else None
    if res is not None:
        assert res.names == ["fox"]


@settings(max_examples=200, deadline=None)
@given(_names, st.lists(st.sampled_from(["\x00", "\r", "\x0b", "\x1b", "\x9f", "\ufeff"]), min_size=1,
                        max_size=3).map("".join))
def test_control_characters_property(names: list[str], ctrl: str) -> None:
    text = "[" + ("," + ctrl).join(json.dumps(n) for n in names) + "]"
    assert parse_answer(text).names == _expected(names)


@pytest.mark.parametrize("item, name, what", [
    ("fox (not a cat)", "fox", "remark"),
    ("racoon (not a mammal)", "racoon", "remark"),
    ("lynx (a wild cat with tufted ears)", "lynx", "remark"),
    ("crane (bird)", "crane (bird)", None),
    ("tabby (synonym)", None, "retracted"),
    ("house cat (same as cat)", None, "retracted"),
    ("toaster (not visually similar)", None, "retracted"),
    ("ocelot", "ocelot", None),
])
def test_parenthetical_remarks(item: str, name: str | None, what: str | None) -> None:
    raw, got = split_remark(item)
    assert got == what
    assert (normalise_name(raw) if raw is not None else None) == name
    res = parse_answer(json.dumps([item, "wolf"]))
    assert res.names == ([name] if name else []) + ["wolf"]
    assert res.dropped["retracted"] == (what == "retracted") and res.repaired["remark"] == (what == "remark")


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


# ---- issue 21: the three answer classes that lost names, and a reason for every loss -----------------------------


@pytest.mark.parametrize("text", [
    "[Wolf, Red fox, Coyote, ", '["Wolf", "Red fox", "Coyote", ', "['wolf', 'red fox', 'coyote', ",
    "Here you go: [wolf; red fox; coyote; ", '[\n  "wolf",\n  "red fox",\n  "coyote",\n  ', "[wolf, red fox, coyote,",
])
def test_bracket_list_cut_right_after_a_separator(text: str) -> None:
    res = parse_answer(text)
    assert res.names == ["wolf", "red fox", "coyote"] and res.repaired["cut_off_list"] == 1
    assert not res.dropped  # nothing was cut mid-item


@pytest.mark.parametrize("text", [
    "[wolf, red fox, Return a JSON list of visually similar categories]",
    '["wolf", "red fox", "Do not include the target category"]',
    '["wolf", "Only list names, no explanations", "red fox"]',
    "wolf, red fox, Please answer with the names of categories only",
])
def test_one_instruction_like_item_among_names(text: str) -> None:
    res = parse_answer(text)
    assert res.names == ["wolf", "red fox"]
    assert res.dropped["instruction"] + res.dropped["prose"] == 1  # counted, under its reason


@pytest.mark.parametrize(("text", "kept"), [
    ("Poodle, Barbet, Curly", ["poodle", "barbet"]),
    ("1. Golden retriever\n2. Labrador retriever\n3. Chesapeake Bay Ret", ["golden retriever", "labrador retriever"]),
    ("- wolf\n- red fox\n- coyo", ["wolf", "red fox"]),
])
def test_answer_cut_at_the_token_limit_drops_its_last_item(text: str, kept: list[str]) -> None:
    res = parse_answer(text, cut_off=True)
    assert res.names == kept and res.dropped["cut_off"] == 1
    whole = parse_answer(text)  # without the server's word the last item stands
    assert len(whole.names) == len(kept) + 1 and not whole.dropped
    # a closed list is complete whatever the server says
    assert parse_answer('["wolf", "red fox"]', cut_off=True).names == ["wolf", "red fox"]


@pytest.mark.parametrize("text", [
    "", "   ", "I'm sorry, I cannot help with that.", "Here are some visually similar categories:",
    "[Note: the following categories are all visually similar to the target.]", "[]", '{"names": []}',
    "../../etc/passwd", "1. 2. 3.",
])
def test_an_answer_without_names_always_has_a_reason(text: str) -> None:
    res = parse_answer(text)
    assert res.names == [] and sum(res.dropped.values()) >= 1 and all(v > 0 for v in res.dropped.values())
