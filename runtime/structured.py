"""Structured output: the request fields that ask for it -> one checked StructuredOutput.

Three spellings reach one spec: OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object) and vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. The spec is checked here, where the request
enters (a bad schema or regex is a 400 naming the field), by the grammar engine that the LM engine
compiles it with later (runtime.lm_service.grammar); `grammar_text` is the one translation both use.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from runtime.errors import RequestError
from runtime.protocol import StructuredOutput

__all__ = ["STRUCTURED_FIELDS", "StructuredOutput", "grammar_text", "parse_structured"]

_LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_FORMS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM options whose effect we give anyway (compact JSON, no fallback engine) or that we honour.
_OPTIONS = {"disable_any_whitespace", "disable_fallback", "disable_additional_properties"}
_ENGINE_FORMAT = {"regex": "regex", "choice": "choice", "grammar": "grammar"}


def parse_structured(body: dict[str, Any]) -> StructuredOutput | None:
    """The body's structured-output request, checked; None if it asks for plain text."""
    found = [(name, parse) for name, parse in _SOURCES if body.get(name) is not None]
    specs = [(name, parse(body[name], name)) for name, parse in found]
    specs = [(name, spec) for name, spec in specs if spec is not None]
    if len(specs) > 1:
        raise RequestError(f"give only one of {', '.join(name for name, _ in specs)}", specs[1][0])
    if not specs:
        return None
    return specs[0][1]


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of a spec (raises ValueError for a grammar it cannot read). JSON comes
    compact, with no free whitespace: a model may otherwise pad with whitespace until max_tokens
    (vLLM's disable_any_whitespace; a schema's own "x-guidance" options still apply)."""
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults={"whitespace_flexible": False})
    return llguidance.grammar_from(_ENGINE_FORMAT[spec.kind], spec.text)  # type: ignore[arg-type]


def checked(spec: StructuredOutput, field: str) -> StructuredOutput:
    """The spec, if the grammar engine can compile it; else a RequestError naming the field."""
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    except ValueError as e:
        error = str(e)
    if error:
        raise RequestError(f"{field}: invalid {spec.kind}: {error.strip()}", field)
    return spec


# --- the three spellings ---------------------------------------------------------------------------


def _response_format(raw: Any, where: str) -> StructuredOutput | None:
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", where)
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", '{"type": "object"}')
    if kind != "json_schema":
        raise RequestError(f"{where}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           f"{where}.type")
    inner = raw.get("json_schema")
    where = f"{where}.json_schema"
    if not isinstance(inner, dict):
        raise RequestError(f"{where} must be an object with a 'schema'", where)
    if not isinstance(inner.get("name", ""), str):
        raise RequestError(f"{where}.name must be a string", f"{where}.name")
    strict = inner.get("strict") or False
    if not isinstance(strict, bool):
        raise RequestError(f"{where}.strict must be a boolean", f"{where}.strict")
    return _json_spec(inner.get("schema"), f"{where}.schema", closed=strict)


def _structured_outputs(raw: Any, where: str) -> StructuredOutput | None:
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", where)
    unknown = sorted(set(raw) - set(_FORMS) - _OPTIONS)
    if unknown:
        raise RequestError(f"{where}.{unknown[0]} is not supported (use one of {', '.join(_FORMS)})",
                           f"{where}.{unknown[0]}")
    forms = [k for k in _FORMS if raw.get(k) not in (None, False)]
    if len(forms) != 1:
        raise RequestError(f"{where} must give exactly one of {', '.join(_FORMS)}", where)
    closed = raw.get("disable_additional_properties", False)
    if not isinstance(closed, bool):
        raise RequestError(f"{where}.disable_additional_properties must be a boolean",
                           f"{where}.disable_additional_properties")
    form = forms[0]
    if form == "json_object":
        return StructuredOutput("json", '{"type": "object"}')
    return _form(form, raw[form], f"{where}.{form}", closed)


def _legacy(name: str) -> Any:
    return lambda raw, where: _form(_LEGACY[name], raw, where, False)


def _form(form: str, raw: Any, where: str, closed: bool) -> StructuredOutput:
    if form == "json":
        return _json_spec(raw, where, closed)
    if form == "choice":
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
            raise RequestError(f"{where} must be a non-empty list of strings", where)
        return checked(StructuredOutput("choice", json.dumps(raw)), where)
    if not isinstance(raw, str) or not raw:
        raise RequestError(f"{where} must be a non-empty string", where)
    return checked(StructuredOutput(form, raw), where)


def _json_spec(schema: Any, where: str, closed: bool) -> StructuredOutput:
    if isinstance(schema, str):  # vLLM also takes the schema as JSON text
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where} is not valid JSON: {e}", where) from e
    if not isinstance(schema, dict | bool):
        raise RequestError(f"{where} must be a JSON schema (an object)", where)
    return checked(StructuredOutput("json", json.dumps(_closed(schema) if closed else schema)), where)


def _closed(schema: Any) -> Any:
    """Strict mode: objects take no properties beyond those named, unless the schema says otherwise
    (OpenAI's strict json_schema; vLLM's disable_additional_properties)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_closed(sub) for sub in value]
        elif key in _SCHEMAS:
            out[key] = _closed(value)
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "allOf", "oneOf", "prefixItems"}
_SCHEMAS = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames"}


_SOURCES = [("response_format", _response_format), ("structured_outputs", _structured_outputs),
            *((name, _legacy(name)) for name in _LEGACY)]
STRUCTURED_FIELDS = tuple(name for name, _ in _SOURCES)  # the body fields that may ask for structured output
