"""One chat answer's generated text -> the OpenAI assistant message, whole or as stream deltas.

The parsers chain in the order the model writes: ReasoningSplitter first (when the prompt left the
model inside `<think>`), then its content through the ToolCallParser (when the request offers tools);
with a forced tool_choice the whole text is grammar-shaped JSON, read by runtime.router.forced_calls.
Tool-call markers inside the reasoning stay reasoning text. Whole answers go through the same
objects as streams, so a client sees the same answer either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.requests import ChatRequest
from runtime.router.forced_calls import NamedCallParser, RequiredCallsParser
from runtime.router.openai_api import ReasoningSplitter
from runtime.router.tool_calls import ToolCallParser, gather_calls
from runtime.tools import forced_name, tool_names


@dataclass(frozen=True)
class ToolUse:
    """What the output parser needs to know of a request's tools. `mode`: "auto" (the model's own
    tool-call section, parsed), "named" (the output is the arguments of the one function in `names`)
    or "required" (the output is a JSON array of calls); the last two are forced by the grammar."""

    names: frozenset[str]
    max_calls: int | None  # 1 with parallel_tool_calls false
    mode: str = "auto"

    @classmethod
    def of(cls, chat: ChatRequest) -> ToolUse | None:
        """None when the answer may not call tools (no tools, or tool_choice "none")."""
        if not chat.tools:
            return None
        max_calls = None if chat.parallel_tool_calls else 1
        named = forced_name(chat.tool_choice)
        if named is not None:
            return cls(frozenset({named}), 1, "named")
        return cls(tool_names(chat.tools), max_calls, "required" if chat.tool_choice == "required" else "auto")

    def parser(self) -> ToolCallParser | NamedCallParser | RequiredCallsParser:
        if self.mode == "named":
            (name,) = self.names
            return NamedCallParser(name)
        if self.mode == "required":
            return RequiredCallsParser(self.max_calls)
        return ToolCallParser(self.names, self.max_calls)


class AssistantStream:
    """Feed each text delta to delta(); message() does the same for a whole answer.

    A forced tool_choice's grammar applies from the first generated token: the answer holds no
    reasoning even when the prompt opened `<think>`, so its text is not split (reasoning_content null)."""

    def __init__(self, reasoning: bool, tools: ToolUse | None = None):
        self.forced = tools is not None and tools.mode != "auto"
        self.reasoning = reasoning
        self.splitter = ReasoningSplitter(True) if reasoning and not self.forced else None
        self.tools = tools.parser() if tools is not None else None

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
        if self.reasoning:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = calls
        return message

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """"tool_calls" when the model stopped by itself after calling at least one tool; otherwise the
        engine's reason ("length" for a call cut off by max_tokens). A named tool_choice finishes with
        "stop", as OpenAI's does (and vLLM's)."""
        named = isinstance(self.tools, NamedCallParser)
        if engine_reason == "stop" and self.tools is not None and self.tools.calls and not named:
            return "tool_calls"
        return engine_reason


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream deltas -> {reasoning_content, content, tool_calls} as a client assembles them (tests, logs)."""
    return {"reasoning_content": "".join(d.get("reasoning_content", "") for d in deltas),
            "content": "".join(d.get("content", "") for d in deltas),
            "tool_calls": gather_calls([e for d in deltas for e in d.get("tool_calls", [])])}
