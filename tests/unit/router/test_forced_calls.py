"""The forced tool_choice parsers on text the grammar would never allow: nothing raises, nothing is lost."""

from __future__ import annotations

from runtime.router.forced_calls import NamedCallParser, RequiredCallsParser


def _whole(parser, text: str) -> tuple[str, list]:
    out = parser.push(text)
    out += parser.finish()
    return out.content, out.calls


def test_what_is_not_a_call_stays_content() -> None:
    content, calls = _whole(RequiredCallsParser(), 'x[{"name":1,"parameters":{}},[2],{"name":"f","parameters":[]}]y')
    assert content == 'x{"name":1,"parameters":{}}[2]y'
    assert calls == [{"index": 0, "id": "functions.f:0", "type": "function",
                      "function": {"name": "f", "arguments": "[]"}}]


def test_arguments_are_compact_json_of_the_parameters() -> None:
    content, calls = _whole(RequiredCallsParser(), '[ {"name": "f", "parameters": {"a": [1, "é"]}} ]')
    assert content == "" and calls[0]["function"]["arguments"] == '{"a":[1,"é"]}'


def test_a_named_call_exists_even_when_nothing_was_generated() -> None:
    assert _whole(NamedCallParser("f"), "") == ("", [{"index": 0, "id": "functions.f:0", "type": "function",
                                                      "function": {"name": "f", "arguments": ""}}])
