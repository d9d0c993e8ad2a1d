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
