"""One chat answer's generated text -> the OpenAI assistant message, whole or as stream deltas.

The parsers chain in the order the model writes: ReasoningSplitter first (when the prompt left the
model inside `<think>`), then its content through the ToolCallParser (when the request offers tools).
Tool-call markers inside the reasoning stay reasoning text. Whole answers go through the same
objects as streams, so a client sees the same answer either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.requests import ChatRequest
from runtime.router.openai_api import ReasoningSplitter
from runtime.router.tool_calls import ToolCallParser, gather_calls
from runtime.tools import tool_names


@dataclass(frozen=True)
class ToolUse:
    """What the output parser needs to know of a request's tools."""

    names: frozenset[str]
    max_calls: int | None  # 1 with parallel_tool_calls false

    @classmethod
    def of(cls, chat: ChatRequest) -> ToolUse | None:
        """None when the answer may not call tools (no tools, or tool_choice "none")."""
        if not chat.tools:
            return None
        return cls(tool_names(chat.tools), None if chat.parallel_tool_calls else 1)


class AssistantStream:
    """Feed each text delta to delta(); message() does the same for a whole answer."""

    def __init__(self, reasoning: bool, tools: ToolUse | None = None):
        self.splitter = ReasoningSplitter(True) if reasoning else None
        self.tools = ToolCallParser(tools.names, tools.max_calls) if tools is not None else None

    def _parts(self, text: str, finished: bool) -> tuple[str, str, list[dict[str, Any]]]:
        """-> (reasoning, content, tool_calls delta entries) of this text."""
        reasoning, content = self.splitter.push(text) if self.splitter is not None else ("", text)
        if finished and self.splitter is not None:
            tail_r, tail_c = self.splitter.finish()
            reasoning, content = reasoning + tail_r, content + tail_c
        if self.tools is None:
            return reasoning, content, []
        out = self.tools.push(content)
        if finished:
            out += self.tools.finish()
        return reasoning, out.content, out.calls

    def delta(self, text: str, finished: bool = False) -> dict[str, Any]:
        """The `delta` of one stream chunk. Without anything else to say it carries `content: ""`."""
        reasoning, content, calls = self._parts(text, finished)
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = calls
        if content or not delta:
            delta["content"] = content
        return delta

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer's `message`: content is null when the answer is only tool calls, as OpenAI's."""
        reasoning, content, entries = self._parts(text, finished=True)
        calls = gather_calls(entries)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if self.splitter is not None:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = calls
        return message

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """"tool_calls" when the model stopped by itself after calling at least one tool; otherwise the
        engine's reason ("length" for a call cut off by max_tokens)."""
        if engine_reason == "stop" and self.tools is not None and self.tools.calls:
            return "tool_calls"
        return engine_reason


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream deltas -> {reasoning_content, content, tool_calls} as a client assembles them (tests, logs)."""
    return {"reasoning_content": "".join(d.get("reasoning_content", "") for d in deltas),
            "content": "".join(d.get("content", "") for d in deltas),
            "tool_calls": gather_calls([e for d in deltas for e in d.get("tool_calls", [])])}
