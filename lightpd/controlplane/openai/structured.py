"""Structured output: the one constraint a request puts on its output, as the
``GrammarSpec`` every node that samples it compiles, checked here first.

A request may give one of: ``response_format`` (json_object, json_schema), vLLM's
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` or
``structured_outputs`` ({json | regex | choice | grammar | json_object |
structural_tag}), or a forced tool call (``openai/tool_calls.py``). Each
is compiled once here (cached) before the request goes to any node, so a schema
that xgrammar cannot take is a 400 naming the problem, not a failed stream.
The check imports xgrammar, and so torch, when the first constraint comes.
"""

import asyncio
import json
from functools import lru_cache

from lightpd.common.wire.sampling_params import MAX_GRAMMAR_CHARS, GrammarSpec
from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.openai.grammar_limits import (
    choices_limit_error,
    schema_limit_error,
    text_limit_error,
)
from lightpd.controlplane.openai.schemas import SamplingFields


async def requested_grammar(
    body: SamplingFields, forced: GrammarSpec | None = None
) -> GrammarSpec | None:
    """The request's constraint (``forced``: a tool call's), compiled once to check
    it; a 400 if it is bad or there are several."""
    given = _constraints(body)
    if forced is not None:
        given.append(("tool_choice", forced))
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise OpenAIError(400, f"give one output constraint, not several ({names})", given[1][0])
    param, spec = given[0]
    if body.min_tokens:
        raise OpenAIError(400, f"min_tokens cannot be combined with {param}", "min_tokens")
    if len(spec.text) > MAX_GRAMMAR_CHARS:
        raise OpenAIError(400, f"{param} must be at most {MAX_GRAMMAR_CHARS} characters", param)
    if limit := _limit_error(body, spec):
        raise OpenAIError(400, f"{param}: {limit}", param)
    error = await asyncio.to_thread(_grammar_error, spec)
    if error is not None:
        raise OpenAIError(400, f"{param}: {error}", param)
    return spec


async def check_tool_schemas(parameters: dict[str, dict]) -> None:
    """Each tool's parameters must be a JSON schema we can compile."""
    for i, (name, schema) in enumerate(parameters.items()):
        spec = GrammarSpec("json_schema", json.dumps(schema))
        error = schema_limit_error(schema) or await asyncio.to_thread(_grammar_error, spec)
        if error is not None:
            param = f"tools[{i}].function.parameters"
            raise OpenAIError(400, f"{param} (of {name!r}): {error}", param)


def _limit_error(body: SamplingFields, spec: GrammarSpec) -> str | None:
    """Which size bound the constraint passes (grammar_limits.py), before any compile."""
    choices = body.guided_choice or (body.structured_outputs and body.structured_outputs.choice)
    if choices:
        return choices_limit_error(choices)
    if spec.kind == "json_schema":
        return schema_limit_error(json.loads(spec.text))
    return text_limit_error(spec.kind, spec.text)


def _constraints(body: SamplingFields) -> list[tuple[str, GrammarSpec]]:
    given = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", GrammarSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ or {}
        given.append(("response_format", _json_schema(schema, "response_format")))
    if body.guided_json is not None:
        given.append(("guided_json", _json_schema(body.guided_json, "guided_json")))
    if body.guided_regex is not None:
        given.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        given.append(("guided_choice", _choice(body.guided_choice)))
    if body.guided_grammar is not None:
        given.append(("guided_grammar", GrammarSpec("ebnf", body.guided_grammar)))
    so = body.structured_outputs
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            spec = _json_schema(so.json_, param)
        elif so.regex is not None:
            spec = GrammarSpec("regex", so.regex)
        elif so.choice is not None:
            spec = _choice(so.choice)
        elif so.grammar is not None:
            spec = GrammarSpec("ebnf", so.grammar)
        elif so.structural_tag is not None:
            spec = GrammarSpec("structural_tag", so.structural_tag)
        else:
            spec = GrammarSpec("json_object")
        given.append((param, spec))
    return given


def _json_schema(schema: dict | str, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as exc:
            raise OpenAIError(400, f"{param}: the schema is not JSON: {exc}", param) from exc
        return GrammarSpec("json_schema", schema)
    return GrammarSpec("json_schema", json.dumps(schema))


def _choice(choices: list[str]) -> GrammarSpec:
    """One of the strings, exactly: an EBNF alternation of JSON-escaped literals
    (xgrammar reads JSON's escapes)."""
    literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))
    return GrammarSpec("ebnf", f"root ::= {literals}")


@lru_cache(maxsize=512)
def _grammar_error(spec: GrammarSpec) -> str | None:
    from lightpd.common.grammar_build import grammar_error

    return grammar_error(spec)
