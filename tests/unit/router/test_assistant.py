"""The assistant message and stream deltas: reasoning first, then content and tool calls, split anywhere."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.router.assistant import AssistantStream, ToolUse, merge_deltas
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

TOOLS = ToolUse(frozenset({"get_weather"}), None)
CALL = f"{SECTION_BEGIN}{CALL_BEGIN}functions.get_weather:0{ARGS_BEGIN}{{\"city\": \"Oslo\"}}{CALL_END}{SECTION_END}"
# Reasoning may mention the markers; only the content's section is a call.
ANSWER = f"I should call {SECTION_BEGIN}get_weather</think>Checking." + CALL


def test_reasoning_then_content_then_a_tool_call() -> None:
    stream = AssistantStream(reasoning=True, tools=TOOLS)
    assert stream.message(ANSWER) == {
        "role": "assistant", "content": "Checking.", "reasoning_content": f"I should call {SECTION_BEGIN}get_weather",
        "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert stream.finish_reason("stop") == "tool_calls"


def test_only_a_call_has_null_content_and_a_cut_call_finishes_with_length() -> None:
    stream = AssistantStream(reasoning=False, tools=TOOLS)
    message = stream.message(CALL)
    assert message["content"] is None and "reasoning_content" not in message
    cut = AssistantStream(reasoning=False, tools=TOOLS)
    assert cut.message(CALL[:CALL.index("lo")])["tool_calls"][0]["function"]["arguments"] == '{"city": "Os'
    assert cut.finish_reason("length") == "length"


def test_without_tools_the_markers_are_plain_content() -> None:
    stream = AssistantStream(reasoning=False)
    assert stream.message(CALL) == {"role": "assistant", "content": CALL}
    assert stream.finish_reason("stop") == "stop"
    assert AssistantStream(reasoning=False).message("") == {"role": "assistant", "content": ""}


def test_an_empty_delta_still_carries_content() -> None:
    stream = AssistantStream(reasoning=True, tools=TOOLS)
    assert stream.delta("</th") == {"content": ""}
    assert stream.delta("ink>") == {"content": ""}
    assert stream.delta("hi", finished=True) == {"content": "hi"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(ANSWER)), max_size=15), st.booleans(), st.integers(0, len(ANSWER)))
def test_stream_deltas_reassemble_to_the_whole_message(cuts, reasoning, end) -> None:
    text = ANSWER[:end]
    stream, deltas, start = AssistantStream(reasoning, TOOLS), [], 0
    bounds = sorted(c for c in cuts if c <= end) + [end]
    for i, cut in enumerate(bounds):
        deltas.append(stream.delta(text[start:cut], finished=i == len(bounds) - 1))
        start = cut
    whole = AssistantStream(reasoning, TOOLS).message(text)
    merged = merge_deltas(deltas)
    assert merged["content"] == (whole["content"] or "")
    assert merged["reasoning_content"] == (whole.get("reasoning_content") or "")
    assert merged["tool_calls"] == whole.get("tool_calls", [])


# --- a forced tool_choice: the output is JSON under the grammar ---------------------------------

NAMED = ToolUse(frozenset({"get_weather"}), 1, "named")
REQUIRED = ToolUse(frozenset({"get_weather", "get_time"}), None, "required")
ARGUMENTS = '{"city":"Oslo \\"]}"}'  # brackets and an escaped quote inside a string
CALLS = f'[{{"name":"get_weather","parameters":{ARGUMENTS}}},{{"name":"get_time","parameters":{{}}}}]'
FORCED = {"named": (NAMED, ARGUMENTS), "required": (REQUIRED, CALLS)}


def test_a_named_function_is_one_call_that_finishes_with_stop() -> None:
    stream = AssistantStream(reasoning=True, tools=NAMED)  # the grammar leaves no room for reasoning
    assert stream.message(ARGUMENTS) == {"role": "assistant", "content": None, "reasoning_content": None,
                                         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                                         "function": {"name": "get_weather",
                                                                      "arguments": ARGUMENTS}}]}
    assert stream.finish_reason("stop") == "stop" and stream.finish_reason("length") == "length"


def test_a_named_stream_opens_the_call_then_sends_fragments() -> None:
    stream = AssistantStream(reasoning=False, tools=NAMED)
    assert stream.delta('{"ci') == {"tool_calls": [
        {"index": 0, "id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"ci'}}]}
    assert stream.delta('ty":"Oslo"}', finished=True) == {"tool_calls": [
        {"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}


def test_required_is_one_call_per_element_sent_when_it_closes() -> None:
    whole = AssistantStream(reasoning=False, tools=REQUIRED)
    assert whole.message(CALLS) == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather",
                                                                           "arguments": ARGUMENTS}},
        {"id": "functions.get_time:1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    assert whole.finish_reason("stop") == "tool_calls"
    stream = AssistantStream(reasoning=False, tools=REQUIRED)
    close = CALLS.index("},{")  # the first element's closing brace
    assert stream.delta(CALLS[:close]) == {"content": ""}
    assert [c["id"] for c in stream.delta(CALLS[close:close + 1])["tool_calls"]] == ["functions.get_weather:0"]


def test_required_cut_by_max_tokens_keeps_the_closed_calls_and_shows_the_rest() -> None:
    cut = CALLS[:CALLS.index("get_time") + 3]
    stream = AssistantStream(reasoning=False, tools=REQUIRED)
    message = stream.message(cut)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert message["content"] == '{"name":"get' and stream.finish_reason("length") == "length"
    one = AssistantStream(reasoning=False, tools=ToolUse(REQUIRED.names, 1, "required"))
    assert len(one.message(CALLS)["tool_calls"]) == 1  # parallel_tool_calls false: no more than one


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(FORCED)), st.lists(st.integers(0, len(CALLS)), max_size=12), st.booleans(),
       st.integers(0, len(CALLS)))
def test_forced_stream_deltas_reassemble_to_the_whole_message(mode, cuts, reasoning, end) -> None:
    tools, answer = FORCED[mode]
    text = answer[:end]
    stream, deltas, start = AssistantStream(reasoning, tools), [], 0
    bounds = sorted(c for c in cuts if c <= len(text)) + [len(text)]
    for i, cut in enumerate(bounds):
        deltas.append(stream.delta(text[start:cut], finished=i == len(bounds) - 1))
        start = cut
    whole = AssistantStream(reasoning, tools).message(text)
    merged = merge_deltas(deltas)
    assert merged["content"] == (whole["content"] or "") and merged["reasoning_content"] == ""
    assert merged["tool_calls"] == whole.get("tool_calls", [])
