"""Kimi tool-call sections -> OpenAI tool_calls: whole answers, malformed ones, and streams split anywhere."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.router.tool_calls import MAX_ID_CHARS, ToolCallParser, gather_calls, parse_tool_calls, tool_markers_problem
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, MARKERS, SECTION_BEGIN, SECTION_END


def call(name: str, index: int, args: str) -> str:
    return f"{CALL_BEGIN}functions.{name}:{index}{ARGS_BEGIN}{args}{CALL_END}"


def section(*calls: str) -> str:
    return SECTION_BEGIN + "".join(calls) + SECTION_END


def tool(call_id: str, name: str, args: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


WEATHER = '{"city": "Paris", "unit": "°C"}'
TWO = "Let me look." + section(call("get_weather", 0, WEATHER), call("get_time", 1, "{}"))


def test_calls_and_the_content_around_them() -> None:
    content, calls = parse_tool_calls(TWO + "after")
    assert content == "Let me look.after"
    assert calls == [tool("functions.get_weather:0", "get_weather", WEATHER),
                     tool("functions.get_time:1", "get_time", "{}")]


def test_text_without_a_section_is_all_content() -> None:
    text = f"plain {CALL_BEGIN} stray markers {CALL_END} are text outside a section"
    assert parse_tool_calls(text) == (text, [])


def test_blanks_around_ids_and_arguments_and_between_calls_are_dropped() -> None:
    text = f"{SECTION_BEGIN}\n {CALL_BEGIN} get_weather:3 {ARGS_BEGIN}\n{WEATHER} \n{CALL_END}\n{SECTION_END}"
    assert parse_tool_calls(text) == ("", [tool("get_weather:3", "get_weather", WEATHER)])


def test_a_bad_or_undeclared_name_leaves_the_call_as_content() -> None:
    bad = f"{CALL_BEGIN}functions.no such tool:0{ARGS_BEGIN}{{}}{CALL_END}"
    assert parse_tool_calls(section(bad)) == (bad, [])
    text = section(call("get_weather", 0, "{}"), call("rm_rf", 1, "{}"))
    content, calls = parse_tool_calls(text, names={"get_weather"})
    assert content == call("rm_rf", 1, "{}") and [c["function"]["name"] for c in calls] == ["get_weather"]


def test_a_call_cut_in_its_arguments_is_kept_with_what_was_generated() -> None:
    cut = f"{CALL_BEGIN}functions.get_time:1{ARGS_BEGIN}" + '{"tz": "U'
    text = "ok" + SECTION_BEGIN + call("get_weather", 0, "{}") + cut
    content, calls = parse_tool_calls(text)
    assert content == "ok" and calls[1] == tool("functions.get_time:1", "get_time", '{"tz": "U')


def test_a_call_cut_in_its_id_is_returned_as_content() -> None:
    text = "ok" + SECTION_BEGIN + f"{CALL_BEGIN}functions.get_ti"
    assert parse_tool_calls(text) == (f"ok{CALL_BEGIN}functions.get_ti", [])


def test_an_id_that_never_ends_is_content() -> None:
    junk = "x" * (MAX_ID_CHARS + 50)
    text = section(f"{CALL_BEGIN}{junk}{ARGS_BEGIN}{{}}{CALL_END}")
    assert parse_tool_calls(text) == (f"{CALL_BEGIN}{junk}{ARGS_BEGIN}{{}}{CALL_END}", [])


def test_a_missing_call_end_is_forgiven_by_the_next_call_or_the_section_end() -> None:
    text = SECTION_BEGIN + f"{CALL_BEGIN}a:0{ARGS_BEGIN}{{}}" + f"{CALL_BEGIN}b:1{ARGS_BEGIN}[1]" + SECTION_END + "tail"
    assert parse_tool_calls(text) == ("tail", [tool("a:0", "a", "{}"), tool("b:1", "b", "[1]")])


def test_parallel_tool_calls_false_keeps_the_first_call_only() -> None:
    content, calls = parse_tool_calls(TWO, max_calls=1)
    assert content == "Let me look." and [c["id"] for c in calls] == ["functions.get_weather:0"]


def test_stream_deltas_first_name_then_argument_fragments() -> None:
    parser = ToolCallParser()
    pieces = [TWO[:30], TWO[30:120], TWO[120:]]
    entries = [e for p in pieces for e in parser.push(p).calls] + parser.finish().calls
    starts = [e for e in entries if "id" in e]
    assert starts[0] == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    fragments = [e for e in entries if "id" not in e]
    assert fragments and all(set(e) == {"index", "function"} and set(e["function"]) == {"arguments"} for e in fragments)
    assert gather_calls(entries) == parse_tool_calls(TWO)[1]
    assert parser.calls == 2


# --- any split of any text: the stream says what the whole answer says --------------------------

PIECES = st.sampled_from([*MARKERS, "functions.get_weather:0", "get_time:12", "functions.", ":", "bad name",
                          '{"a": 1}', "[", "}", " ", "\n", "text", "<|", "<|tool", "_call", "|>", "é",
                          "<think>", "x" * 40])


def stream(text: str, cuts: list[int], **kw) -> tuple[str, list[dict]]:
    parser, content, entries, start = ToolCallParser(**kw), "", [], 0
    for cut in [*sorted(cuts), len(text)]:
        out = parser.push(text[start:cut])
        content, entries, start = content + out.content, entries + out.calls, cut
    out = parser.finish()
    return content + out.content, gather_calls(entries + out.calls)


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=30).map("".join).flatmap(
    lambda text: st.tuples(st.just(text), st.lists(st.integers(0, len(text)), max_size=12))),
    st.sampled_from([{}, {"names": {"get_weather"}}, {"max_calls": 1}]))
def test_streaming_equals_the_whole_answer_however_the_text_is_split(case, kw) -> None:
    text, cuts = case
    assert stream(text, cuts, **kw) == parse_tool_calls(text, **kw)


# --- an independent reading of well-formed sections -----------------------------------------

REFERENCE = re.compile(re.escape(CALL_BEGIN) + r"(.+?)" + re.escape(ARGS_BEGIN) + r"(.*?)" + re.escape(CALL_END),
                       re.DOTALL)

ARGS = st.dictionaries(st.text("abc_", min_size=1, max_size=5), st.one_of(st.integers(), st.text(max_size=8)),
                       max_size=3).map(json.dumps)
NAMES = st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20).filter(lambda t: "<|" not in t), st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3),
       st.text(max_size=20).filter(lambda t: "<|" not in t), st.lists(st.integers(0, 400), max_size=8))
def test_well_formed_sections_match_a_plain_regex_reading(before, calls, after, cuts) -> None:
    text = before + section(*(call(n, i, a) for i, (n, a) in enumerate(calls))) + after
    expected = [tool(i.strip(), i.split(":")[0].split(".")[-1], a) for i, a in REFERENCE.findall(text)]
    assert stream(text, [c for c in cuts if c <= len(text)]) == (before + after, expected)


# --- the tokenizer must carry the markers ---------------------------------------------------


class Vocab:
    def __init__(self, tokens: list[str], special: set[str] = frozenset()):  # type: ignore[assignment]
        self.tokens, self.special = tokens, special

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(t for t in (self.tokens[i] for i in ids) if not (skip_special_tokens and t in self.special))


@pytest.mark.parametrize("tokenizer,problem", [
    (Vocab(["a", *MARKERS]), None),
    (Vocab(["a", *MARKERS[:-1]]), CALL_END),
    (Vocab(["a", *MARKERS], special={SECTION_BEGIN}), "drops"),
])
def test_tool_markers_are_checked_against_the_tokenizer(tokenizer, problem) -> None:
    found = tool_markers_problem(tokenizer)
    assert found is None if problem is None else problem in found
