"""A request's structured-output fields -> one ``StructuredOutputsParams`` (or None).

Accepted spellings, one per request: OpenAI's ``response_format`` (``json_object``,
``json_schema`` with ``strict``; ``text`` is no constraint), vLLM's ``structured_outputs`` and
its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from servelm.server.protocol import SamplingRequest, bad_request
from servelm.structured_output import StructuredOutputsParams

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_BACKENDS = ("auto", "xgrammar")


def structured_outputs_of(req: SamplingRequest) -> Optional[StructuredOutputsParams]:
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED)
             if getattr(req, name) is not None]
    rf = req.response_format
    if rf is not None and rf.type == "text":
        given.remove("response_format")  # plain text: no constraint
    if len(given) > 1:
        raise bad_request(f"use one way of constraining the output; got {given}.", given[1])
    if req.guided_decoding_backend is not None and req.guided_decoding_backend not in _BACKENDS:
        raise bad_request(f"guided_decoding_backend must be one of {list(_BACKENDS)}; this "
                          f"server has xgrammar, got {req.guided_decoding_backend!r}.",
                          "guided_decoding_backend")
    if req.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported (an outlines option); use "
                          "structured_outputs.disable_any_whitespace for compact JSON.",
                          "guided_whitespace_pattern")
    if not given:
        return None
    field = given[0]
    try:
        return _params(req, field)
    except ValueError as e:
        raise bad_request(str(e), field) from None


def _params(req: SamplingRequest, field: str) -> StructuredOutputsParams:
    if field == "response_format":
        rf = req.response_format
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        js = rf.json_schema
        if js is None or js.schema_ is None:
            # OpenAI requires a schema; without one any JSON object is what was meant
            if js is None:
                raise ValueError("response_format json_schema needs a json_schema object with a "
                                 "'schema'.")
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=_schema(js.schema_))
    if field == "structured_outputs":
        so = req.structured_outputs
        return StructuredOutputsParams(
            json=_schema(so.json_) if so.json_ is not None else None,
            json_object=bool(so.json_object), regex=so.regex, choice=so.choice,
            grammar=so.grammar, disable_any_whitespace=so.disable_any_whitespace)
    if field == "guided_json":
        return StructuredOutputsParams(json=_schema(req.guided_json))
    if field == "guided_regex":
        return StructuredOutputsParams(regex=req.guided_regex)
    if field == "guided_choice":
        return StructuredOutputsParams(choice=req.guided_choice)
    return StructuredOutputsParams(grammar=req.guided_grammar)


def _schema(schema: Any) -> Any:
    """A schema given as JSON text is parsed here, so errors name it as such."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}.") from None
    if isinstance(schema, bool):
        return {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ValueError("the JSON schema must be an object.")
    return schema
