"""The request side of function calling: tools, tool_choice, parallel_tool_calls, tool-call messages."""

from __future__ import annotations

import pytest

from runtime.errors import RequestError
from runtime.requests import RequestLimits, parse_chat_request
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, tool_choice_grammar

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = {"role": "user", "content": "hi"}
CALLING = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
RESULT = {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}


def _body(**kw) -> dict:
    return {"messages": [USER], "tools": [WEATHER, TIME], **kw}


def test_tools_and_defaults() -> None:
    chat = parse_chat_request(_body())
    assert chat.tools == [WEATHER, TIME] and chat.tool_choice == "auto" and chat.parallel_tool_calls
    plain = parse_chat_request({"messages": [USER]})
    assert plain.tools is None and plain.tool_choice == "none"
    assert parse_chat_request(_body(tools=[])).tools is None


def test_tool_choice_none_hides_the_tools() -> None:
    chat = parse_chat_request(_body(tool_choice="none", parallel_tool_calls=False))
    assert chat.tools is None and chat.tool_choice == "none" and not chat.parallel_tool_calls


def test_a_tool_call_conversation_is_accepted() -> None:
    chat = parse_chat_request(_body(messages=[USER, CALLING, RESULT]))
    assert chat.messages[1]["tool_calls"] == CALLING["tool_calls"] and chat.messages[2] == RESULT


@pytest.mark.parametrize("body,field", [
    (_body(tools={"a": 1}), "tools"),
    (_body(tools=[{"type": "code"}]), "tools[0].type"),
    (_body(tools=[{"type": "function"}]), "tools[0].function"),
    (_body(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name"),
    (_body(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name"),
    (_body(tools=[TIME, TIME]), "tools[1].function.name"),
    (_body(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
     "tools[0].function.parameters"),
    (_body(tools=[{"type": "function", "function": {"name": "f", "description": 1}}]),
     "tools[0].function.description"),
    (_body(tool_choice="always"), "tool_choice"),
    (_body(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (_body(tool_choice={"type": "function"}), "tool_choice"),
    (_body(parallel_tool_calls="yes"), "parallel_tool_calls"),
    (_body(messages=[USER, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
    (_body(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls"),
    (_body(messages=[{"role": "assistant", "tool_calls": {}}]), "messages[0].tool_calls"),
    (_body(messages=[{"role": "assistant", "tool_calls": [{"type": "function"}]}]), "messages[0].tool_calls[0].id"),
    (_body(messages=[{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}]}]),
     "messages[0].tool_calls[0].function.arguments"),
    (_body(messages=[{"role": "assistant", "tool_calls": [{"id": "a", "type": "x", "function": {}}]}]),
     "messages[0].tool_calls[0].type"),
])
def test_invalid_tool_fields_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.field == field


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_needs_constrained_decoding(choice) -> None:
    with pytest.raises(RequestError, match="constrained decoding") as info:
        parse_chat_request(_body(tool_choice=choice))
    assert info.value.field == "tool_choice"
    constrained = RequestLimits(constrained_decoding=True)
    with pytest.raises(RequestError, match="needs tools"):
        parse_chat_request({"messages": [USER], "tool_choice": "required"}, limits=constrained)
    assert parse_chat_request(_body(tool_choice=choice), limits=constrained).tool_choice == choice


def test_the_grammar_hook_describes_one_section_of_allowed_calls() -> None:
    assert tool_choice_grammar([WEATHER], "auto") is None and tool_choice_grammar(None, "required") is None
    grammar = tool_choice_grammar([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert grammar is not None and grammar["type"] == "structural_tag"
    begin, calls, end = grammar["format"]["elements"]
    assert (begin["value"], end["value"]) == (SECTION_BEGIN, SECTION_END)
    assert calls["stop_after_first"] and calls["at_least_one"]
    (tag,) = calls["tags"]
    assert tag["begin"] == f"{CALL_BEGIN}functions.get_time:" and tag["end"] == CALL_END
    assert tag["content"]["elements"][1]["value"] == ARGS_BEGIN
    assert tag["content"]["elements"][2]["json_schema"] == {"type": "object"}
    both = tool_choice_grammar([WEATHER, TIME], "required", parallel=True)
    assert both is not None
    tags = both["format"]["elements"][1]["tags"]
    assert [t["content"]["elements"][2]["json_schema"] for t in tags] == [WEATHER["function"]["parameters"],
                                                                          {"type": "object"}]
    assert not both["format"]["elements"][1]["stop_after_first"]
