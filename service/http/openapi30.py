"""OpenAPI 3.1 → 3.0.3, for tools that read only 3.0 (Swagger UI 4 at ``/docs``).

Pure functions over JSON: a document in, a new document out, nothing imported from the web layer.
3.1 schemas are JSON Schema 2020-12; 3.0's schema object is an older, smaller dialect. Each schema
is rewritten keyword by keyword: ``type: [T, "null"]`` and an ``anyOf``/``oneOf`` with a null
branch become ``nullable: true``, ``const`` a one-value ``enum``, ``examples`` one ``example``,
numeric ``exclusiveMinimum``/``exclusiveMaximum`` the boolean form beside ``minimum``/``maximum``,
``patternProperties`` an ``additionalProperties``. Everything outside the schemas (paths,
parameters, responses, security) means the same in both versions and is copied as it is.

What it cannot do, so what the 3.0 rendition loses:

- Keywords 3.0 has no form for (``if``/``then``/``else``, ``prefixItems``, ``dependentSchemas``,
  ``unevaluatedProperties``, ``propertyNames``, ``contentMediaType`` … see ``DROPPED_IN_30``) are
  dropped, so a 3.0 schema may accept more than its 3.1 original; ``patternProperties`` loses which
  names it matched, ``examples`` all but the first.
- A ``$ref`` with sibling keywords (honoured in 3.1, ignored in 3.0) is rewritten only in the
  nullable case (``allOf: [$ref]`` plus ``nullable``); elsewhere the siblings stay and 3.0 tools
  ignore them.
- ``$defs``, ``$id`` and ``$anchor`` are dropped: a ``$ref`` must point into
  ``#/components/schemas``, as ``service.http.openapi.build_document`` makes every one of them.
- Of the document-level 3.1 additions only ``webhooks`` and ``jsonSchemaDialect`` are removed;
  ``components.pathItems``, ``info.summary``, ``license.identifier`` and ``mutualTLS`` are not
  handled, because hookline's document uses none of them.

It is therefore a converter for the documents ``build_document`` makes, not for any 3.1 document;
tests/integration/test_openapi.py validates the output as OpenAPI 3.0 and checks that no 3.1
construct is left in it.
"""

from __future__ import annotations

import copy
from typing import Any, Final

JsonObject = dict[str, Any]

# JSON Schema keywords OpenAPI 3.0's schema object does not have.
DROPPED_IN_30: Final = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "$defs",
        "const",  # rewritten to enum first
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        "dependentRequired",
        "dependentSchemas",
        "else",
        "if",
        "then",
        "prefixItems",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "examples",  # rewritten to example first
        "patternProperties",  # rewritten to additionalProperties first
    }
)

# What ``schema_to_30`` makes of ``{"type": "null"}``: a branch of a union that only admits null.
_NULL_30: Final = {"nullable": True, "enum": [None]}


def schema_to_30(schema: Any) -> Any:
    """One JSON Schema (2020-12, as OpenAPI 3.1 uses) as an OpenAPI 3.0 schema object, subschemas
    included (see the module docstring for each rewrite); the input is not modified."""
    if isinstance(schema, list):
        return [schema_to_30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: JsonObject = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: schema_to_30(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "oneOf", "anyOf"):
            out[key] = schema_to_30(value)
        else:
            out[key] = copy.deepcopy(value)
    _rewrite_keywords(out)
    _rewrite_type_null(out)
    _rewrite_null_branches(out)
    return {k: v for k, v in out.items() if k not in DROPPED_IN_30}


def _rewrite_keywords(out: JsonObject) -> None:
    """``const``, ``examples``, numeric exclusive bounds and ``patternProperties``, in place (the
    3.1 keywords themselves are dropped afterwards)."""
    if "const" in out:
        out["enum"] = [out["const"]]
    if "examples" in out and isinstance(out["examples"], list) and out["examples"]:
        out["example"] = out["examples"][0]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[plain] = out.pop(bound)
            out[bound] = True
    patterns = out.get("patternProperties")
    if patterns and "additionalProperties" not in out:
        values = list(patterns.values())
        out["additionalProperties"] = values[0] if len(values) == 1 else {"anyOf": values}


def _rewrite_type_null(out: JsonObject) -> None:
    """``type`` as a list (``null`` among them: ``nullable``; several others: ``anyOf``) and
    ``type: "null"`` alone, in place."""
    kind = out.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            out["nullable"] = True
        if len(kinds) == 1:
            out["type"] = kinds[0]
        elif not kinds:
            del out["type"]
        else:
            del out["type"]
            out["anyOf"] = [{"type": k} for k in kinds]
    elif kind == "null":
        del out["type"]
        out.update(copy.deepcopy(_NULL_30))


def _rewrite_null_branches(out: JsonObject) -> None:
    """An ``anyOf``/``oneOf`` with a null branch (already converted): ``nullable`` and the rest,
    in place; a lone ``$ref`` left is wrapped in ``allOf``, since 3.0 ignores a ``$ref``'s
    siblings."""
    for combiner in ("anyOf", "oneOf"):
        options = out.get(combiner)
        if not (isinstance(options, list) and _NULL_30 in options):
            continue
        rest = [o for o in options if o != _NULL_30]
        out["nullable"] = True
        if len(rest) == 1 and "$ref" not in rest[0]:
            del out[combiner]
            out.update({k: v for k, v in rest[0].items() if k not in out})
        elif len(rest) == 1:
            del out[combiner]
            out["allOf"] = rest
        else:
            out[combiner] = rest


def to_openapi_30(document: JsonObject) -> JsonObject:
    """The 3.0.3 rendition of a 3.1 document made by ``build_document``: every schema converted
    by ``schema_to_30``; the input is not modified."""
    doc = copy.deepcopy(document)
    doc["openapi"] = "3.0.3"
    doc.pop("jsonSchemaDialect", None)
    doc.pop("webhooks", None)
    components = doc.get("components", {})
    components["schemas"] = {n: schema_to_30(s) for n, s in components.get("schemas", {}).items()}
    _convert_schemas_in(doc["paths"])
    _convert_schemas_in(components.get("responses", {}))
    return doc


def _convert_schemas_in(node: Any) -> None:
    """Convert, in place, every ``schema`` of parameters, bodies, responses and headers."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema":
                node[key] = schema_to_30(value)
            else:
                _convert_schemas_in(value)
    elif isinstance(node, list):
        for item in node:
            _convert_schemas_in(item)
