"""Function calling, the request side: Kimi's tool-call markers, and `tools`, `tool_choice`,
`parallel_tool_calls` and the tool-call fields of messages validated into plain values.

Below both the request parser and the router: the markers are named here once for the router's output
parser (runtime.router.tool_calls), and the tool_choice rule lives here once: "required" and a named
function are enforced by a JSON grammar (constrain), whose output the router reads back as calls.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from runtime.errors import RequestError
from runtime.protocol import SamplingParams, StructuredOutput
from runtime.structured import checked

# Kimi's tool-call section, as its chat template renders it and the model generates it:
#   <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
#   <|tool_call_end|>...<|tool_calls_section_end|>
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGS_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGS_BEGIN, CALL_END)

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")


def parse_tools(raw: Any) -> list[dict[str, Any]] | None:
    """`tools` -> the list as sent (None when absent or empty), each entry checked."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("tools must be a list", "tools")
    names: set[str] = set()
    for i, tool in enumerate(raw):
        name = _tool_name(tool, f"tools[{i}]")
        if name in names:
            raise RequestError(f"tools[{i}]: function {name!r} is declared twice", f"tools[{i}].function.name")
        names.add(name)
    return raw or None


def _tool_name(tool: Any, where: str) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise RequestError(f"{where} must be an object with type 'function'", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"{where}.function must be an object", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RequestError(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -", f"{where}.function.name")
    if not isinstance(function.get("description", ""), str):
        raise RequestError(f"{where}.function.description must be a string", f"{where}.function.description")
    if not isinstance(function.get("parameters", {}), dict):
        raise RequestError(f"{where}.function.parameters must be a JSON Schema object", f"{where}.function.parameters")
    return name


def tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    return frozenset(t["function"]["name"] for t in tools or ())


def parse_tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """`tool_choice` -> "none", "auto", "required" or {"type": "function", "function": {"name": X}}.

    "required" and a named function force a call; `constrain` below puts the grammar that enforces
    it into the request's sampling params."""
    if raw is None:
        return "auto" if tools else "none"
    if isinstance(raw, str):
        if raw not in CHOICES:
            raise RequestError(f"tool_choice must be one of {list(CHOICES)} or a function", "tool_choice")
        choice: str | dict[str, Any] = raw
    else:
        function = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise RequestError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
                               "tool_choice")
        if name not in tool_names(tools):
            raise RequestError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        choice = {"type": "function", "function": {"name": name}}
    if choice not in ("auto", "none") and not tools:
        raise RequestError("tool_choice 'required' or a named function needs tools", "tool_choice")
    return choice


def parse_parallel_tool_calls(raw: Any) -> bool:
    if raw is None:
        return True
    if not isinstance(raw, bool):
        raise RequestError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return raw


# --- messages --------------------------------------------------------------------------------


def check_message_tool_fields(msg: dict[str, Any], where: str) -> None:
    """An assistant turn's `tool_calls` and a tool turn's `tool_call_id`, in OpenAI's shape."""
    if msg.get("role") == "tool":
        if not isinstance(msg.get("tool_call_id"), str) or not msg["tool_call_id"]:
            raise RequestError(f"{where}.tool_call_id must be a non-empty string", f"{where}.tool_call_id")
        return
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if msg.get("role") != "assistant":
        raise RequestError(f"{where}.tool_calls is only allowed on assistant messages", f"{where}.tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    for j, call in enumerate(calls):
        _check_call(call, f"{where}.tool_calls[{j}]")


def _check_call(call: Any, where: str) -> None:
    if not isinstance(call, dict):
        raise RequestError(f"{where} must be an object", where)
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise RequestError(f"{where}.id must be a non-empty string", f"{where}.id")
    if call.get("type", "function") != "function":
        raise RequestError(f"{where}.type must be 'function'", f"{where}.type")
    function = call.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"{where}.function must be an object", f"{where}.function")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    if not isinstance(function.get("arguments"), str):
        raise RequestError(f"{where}.function.arguments must be a string (JSON text)", f"{where}.function.arguments")


# --- forced calls: the grammar ----------------------------------------------------------------


def forced_name(tool_choice: str | dict[str, Any]) -> str | None:
    """The function a named tool_choice forces, or None."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def constrain(sampling: SamplingParams, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any],
              parallel: bool = True) -> SamplingParams:
    """The sampling params, with the grammar that enforces a forced `tool_choice` (as vLLM does: JSON
    under a grammar, not the model's own tool-call section). Unchanged for "auto" and "none"."""
    schema = tool_choice_schema(tools, tool_choice, parallel)
    if schema is None:
        return sampling
    if sampling.structured is not None:
        raise RequestError("tool_choice 'required' or a named function cannot be combined with response_format "
                           "or structured_outputs (both constrain the output)", "tool_choice")
    if sampling.min_tokens:  # the grammar decides where the output ends
        raise RequestError("min_tokens cannot be combined with tool_choice 'required' or a named function",
                           "min_tokens")
    spec = checked(StructuredOutput("json", json.dumps(schema)), "tools")
    return msgspec.structs.replace(sampling, structured=spec)


def tool_choice_schema(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any],
                       parallel: bool = True) -> dict[str, Any] | None:
    """The JSON schema the whole output must match for `tool_choice`, or None when nothing is forced.

    A named function: its arguments, an object under its `parameters`. "required": an array of at
    least one (at most one unless `parallel`) {"name": NAME, "parameters": ARGUMENTS}, any declared
    function; each function's `$defs` move to the root, where their `#/$defs/...` references point."""
    if tool_choice in ("none", "auto") or not tools:
        return None
    functions = {t["function"]["name"]: t["function"] for t in tools}
    named = forced_name(tool_choice)
    if named is not None:
        return _arguments(functions[named])
    defs: dict[str, Any] = {}
    elements = [_element(name, _hoist_defs(_arguments(f), defs)) for name, f in functions.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": elements}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _arguments(function: dict[str, Any]) -> dict[str, Any]:
    """A function's `parameters` (an object, as OpenAI's arguments always are)."""
    schema = dict(function.get("parameters") or {})
    schema.setdefault("type", "object")
    return schema


def _element(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
            "required": ["name", "parameters"], "additionalProperties": False}


def _hoist_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema without its `$defs`, which join `defs` (a name two functions define differently is refused)."""
    own = schema.pop("$defs", None) or {}
    for key, definition in own.items():
        if defs.setdefault(key, definition) != definition:
            raise RequestError(f"tools: two functions define $defs {key!r} differently, which tool_choice "
                               "'required' cannot combine", "tools")
    return schema
