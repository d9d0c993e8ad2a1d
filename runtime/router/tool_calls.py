"""Kimi's tool-call section in generated text -> OpenAI `tool_calls`, streaming-safe.

    content <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
    <|tool_calls_section_end|> content

One state machine serves both the whole answer (push everything, then finish) and the stream (push
each text delta), so the two cannot disagree. A marker split across deltas is held back until it is
complete, as ReasoningSplitter does with `</think>`.

What is not a well-formed call stays visible as content, never raises:
- a call whose id is not `[functions.]NAME:IDX` with NAME a declared tool: its raw text, markers
  included, up to and including its `<|tool_call_end|>`;
- a call cut off before its `<|tool_call_argument_begin|>` (max_tokens): its raw text;
- text inside the section between calls: as content, whitespace dropped.
A call cut off inside its arguments (max_tokens) is still a call, with the arguments generated so
far: the stream has already sent them. Calls past `max_calls` (parallel_tool_calls false) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from runtime.router.openai_api import _partial_suffix
from runtime.tools import ARGS_BEGIN, CALL_BEGIN, CALL_END, MARKERS, SECTION_BEGIN, SECTION_END

CALL_ID = re.compile(r"(?:functions\.)?([a-zA-Z0-9_-]{1,64}):[0-9]+")
MAX_ID_CHARS = 128  # longer than any valid id: past this without <|tool_call_argument_begin|>, the call is bad


def tool_markers_problem(tokenizer: Any) -> str | None:
    """Why this tokenizer cannot carry Kimi tool calls, or None when it can: every marker must be a
    token of the vocabulary, and decoding it with skip_special_tokens (the default) must keep its text."""
    vocab = tokenizer.get_vocab()
    missing = [m for m in MARKERS if m not in vocab]
    if missing:
        return f"the tokenizer has no {', '.join(missing)} token(s)"
    dropped = [m for m in MARKERS if tokenizer.decode([vocab[m]], skip_special_tokens=True) != m]
    if dropped:
        return f"the tokenizer drops {', '.join(dropped)} from decoded text (special tokens)"
    return None


class _State(Enum):
    TEXT = "text"  # outside a section
    SECTION = "section"  # inside a section, between calls
    NAME = "name"  # after <|tool_call_begin|>, reading the id
    ARGS = "args"  # a good call's arguments
    BAD = "bad"  # a bad call's text: goes to content
    DROP = "drop"  # a call past max_calls: discarded


# The markers that end each state's text; everything else is that state's text.
_ENDS = {
    _State.TEXT: (SECTION_BEGIN,),
    _State.SECTION: (CALL_BEGIN, SECTION_END),
    _State.NAME: MARKERS,
    _State.ARGS: (CALL_END, CALL_BEGIN, SECTION_END),
    _State.BAD: (CALL_END, CALL_BEGIN, SECTION_END),
    _State.DROP: (CALL_END, CALL_BEGIN, SECTION_END),
}


@dataclass
class ToolDelta:
    """What one push produced: content text and OpenAI `tool_calls` delta entries, in order."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def args(self, index: int, text: str) -> None:
        if not text:
            return
        last = self.calls[-1] if self.calls else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += text
        else:
            self.calls.append({"index": index, "function": {"arguments": text}})

    def __iadd__(self, other: ToolDelta) -> ToolDelta:
        self.content += other.content
        for entry in other.calls:
            if "id" in entry:
                self.calls.append(entry)
            else:
                self.args(entry["index"], entry["function"]["arguments"])
        return self


class ToolCallParser:
    """Feed generated text with push(); finish() at the end. `names`: the declared functions (a call
    to another is bad); `max_calls`: 1 for parallel_tool_calls false."""

    def __init__(self, names: Collection[str] | None = None, max_calls: int | None = None):
        self.names, self.max_calls = names, max_calls
        self.calls = 0  # calls emitted so far
        self._state = _State.TEXT
        self._held = ""
        self._id = ""  # the NAME state's text so far
        self._args_started = False  # the current call has emitted non-blank arguments
        self._blank = ""  # trailing blanks of the arguments, sent only if more arguments follow

    def push(self, text: str) -> ToolDelta:
        out = ToolDelta()
        text, self._held = self._held + text, ""
        while text:
            state, ends = self._state, _ENDS[self._state]
            at, marker = _first(text, ends)
            if marker is None:
                keep = _partial_suffix_any(text, ends)
                self._held = text[len(text) - keep:]
                self._text(text[: len(text) - keep], out)
                break
            self._text(text[:at], out)
            if self._state is not state:  # an over-long id made the call bad: read the marker as BAD text
                text = text[at:]
                continue
            text = self._marker(marker, out) + text[at + len(marker):]
        return out

    def finish(self) -> ToolDelta:
        """The answer ended: held text goes where it belongs; an unfinished call's id becomes content."""
        out, held, self._held = ToolDelta(), self._held, ""
        if self._state is _State.NAME:
            self._id += held
            self._bad(out)
        elif self._state is not _State.DROP:
            self._text(held, out)
        self._state, self._blank = _State.TEXT, ""
        return out

    # --- one state's text, one marker ----------------------------------------------------------

    def _text(self, text: str, out: ToolDelta) -> None:
        state = self._state
        if state in (_State.TEXT, _State.BAD):
            out.content += text
        elif state is _State.SECTION:
            out.content += "".join(text.split())
        elif state is _State.NAME:
            self._id += text
            if len(self._id) > MAX_ID_CHARS:
                self._bad(out)
        elif state is _State.ARGS:
            self._args(text, out)

    def _args(self, text: str, out: ToolDelta) -> None:
        """Arguments as generated, without the blanks around them: trailing blanks wait for more text."""
        text = self._blank + text if self._args_started else text.lstrip()
        body = text.rstrip()
        self._blank = text[len(body):]
        if body:
            self._args_started = True
            out.args(self.calls - 1, body)

    def _marker(self, marker: str, out: ToolDelta) -> str:
        """Act on a marker that ends the current state's text; return text to process before the rest."""
        state = self._state
        if state is _State.NAME:
            if marker == ARGS_BEGIN and self._start_call(out):
                return ""
            self._bad(out)
            return marker  # read again as the bad call's text
        self._blank = ""
        if marker == SECTION_BEGIN:
            self._state = _State.SECTION
        elif marker == SECTION_END:
            self._state = _State.TEXT
        elif marker == CALL_BEGIN:
            self._state, self._id = _State.NAME, ""
        elif marker == CALL_END:
            if state is _State.BAD:
                out.content += CALL_END
            self._state = _State.SECTION
        return ""

    def _start_call(self, out: ToolDelta) -> bool:
        call_id = self._id.strip()
        found = CALL_ID.fullmatch(call_id)
        if found is None or (self.names is not None and found.group(1) not in self.names):
            return False
        if self.max_calls is not None and self.calls >= self.max_calls:
            self._state = _State.DROP
            return True
        out.calls.append({"index": self.calls, "id": call_id, "type": "function",
                          "function": {"name": found.group(1), "arguments": ""}})
        self.calls += 1
        self._state, self._args_started = _State.ARGS, False
        return True

    def _bad(self, out: ToolDelta) -> None:
        """Not a call after all: what was read of it is content, and so is the rest of it."""
        out.content += CALL_BEGIN + self._id
        self._state, self._id = _State.BAD, ""


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """Earliest marker in text (position, marker), or (-1, None)."""
    best, found = -1, None
    for m in markers:
        at = text.find(m)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, m
    return best, found


def _partial_suffix_any(text: str, markers: tuple[str, ...]) -> int:
    return max(_partial_suffix(text, m) for m in markers)


# --- the whole answer ------------------------------------------------------------------------


def gather_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` delta entries -> whole `tool_calls`, as a client would assemble them."""
    calls: dict[int, dict[str, Any]] = {}
    for entry in deltas:
        index = entry["index"]
        if "id" in entry:
            calls[index] = {"id": entry["id"], "type": "function",
                            "function": {"name": entry["function"]["name"], "arguments": ""}}
        calls[index]["function"]["arguments"] += entry["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def parse_tool_calls(text: str, names: Collection[str] | None = None,
                     max_calls: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer -> (content, tool_calls)."""
    parser = ToolCallParser(names, max_calls)
    out = parser.push(text)
    out += parser.finish()
    return out.content, gather_calls(out.calls)

