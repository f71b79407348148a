"""JSON-Schema keywords and regex features the grammar cannot enforce, found before compiling.

xgrammar (0.2.x) silently drops some keywords (``not``, ``if``/``then``/``else``,
``dependentRequired``, ``uniqueItems``, several-entry ``allOf``, unknown ``format``s) and
regex lookarounds: the output would then not follow the schema the client sent. Those are a
400 that names the keyword and where it is, rather than output that fails the client's own
validation. Measured on xgrammar 0.2.8 with accept/reject pairs for each keyword
(tests/unit/test_structured_output.py keeps that list honest).
"""
from __future__ import annotations

import re
from typing import Any

# keywords whose constraint xgrammar does not apply (or applies wrongly)
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "contains", "minContains", "maxContains", "minProperties", "maxProperties",
    "unevaluatedItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
})
# string formats xgrammar turns into a grammar (others would be ignored)
SUPPORTED_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
    "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
# a schema's sub-schemas: keyword -> how they are nested
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties")
# lookarounds and backreferences: not regular, so no grammar has them
_NON_REGULAR = re.compile(r"\(\?(?:=|!|<=|<!)|\\[1-9]|\\k<")
_MAX_DEPTH = 64


def check_regex(pattern: str, where: str = "regex") -> None:
    if _NON_REGULAR.search(pattern):
        raise ValueError(f"{where}: lookarounds ((?=, (?!, (?<=, (?<!) and backreferences are "
                         "not supported in structured-output regexes.")


def check_json_schema(schema: Any) -> None:
    """ValueError naming the first unsupported keyword (with its JSON path)."""
    _walk(schema, "#", 0)


def _walk(node: Any, path: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"the JSON schema nests deeper than {_MAX_DEPTH} levels at {path}.")
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ValueError(f"the JSON schema at {path} must be an object or a boolean, got "
                         f"{type(node).__name__}.")
    for key in node:
        if key in UNSUPPORTED_KEYWORDS:
            raise ValueError(f"the JSON-Schema keyword {key!r} (at {path}) is not supported by "
                             "structured outputs here; remove it or express it another way.")
    if node.get("uniqueItems") is True:
        raise ValueError(f"the JSON-Schema keyword 'uniqueItems' (at {path}) is not supported "
                         "by structured outputs here.")
    fmt = node.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"the JSON-Schema format {fmt!r} (at {path}) is not supported; "
                         f"supported formats: {sorted(SUPPORTED_FORMATS)}.")
    if isinstance(node.get("pattern"), str):
        check_regex(node["pattern"], f"the pattern at {path}")
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        raise ValueError(f"'allOf' with several schemas (at {path}) is not supported by "
                         "structured outputs here; merge them into one schema.")
    for key in _SCHEMA_MAPS:
        sub = node.get(key)
        if isinstance(sub, dict):
            for name, s in sub.items():
                if key == "patternProperties":
                    check_regex(name, f"the patternProperties key at {path}")
                _walk(s, f"{path}/{key}/{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        sub = node.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                _walk(s, f"{path}/{key}/{i}", depth + 1)
    for key in _SCHEMA_ONE:
        sub = node.get(key)
        if isinstance(sub, (dict, bool)):
            _walk(sub, f"{path}/{key}", depth + 1)
