"""A tiny checkpoint steered into a tool call: the engine's own streaming deltas (its incremental
detokenizer) through the reasoning and tool-call parsers give the same answer as the whole text; a
forced tool_choice's grammar overrides the steering."""

from __future__ import annotations

import json

import jsonschema
import pytest

from runtime.checkpoint.maker import make_checkpoint
from runtime.lm_service.offline import OfflineLLM
from runtime.requests import parse_chat_request
from runtime.router.assistant import AssistantStream, ToolUse, merge_deltas
from runtime.settings import EngineConfig
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END
from tests.steering import steer_checkpoint

# Spelled with distinct tokens of the tiny vocabulary (tests.steering): hence the short name and arguments.
ARGS = '{"q": 7}'
ANSWER = f"</think>Sure{SECTION_BEGIN}{CALL_BEGIN}functions.web:0{ARGS_BEGIN}{ARGS}{CALL_END}{SECTION_END}"
BODY = {"messages": [{"role": "user", "content": "Search for 7."}], "temperature": 0, "max_tokens": 64,
        "tools": [{"type": "function", "function": {"name": "web", "parameters": {"type": "object"}}}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("steered") / "tiny", "tiny", 0, "transformers")
    ids = steer_checkpoint(path, ANSWER)
    llm = OfflineLLM(path, EngineConfig(kv_cache_mb=8))
    yield llm, ids
    llm.close()


def _outputs(model: OfflineLLM, body: dict) -> list:
    model.submit("r", parse_chat_request(body, model.defaults.sampling))
    outs = []
    while model.engine.has_unfinished():
        outs += model.step()
    model.run()
    return outs


def test_the_steered_answer_streams_and_parses_to_one_tool_call(model) -> None:
    model, ids = model
    chat = parse_chat_request(BODY, model.defaults.sampling)
    outs = _outputs(model, BODY)
    text = "".join(o.text for o in outs)
    assert text == ANSWER and outs[-1].finish_reason == "stop" and len(outs) == len(ids) + 1
    whole = AssistantStream(True, ToolUse.of(chat))
    message = whole.message(text)
    assert message == {"role": "assistant", "content": "Sure", "reasoning_content": None, "tool_calls": [
        {"id": "functions.web:0", "type": "function", "function": {"name": "web", "arguments": ARGS}}]}
    assert whole.finish_reason("stop") == "tool_calls"
    stream = AssistantStream(True, ToolUse.of(chat))
    merged = merge_deltas([stream.delta(o.text, o.finished) for o in outs])
    assert merged == {"reasoning_content": "", "content": "Sure", "tool_calls": message["tool_calls"]}


def test_max_tokens_inside_the_arguments_leaves_a_cut_call(model) -> None:
    model, ids = model
    into_args = ids.index(model.tokenizer.convert_tokens_to_ids(ARGS_BEGIN)) + 3
    outs = _outputs(model, {**BODY, "max_tokens": into_args})
    assert outs[-1].finish_reason == "length"
    stream = AssistantStream(True, ToolUse.of(parse_chat_request(BODY)))
    message = stream.message("".join(o.text for o in outs))
    assert stream.finish_reason("length") == "length"
    (call,) = message["tool_calls"]
    assert ARGS.startswith(call["function"]["arguments"]) and call["function"]["arguments"] != ARGS


SEARCH = {"type": "object", "properties": {"q": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["q"],
          "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
         "additionalProperties": False}
FORCED = {**BODY, "parallel_tool_calls": False, "tools": [
    {"type": "function", "function": {"name": "web", "parameters": SEARCH}},
    {"type": "function", "function": {"name": "clock", "parameters": CLOCK}}]}


@pytest.mark.parametrize("choice,reason", [({"type": "function", "function": {"name": "clock"}}, "stop"),
                                           ("required", "tool_calls")])
def test_a_forced_tool_choice_is_enforced_and_read_back_as_calls(model, choice, reason) -> None:
    """The grammar overrides the steered answer: the output is JSON from the first token, and the engine's
    deltas through the forced parsers give the same calls as the whole text."""
    model, _ = model
    body = {**FORCED, "tool_choice": choice}
    chat = parse_chat_request(body, model.defaults.sampling)
    outs = _outputs(model, body)
    whole = AssistantStream(True, ToolUse.of(chat))
    message = whole.message("".join(o.text for o in outs))
    assert outs[-1].finish_reason == "stop" and whole.finish_reason("stop") == reason
    (call,) = message["tool_calls"]
    schema = {"web": SEARCH, "clock": CLOCK}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert message["content"] is None and message["reasoning_content"] is None
    stream = AssistantStream(True, ToolUse.of(chat))
    merged = merge_deltas([stream.delta(o.text, o.finished) for o in outs])
    assert merged == {"reasoning_content": "", "content": "", "tool_calls": message["tool_calls"]}
