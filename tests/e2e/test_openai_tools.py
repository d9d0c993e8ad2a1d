"""The openai client against the app on a checkpoint steered into a tool call (tests.steering):
tool calls whole and streamed, a tool-result round trip, n choices, json_schema output, and a forced
tool_choice (named, required) enforced by the grammar."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from runtime.checkpoint.maker import make_checkpoint
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.steering import steer_checkpoint

ARGS = '{"q": 7}'  # spelled with distinct tokens of the tiny vocabulary (tests.steering)
ANSWER = f"</think>Sure{SECTION_BEGIN}{CALL_BEGIN}functions.web:0{ARGS_BEGIN}{ARGS}{CALL_END}{SECTION_END}"
SEARCH = {"type": "object", "properties": {"q": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "web", "description": "search the web", "parameters": SEARCH}}]
ASK = [{"role": "user", "content": "Search for 7."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("steered") / "tiny", "tiny", 0, "transformers")
    steer_checkpoint(path, ANSWER)
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config({"model": str(path), "served_model_name": ["kimi", "steered"]}, port=port))
        yield openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    finally:
        served.close()


def _streamed(client, **kw) -> tuple[dict[int, dict], str, str | None]:
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(model="kimi", messages=ASK, temperature=0, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = part.id or entry["id"]
            entry["name"] = (part.function.name if part.function else None) or entry["name"]
            entry["arguments"] += (part.function.arguments if part.function else None) or ""
    return calls, content, finish


def test_tool_call_whole_and_streamed(client) -> None:
    assert [m.id for m in client.models.list().data] == ["kimi", "steered"]
    answer = client.chat.completions.create(model="steered", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64)
    choice = answer.choices[0]
    assert answer.model == "kimi" and choice.finish_reason == "tool_calls" and choice.message.content == "Sure"
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == ("functions.web:0", "function",
                                                                                  "web", ARGS)
    calls, content, finish = _streamed(client, tools=TOOLS, max_tokens=64)
    assert content == "Sure" and finish == "tool_calls"
    assert calls == {0: {"id": call.id, "name": "web", "arguments": ARGS}}


def test_tool_result_round_trip_and_tool_choice_none(client) -> None:
    first = client.chat.completions.create(model="kimi", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": "Sure", "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "7 results"}]
    again = client.chat.completions.create(model="kimi", messages=history, tools=TOOLS, temperature=0, max_tokens=64)
    assert again.choices[0].finish_reason in ("tool_calls", "stop", "length")
    hidden = client.chat.completions.create(model="kimi", messages=ASK, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=64)
    assert hidden.choices[0].message.tool_calls is None and hidden.choices[0].finish_reason != "tool_calls"


# Bounded schemas, so that the tiny model's constrained answer ends well within max_tokens.
BOUNDED = {"type": "object", "properties": {"q": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["q"],
           "additionalProperties": False}
ZONE = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
FORCED_TOOLS = [{"type": "function", "function": {"name": "web", "parameters": BOUNDED}},
                {"type": "function", "function": {"name": "clock", "parameters": ZONE}}]
SCHEMAS = {"web": BOUNDED, "clock": ZONE}


def test_a_named_function_is_called_with_valid_arguments_whole_and_streamed(client) -> None:
    forced = {"tools": FORCED_TOOLS, "tool_choice": {"type": "function", "function": {"name": "clock"}},
              "max_tokens": 64}
    answer = client.chat.completions.create(model="kimi", messages=ASK, temperature=0, **forced)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # OpenAI's finish for a named call
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("functions.clock:0", "function", "clock")
    jsonschema.validate(json.loads(call.function.arguments), ZONE)
    calls, content, finish = _streamed(client, **forced)
    assert content == "" and finish == "stop"
    assert calls == {0: {"id": call.id, "name": "clock", "arguments": call.function.arguments}}


def test_required_calls_declared_functions_with_valid_arguments(client) -> None:
    forced = {"tools": FORCED_TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64}
    answer = client.chat.completions.create(model="kimi", messages=ASK, temperature=0, **forced)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false: exactly one
    for i, call in enumerate(choice.message.tool_calls):
        assert call.id == f"functions.{call.function.name}:{i}" and call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, content, finish = _streamed(client, **forced)
    assert content == "" and finish == "tool_calls"
    assert calls == {i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for i, c in enumerate(choice.message.tool_calls)}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="kimi", messages=ASK, response_format={"type": "json_object"}, **forced)
    assert "tool_choice" in str(refused.value)


def test_n_choices_each_call_the_tool(client) -> None:
    answer = client.chat.completions.create(model="kimi", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
                                            n=4)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert all(c.message.tool_calls[0].function.arguments == ARGS for c in answer.choices)


def test_json_schema_output_parses_and_validates(client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    answer = client.chat.completions.create(model="kimi", messages=[{"role": "user", "content": "Who?"}],
                                            response_format=fmt, temperature=0, max_tokens=64,
                                            extra_body={"chat_template_kwargs": {"thinking": False}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
