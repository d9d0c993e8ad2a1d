"""A forced tool_choice's generated JSON -> OpenAI `tool_calls`, streaming-safe.

With tool_choice "required" or a named function the grammar (runtime.tools.tool_choice_schema)
shapes the whole output, so there is no marker to look for:
- named: the output is the function's arguments, streamed as they arrive (the call's id, type and
  name first, with arguments "");
- required: the output is `[{"name": N, "parameters": {...}}, ...]`; each element becomes a call
  (id `functions.N:i`, arguments its parameters as compact JSON) when the element closes.
Both parsers have ToolCallParser's interface (push, finish, calls), so AssistantStream treats all
three alike. An element cut off by max_tokens, or text that is not a call (not possible under the
grammar, but never raised on), stays visible as content; elements past `max_calls` are dropped.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.router.tool_calls import ToolDelta


def _header(index: int, name: str, arguments: str = "") -> dict[str, Any]:
    return {"index": index, "id": f"functions.{name}:{index}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class NamedCallParser:
    """The whole output is the arguments of one call to `name`."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    def push(self, text: str) -> ToolDelta:
        out = ToolDelta()
        if not self.calls:
            out.calls.append(_header(0, self.name))
            self.calls = 1
        out.args(0, text)
        return out

    def finish(self) -> ToolDelta:
        return self.push("")


class RequiredCallsParser:
    """The output is a JSON array of {"name", "parameters"}; each element is one call. `max_calls`:
    1 for parallel_tool_calls false (the grammar already allows no more)."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls = 0
        self._depth = 0  # brackets open outside strings; elements sit at depth 1
        self._in_string = self._escaped = False
        self._element = ""  # the text of the element being read

    def push(self, text: str) -> ToolDelta:
        out = ToolDelta()
        for char in text:
            self._read(char, out)
        return out

    def finish(self) -> ToolDelta:
        """An element the output ended inside (max_tokens) is content: it is not a call."""
        out, self._element = ToolDelta(self._element), ""
        return out

    def _read(self, char: str, out: ToolDelta) -> None:
        if self._depth == 0 and char != "[":  # outside the array: not a call
            out.content += char
            return
        if self._depth >= 2 or (self._depth == 1 and char not in ", \n\t\r]"):
            self._element += char
        if self._in_string:
            self._in_string = char != '"' or self._escaped
            self._escaped = char == "\\" and not self._escaped
        elif char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}":
            self._depth -= 1
            if self._depth == 1:
                self._close(out)

    def _close(self, out: ToolDelta) -> None:
        text, self._element = self._element, ""
        try:
            element = json.loads(text)
            name, arguments = element["name"], element["parameters"]
        except (ValueError, TypeError, KeyError):
            out.content += text
            return
        if not isinstance(name, str):
            out.content += text
            return
        if self.max_calls is not None and self.calls >= self.max_calls:
            return
        out.calls.append(_header(self.calls, name, json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)))
        self.calls += 1
