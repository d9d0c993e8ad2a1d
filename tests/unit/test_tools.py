"""The request side of function calling: tools, tool_choice, parallel_tool_calls, tool-call messages."""

from __future__ import annotations

import json

import jsonschema
import pytest

from runtime.errors import RequestError
from runtime.requests import parse_chat_request
from runtime.tools import tool_choice_schema

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


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_a_forced_tool_choice_puts_its_grammar_in_the_sampling_params(choice) -> None:
    chat = parse_chat_request(_body(tool_choice=choice, parallel_tool_calls=False))
    assert chat.tool_choice == choice and chat.tools == [WEATHER, TIME]
    assert chat.sampling.structured is not None and chat.sampling.structured.kind == "json"
    assert json.loads(chat.sampling.structured.text) == tool_choice_schema([WEATHER, TIME], choice, parallel=False)
    assert parse_chat_request(_body(tool_choice="auto")).sampling.structured is None
    assert parse_chat_request(_body()).sampling == parse_chat_request({"messages": [USER]}).sampling


@pytest.mark.parametrize("body,field", [
    ({"messages": [USER], "tool_choice": "required"}, "tool_choice"),
    (_body(tool_choice=NAMED, response_format={"type": "json_object"}), "tool_choice"),
    (_body(tool_choice="required", structured_outputs={"regex": "a+"}), "tool_choice"),
    (_body(tool_choice="required", min_tokens=2), "min_tokens"),
    (_body(tool_choice=NAMED, tools=[{"type": "function", "function": {"name": "get_weather",
                                                                       "parameters": {"type": "nope"}}}]), "tools"),
])
def test_forced_tool_choice_refusals_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.field == field


def test_a_named_function_forces_its_arguments() -> None:
    assert tool_choice_schema([WEATHER], "auto") is None and tool_choice_schema(None, "required") is None
    assert tool_choice_schema([WEATHER, TIME], NAMED) == CITY
    assert tool_choice_schema([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}) == {
        "type": "object"}
    untyped = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}}}
    assert tool_choice_schema([untyped], "required", parallel=False)["items"]["anyOf"][0]["properties"][
        "parameters"]["type"] == "object"  # arguments are always an object


def test_required_forces_an_array_of_calls_to_declared_functions() -> None:
    schema = tool_choice_schema([WEATHER, TIME], "required")
    assert schema is not None
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": 1}}], [{"name": "other", "parameters": {}}],
                [{"name": "get_time"}], {"name": "get_time", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = tool_choice_schema([WEATHER, TIME], "required", parallel=False)
    assert one is not None and one["maxItems"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, one)


def test_required_moves_each_functions_defs_to_the_root() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    where = {"type": "object", "properties": {"at": {"$ref": "#/$defs/point"}}, "$defs": {"point": point}}
    tool = {"type": "function", "function": {"name": "go", "parameters": where}}
    schema = tool_choice_schema([tool, TIME], "required")
    assert schema is not None and schema["$defs"] == {"point": point} and "$defs" in where  # the request is not mutated
    jsonschema.validate([{"name": "go", "parameters": {"at": {"x": 1}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "go", "parameters": {"at": {"y": 1}}}], schema)
    other = {"type": "function", "function": {"name": "other", "parameters": {**where, "$defs": {"point": {}}}}}
    with pytest.raises(RequestError) as info:
        tool_choice_schema([tool, other], "required")
    assert info.value.field == "tools"
