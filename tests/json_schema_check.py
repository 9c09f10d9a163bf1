"""The JSON Schema keywords the structured-output tests use, checked by hand
(jsonschema is not installed): enough to tell a valid reply from an invalid one."""

import json

TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "number": (int, float),
    "integer": int,
}
ALL_SCHEMAS = [
    # enums, a boolean, a bounded integer, a bounded array, no extra keys
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["ok", "color", "n", "tags"],
        "additionalProperties": False,
    },
    # nested objects, a short string, a numeric enum
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 4},
                    "admin": {"type": "boolean"},
                },
                "required": ["name", "admin"],
                "additionalProperties": False,
            },
            "level": {"enum": [1, 2, 3]},
        },
        "required": ["user", "level"],
        "additionalProperties": False,
    },
    # a bounded array at the top
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
]


def errors(value: object, schema: dict, path: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema``; empty if it validates."""
    found = []
    if "anyOf" in schema and all(errors(value, s, path) for s in schema["anyOf"]):
        found.append(f"{path}: matches no anyOf branch")
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, TYPES[kind]) and not (kind != "boolean" and isinstance(value, bool))
        if not ok:
            return [*found, f"{path}: {value!r} is not of type {kind}"]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{path}: {key!r} is missing")
        for key, item in value.items():
            if key in properties:
                found += errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}: {key!r} is not allowed")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            found.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            found += errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, str) and len(value) > schema.get("maxLength", 1 << 30):
        found.append(f"{path}: longer than {schema['maxLength']}")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    low, high = schema.get("minimum", float("-inf")), schema.get("maximum", float("inf"))
    if number and not low <= value <= high:
        found.append(f"{path}: {value} out of range")
    return found


def check(text: str, schema: dict) -> object:
    """``text`` parsed; AssertionError if it is not JSON or does not validate."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON ({exc}): {text!r}") from exc
    problems = errors(value, schema)
    assert not problems, f"{text!r}: {problems}"
    return value
