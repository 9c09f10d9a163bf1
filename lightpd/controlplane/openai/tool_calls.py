"""Tool calls: what a request's ``tools`` and ``tool_choice`` ask for, the grammar
that forces a call, and the calls read out of the text, whole or streamed.

- ``required`` or a named function: the output is grammar-constrained JSON, so
  a call always parses and its arguments validate against the tool's schema. A
  named function's output is its arguments; ``required`` gives a JSON array of
  ``{"name", "arguments"}`` (one element unless ``parallel_tool_calls``).
- ``auto``: the model writes calls in its own syntax, read per family; the
  family is recognised in the chat template (``SYNTAXES``). Text before the
  calls is the message's content.
- ``none``: the tools are not shown to the model and nothing is read.

Streamed, a named function's arguments go out as they come (OpenAI's chunks: the
call's id and name first, then pieces of its arguments); the calls of
``required`` and ``auto`` go out once the output is complete, and the content
before ``auto`` calls streams as usual.
"""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from lightpd.common.wire.sampling_params import GrammarSpec
from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.openai.schemas import ChatCompletionRequest, ChatMessage, FunctionCall

Call = tuple[str, str]  # function name, arguments as JSON text


# ---- the models' own syntaxes (tool_choice "auto") ----


@dataclass(frozen=True)
class ToolSyntax:
    """How one family of models writes tool calls. ``marker`` opens the calls
    anywhere in the text; ``leads`` open them at the very start only (where the
    tokenizer's special marker is dropped from the text)."""

    name: str
    marker: str
    parse: Callable[[str, set[str]], list[Call] | None]  # calls in text past the marker
    leads: Callable[[set[str]], list[str]] = lambda names: []

    def start(self, text: str, names: set[str]) -> int | None:
        """Where the calls begin in ``text``, or None."""
        position = text.find(self.marker)
        if position >= 0:
            return position
        stripped = text.lstrip()
        if any(_starts(stripped, lead) for lead in self.leads(names)):
            return len(text) - len(stripped)
        return None

    def may_start(self, text: str, names: set[str], at_start: bool) -> int:
        """How many characters at the end of ``text`` could begin calls (hold them back)."""
        candidates = [self.marker]
        if at_start and not text.strip():
            return len(text)
        if at_start:
            stripped = _squeeze(text)
            if any(lead.startswith(stripped) for lead in self.leads(names)):
                return len(text)
        for size in range(min(len(text), len(self.marker) - 1), 0, -1):
            if any(c.startswith(text[-size:]) for c in candidates):
                return size
        return 0

    def read(self, text: str, names: set[str]) -> tuple[str, list[Call]] | None:
        """Content and calls of a complete output; None if it holds no calls."""
        start = self.start(text, names)
        if start is None:
            return None
        calls = self.parse(text[start:].removeprefix(self.marker), names)
        return None if not calls else (text[:start], calls)


def _starts(text: str, lead: str) -> bool:
    return _squeeze(text).startswith(lead)


def _squeeze(text: str) -> str:
    """Whitespace out, so '{ "name"' and '{"name"' read alike."""
    return "".join(text.split())


def _json_values(text: str) -> list | None:
    """The JSON values in ``text``, one after another, separated by whitespace, ';'
    or ','; None if anything else is there."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while True:
        while position < len(text) and text[position] in " \t\r\n;,":
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _as_call(value: object, names: set[str], arguments_key: str = "arguments") -> Call | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write them as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _calls(values: list | None, names: set[str], arguments_key: str) -> list[Call] | None:
    if not values:
        return None
    calls = [_as_call(v, names, arguments_key) for v in values]
    return None if any(c is None for c in calls) else calls


def _parse_hermes(text: str, names: set[str]) -> list[Call] | None:
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated.
    bodies = [b for b in re.split(r"</?tool_call>", text) if b.strip()]
    values = []
    for body in bodies:
        parsed = _json_values(body)
        if parsed is None:
            return None
        values += parsed
    return _calls(values, names, "arguments")


def _parse_llama3(text: str, names: set[str]) -> list[Call] | None:
    # {"name": ..., "parameters": {...}}, separated by ';' when there are several.
    return _calls(_json_values(text.strip()), names, "parameters")


def _parse_mistral(text: str, names: set[str]) -> list[Call] | None:
    # [{"name": ..., "arguments": {...}}, ...], or name[ARGS]{...} repeated (newer
    # tokenizers; [ARGS] and [TOOL_CALLS] are dropped from the text when special).
    text = text.strip()
    if text.startswith("["):
        values = _json_values(text)
        if values and isinstance(values[0], list):
            return _calls(values[0] + values[1:], names, "arguments")
        return None
    calls = []
    for piece in re.split(r"\[TOOL_CALLS\]", text):
        match = re.match(r"\s*([a-zA-Z0-9_-]+)(?:\[ARGS\])?(.*)$", piece, re.DOTALL)
        if match is None:
            return None
        values = _json_values(match.group(2))
        if not values or len(values) != 1:
            return None
        call = _as_call({"name": match.group(1), "arguments": values[0]}, names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


SYNTAXES = {
    "hermes": ToolSyntax("hermes", "<tool_call>", _parse_hermes),
    "mistral": ToolSyntax(
        "mistral",
        "[TOOL_CALLS]",
        _parse_mistral,
        lambda names: ['[{"name"', *(f"{n}{{" for n in names), *(f"{n}[ARGS]" for n in names)],
    ),
    "llama3_json": ToolSyntax(
        "llama3_json", "<|python_tag|>", _parse_llama3, lambda names: ['{"name"']
    ),
}


def syntax_of(chat_template: str | None) -> ToolSyntax | None:
    """The tool-call syntax a chat template teaches its model, if we know it."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return SYNTAXES["hermes"]  # Qwen 2.5 / 3, Hermes
    if "[TOOL_CALLS]" in template:
        return SYNTAXES["mistral"]
    if "<|python_tag|>" in template or "ipython" in template:
        return SYNTAXES["llama3_json"]  # Llama 3.1 / 3.2 / 3.3
    return None


# ---- what a request asks for ----


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "auto", "required" or "named"
    tools: list[dict]  # as sent, for the chat template
    parameters: dict[str, dict]  # name -> JSON schema of its arguments
    named: str | None = None
    parallel: bool = True
    syntax: ToolSyntax | None = None  # auto

    @property
    def grammar(self) -> GrammarSpec | None:
        """The constraint that forces the call; None for auto."""
        if self.mode == "named":
            return GrammarSpec("json_schema", json.dumps(self.parameters[self.named]))
        if self.mode != "required":
            return None
        one_call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": schema},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, schema in self.parameters.items()
            ]
        }
        array = {"type": "array", "items": one_call, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return GrammarSpec("json_schema", json.dumps(array))

    def reader(self) -> "ToolCallReader":
        return ToolCallReader(self)


ANY_OBJECT = {"type": "object"}


def plan_tools(body: ChatCompletionRequest, chat_template: str | None) -> ToolPlan | None:
    """What ``tools`` and ``tool_choice`` ask for; None when no call can be made.
    A definition or choice that cannot be served is a 400 naming it."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if choice != "none" and not body.tools:
        raise OpenAIError(400, "tool_choice needs tools", "tool_choice")
    if choice == "none":
        return None
    parameters: dict[str, dict] = {}
    for i, tool in enumerate(body.tools):
        name = tool.function.name
        if name in parameters:
            raise OpenAIError(400, f"two tools are named {name!r}", f"tools[{i}].function.name")
        parameters[name] = tool.function.parameters or ANY_OBJECT
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if isinstance(choice, str):
        syntax = None
        if choice == "auto":
            syntax = syntax_of(chat_template)
            if syntax is None:
                raise OpenAIError(
                    400,
                    "tool_choice 'auto' needs a chat template with a tool-call syntax lightpd "
                    "reads (Llama 3.1 JSON, Hermes/Qwen <tool_call>, Mistral [TOOL_CALLS]); "
                    "this model's has none: use tool_choice 'required' or name a function",
                    "tool_choice",
                )
        return ToolPlan(choice, tools, parameters, None, body.parallel_tool_calls, syntax)
    name = choice.function.name
    if name not in parameters:
        raise OpenAIError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return ToolPlan("named", tools, parameters, name, body.parallel_tool_calls)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The conversation as chat templates read it: a call's arguments as a dict."""
    out = []
    for m in messages:
        entry = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": _template_call(c.function)}
                for c in m.tool_calls
            ]
        out.append(entry)
    return out


def _template_call(call: FunctionCall) -> dict:
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = call.arguments
    return {"name": call.name, "arguments": arguments}


# ---- calls out of the text ----


def _call_dict(index: int, call: Call) -> dict:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call[0], "arguments": call[1]},
    }


@dataclass
class ToolCallReader:
    """One choice's output read for calls: whole (``message``) or streamed (``feed``)."""

    plan: ToolPlan
    text: str = ""
    emitted: int = 0  # characters of text sent as content or arguments
    in_calls: bool = False  # auto: past the start of the calls
    started: bool = False  # named: the call's header is out
    call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def calls(self, text: str) -> tuple[str | None, list[Call]] | None:
        """Content and calls of a complete output; None if it holds none."""
        plan = self.plan
        if plan.mode == "named":
            return None, [(plan.named, text)]
        if plan.mode == "required":
            values = _json_values(text)
            if not values or not isinstance(values[0], list):
                return None
            calls = _calls(values[0], set(plan.parameters), "arguments")
            return None if calls is None else (None, calls)
        read = plan.syntax.read(text, set(plan.parameters))
        if read is None:
            return None
        content, calls = read
        return (content if content.strip() else None), calls

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message of a complete output, and its finish reason."""
        found = self.calls(text)
        if found is None:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = found
        message = {"role": "assistant", "content": content}
        if self.plan.mode == "named":
            message["tool_calls"] = [{**_call_dict(0, calls[0]), "id": self.call_id}]
        else:
            message["tool_calls"] = [_call_dict(i, c) for i, c in enumerate(calls)]
        for call in message["tool_calls"]:
            del call["index"]
        return message, _finished_with_calls(finish_reason)

    def feed(self, text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        """Streaming: the chunk deltas (with the finish reason of each) for new text."""
        self.text += text
        if self.plan.mode == "named":
            return self._feed_named(text, finish_reason)
        reading_content = self.plan.mode == "auto" and not self.in_calls
        out = self._feed_content() if reading_content else []
        if finish_reason is None:
            return out
        if self.plan.mode == "auto" and not self.in_calls:
            return [*out, (self._content(len(self.text)), finish_reason)]
        found = self.calls(self.text)
        if found is None:  # not calls after all: the text as it is
            return [*out, (self._content(len(self.text)), finish_reason)]
        calls = [_call_dict(i, c) for i, c in enumerate(found[1])]
        deltas = [({"tool_calls": [call]}, None) for call in calls]
        deltas[-1] = (deltas[-1][0], _finished_with_calls(finish_reason))
        return out + deltas

    def _feed_named(self, text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        out = []
        if not self.started:
            self.started = True
            header = {
                "index": 0,
                "id": self.call_id,
                "type": "function",
                "function": {"name": self.plan.named, "arguments": ""},
            }
            out.append(({"tool_calls": [header]}, None))
        reason = None if finish_reason is None else _finished_with_calls(finish_reason)
        if text or reason is not None:
            arguments = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
            out.append((arguments if text else {}, reason))
        return out

    def _feed_content(self) -> list[tuple[dict, str | None]]:
        syntax, names = self.plan.syntax, set(self.plan.parameters)
        start = syntax.start(self.text, names)
        if start is not None:
            self.in_calls = True
            delta = self._content(start)
            return [(delta, None)] if delta else []
        at_start = not self.text[: self.emitted].strip()
        held = syntax.may_start(self.text[self.emitted :], names, at_start)
        delta = self._content(len(self.text) - held)
        return [(delta, None)] if delta else []

    def _content(self, upto: int) -> dict:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return {"content": piece} if piece else {}


def _finished_with_calls(finish_reason: str) -> str:
    return "tool_calls" if finish_reason == "stop" else finish_reason
