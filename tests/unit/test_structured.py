from __future__ import annotations

import json

import msgspec
import pytest

from runtime.errors import RequestError
from runtime.protocol import CoreAdd, SamplingParams, StructuredOutput
from runtime.requests import RequestLimits, parse_sampling
from runtime.structured import parse_structured

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def _parse(**body) -> StructuredOutput | None:
    return parse_sampling(body, {}, RequestLimits()).structured


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json", '{"type": "object"}')),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
         StructuredOutput("json", json.dumps(SCHEMA))),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json", json.dumps(SCHEMA))),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput("json", json.dumps(SCHEMA))),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json", '{"type": "object"}')),
        ({"structured_outputs": {"regex": "[a-z]{3}"}}, StructuredOutput("regex", "[a-z]{3}")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput("choice", '["yes", "no"]')),
        ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, StructuredOutput("grammar", 'root ::= "a" | "b"')),
        ({"structured_outputs": {"grammar": 'start: "a"+'}}, StructuredOutput("grammar", 'start: "a"+')),
        ({"guided_json": SCHEMA}, StructuredOutput("json", json.dumps(SCHEMA))),
        ({"guided_regex": "\\d+"}, StructuredOutput("regex", "\\d+")),
        ({"guided_choice": ["a b", 'say "hi"']}, StructuredOutput("choice", json.dumps(["a b", 'say "hi"']))),
        ({"guided_grammar": 'start: "x"'}, StructuredOutput("grammar", 'start: "x"')),
        ({"response_format": {"type": "text"}, "guided_regex": "a"}, StructuredOutput("regex", "a")),
    ],
)
def test_every_spelling_maps_to_one_spec(body: dict, expected: StructuredOutput | None) -> None:
    assert _parse(**body) == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": SCHEMA}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
         "response_format.json_schema.strict"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wizard"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 2}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": [1]}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": {"type": "string", "maxLength": "abc"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "garbage ::="}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": "a"}, "structured_outputs"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
    ],
)
def test_bad_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as e:
        _parse(**body)
    assert e.value.field == field


def test_strict_schema_closes_every_object_it_does_not_open() -> None:
    schema = {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {"type": "string"}}},
                                               "free": {"type": "object", "additionalProperties": True}},
              "$defs": {"d": {"properties": {"y": {"type": "integer"}}}},
              "anyOf": [{"type": "object"}], "items": {"type": "object"}}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}}
    closed = json.loads(parse_structured(body).text)  # type: ignore[union-attr]
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False and closed["items"]["additionalProperties"] is False
    assert "x" in closed["properties"]["inner"]["properties"]  # properties themselves are untouched
    assert parse_structured({"structured_outputs": {"json": schema, "disable_additional_properties": True}}) == \
        parse_structured(body)


def test_spec_crosses_the_process_boundary() -> None:
    params = parse_sampling({"structured_outputs": {"choice": ["a", "b"]}}, {}, RequestLimits())
    wire = msgspec.msgpack.encode(CoreAdd("r", [1, 2], params))
    assert msgspec.msgpack.decode(wire, type=CoreAdd).sampling == params
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams()), type=SamplingParams).structured is None
