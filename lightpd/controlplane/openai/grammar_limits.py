"""Bounds on an output constraint, checked before anything compiles it.

Compiling a grammar costs time and memory in proportion to what it holds: a probe's
1 MB ``guided_choice`` took a node 118 s, a 50k-entry enum 1.1 GB. These bounds are
OpenAI's for structured outputs (5,000 object properties, 1,000 enum values, 120,000
characters of names and values in all), with a nesting depth that real schemas stay
well inside, and the like for choices and hand-written grammars. Past one, the
request is a 400 that names the limit; nodes also stop waiting for a compile after
its time budget (``common/engine/grammar.py``).
"""

from typing import Any

MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000
MAX_SCHEMA_STRING_CHARS = 120_000
MAX_SCHEMA_DEPTH = 32
MAX_PATTERN_CHARS = 1000
MAX_CHOICE_TOTAL_CHARS = 120_000
MAX_REGEX_CHARS = 4096
MAX_EBNF_CHARS = 65_536


def schema_limit_error(schema: Any) -> str | None:
    """Which bound the JSON schema passes, if any (in words); None if within all."""
    counts = {"properties": 0, "enum": 0, "chars": 0}
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            return f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                counts["properties"] += len(properties)
                counts["chars"] += sum(len(str(name)) for name in properties)
            for key in ("enum", "const"):
                values = node.get(key)
                values = values if isinstance(values, list) else [] if values is None else [values]
                if key == "enum":
                    counts["enum"] += len(values)
                counts["chars"] += sum(len(v) for v in values if isinstance(v, str))
            pattern = node.get("pattern")
            if isinstance(pattern, str) and len(pattern) > MAX_PATTERN_CHARS:
                return f"a pattern is longer than {MAX_PATTERN_CHARS} characters"
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth) for value in node)
        if counts["properties"] > MAX_PROPERTIES:
            return f"the schema has more than {MAX_PROPERTIES} object properties in all"
        if counts["enum"] > MAX_ENUM_VALUES:
            return f"the schema has more than {MAX_ENUM_VALUES} enum values in all"
        if counts["chars"] > MAX_SCHEMA_STRING_CHARS:
            return (
                f"the schema's property names and enum and const values are longer than "
                f"{MAX_SCHEMA_STRING_CHARS} characters in all"
            )
    return None


def choices_limit_error(choices: list[str]) -> str | None:
    if sum(len(c) for c in choices) > MAX_CHOICE_TOTAL_CHARS:
        return f"the choices are longer than {MAX_CHOICE_TOTAL_CHARS} characters in all"
    return None


def text_limit_error(kind: str, text: str) -> str | None:
    limit = {"regex": MAX_REGEX_CHARS, "ebnf": MAX_EBNF_CHARS}.get(kind)
    if limit is not None and len(text) > limit:
        what = "regular expression" if kind == "regex" else "grammar"
        return f"the {what} is longer than {limit} characters"
    return None
