"""Tool calls read out of text, per model family, whole and streamed."""

import json

import pytest

from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.openai.schemas import ChatCompletionRequest
from lightpd.controlplane.openai.tool_calls import SYNTAXES, ToolPlan, plan_tools, syntax_of

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


def body(**options) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": "hi"}]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **options})


def plan(template: str = "<tool_call>", **options):
    return plan_tools(body(tools=TOOLS, **options), template)


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("...<tool_call>\\n{{ tool_call | tojson }}...", "hermes"),
        ("{{ '[TOOL_CALLS]' }}", "mistral"),
        ("{{- '<|python_tag|>' }} Environment: ipython", "llama3_json"),
    ],
)
def test_the_family_comes_from_the_chat_template(template, family):
    assert syntax_of(template).name == family
    assert syntax_of("{{ messages }}") is None


@pytest.mark.parametrize(
    ("family", "text", "content", "calls"),
    [
        (
            "hermes",
            'Let me see. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
            "Let me see. ",
            [("get_weather", {"city": "Oslo"}), ("get_time", {})],
        ),
        (
            "llama3_json",
            '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "parameters": {}}',
            "",
            [("get_weather", {"city": "Rome"}), ("get_time", {})],
        ),
        (
            "llama3_json",
            '<|python_tag|>{"name": "get_time", "parameters": {}}',
            "",
            [("get_time", {})],
        ),
        (
            "mistral",
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
            "",
            [("get_weather", {"city": "Oslo"})],
        ),
        # [TOOL_CALLS] and [ARGS] are special tokens, dropped from the decoded text.
        ("mistral", 'get_weather{"city": "Oslo"}', "", [("get_weather", {"city": "Oslo"})]),
        ("mistral", '[{"name": "get_time", "arguments": {}}]', "", [("get_time", {})]),
    ],
)
def test_each_family_is_read_whole_and_streamed(family, text, content, calls):
    parameters = {"get_weather": WEATHER, "get_time": {"type": "object"}}
    tool_plan = ToolPlan("auto", TOOLS, parameters, syntax=SYNTAXES[family])
    message, reason = tool_plan.reader().message(text, "stop")
    assert reason == "tool_calls"
    assert message["content"] == (content or None)
    assert [read(c["function"]) for c in message["tool_calls"]] == calls
    # Streamed in pieces of 3 characters: the content as it comes, then the calls.
    reader, deltas = tool_plan.reader(), []
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    for i, piece in enumerate(pieces):
        deltas += reader.feed(piece, "stop" if i == len(pieces) - 1 else None)
    assert "".join(d.get("content", "") for d, _ in deltas) == content
    streamed = [d["tool_calls"][0] for d, _ in deltas if "tool_calls" in d]
    assert [read(c["function"]) for c in streamed] == calls
    assert [c["index"] for c in streamed] == list(range(len(calls)))
    assert deltas[-1][1] == "tool_calls"


def read(function: dict) -> tuple[str, dict]:
    return function["name"], json.loads(function["arguments"])


def test_text_without_a_call_is_content_whole_and_streamed():
    tool_plan = plan()
    text = "I would rather <tool not call anything."
    assert tool_plan.reader().message(text, "stop") == (
        {"role": "assistant", "content": text},
        "stop",
    )
    reader = tool_plan.reader()
    deltas = reader.feed(text[:16], None)  # "<tool" could begin a call: held back
    assert "".join(d.get("content", "") for d, _ in deltas) == "I would rather "
    deltas += reader.feed(text[16:], "length")
    assert "".join(d.get("content", "") for d, _ in deltas) == text
    assert deltas[-1][1] == "length"


def test_a_named_function_streams_its_arguments_as_they_come():
    reader = plan(tool_choice={"type": "function", "function": {"name": "get_weather"}}).reader()
    deltas = reader.feed('{"city":', None) + reader.feed('"Oslo"}', "stop")
    header = deltas[0][0]["tool_calls"][0]
    assert header["function"] == {"name": "get_weather", "arguments": ""}
    assert header["id"].startswith("call_") and header["type"] == "function"
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d, _ in deltas[1:]]
    assert pieces == ['{"city":', '"Oslo"}'] and deltas[-1][1] == "tool_calls"


def test_required_forces_an_array_of_calls_one_unless_parallel():
    grammar = json.loads(plan(tool_choice="required", parallel_tool_calls=False).grammar.text)
    assert grammar["minItems"] == 1 and grammar["maxItems"] == 1
    names = [b["properties"]["name"]["const"] for b in grammar["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert "maxItems" not in json.loads(plan(tool_choice="required").grammar.text)
    text = '[{"name":"get_time","arguments":{}},{"name":"get_weather","arguments":{"city":"A"}}]'
    message, reason = plan(tool_choice="required").reader().message(text, "stop")
    assert reason == "tool_calls" and message["content"] is None
    assert [read(c["function"]) for c in message["tool_calls"]] == [
        ("get_time", {}),
        ("get_weather", {"city": "A"}),
    ]


def test_plans_that_cannot_be_served_are_refused():
    with pytest.raises(OpenAIError, match="tool-call syntax lightpd reads"):
        plan(template="{{ messages }}")
    assert plan(template="{{ messages }}", tool_choice="required").mode == "required"
    assert plan(tool_choice="none") is None
    with pytest.raises(OpenAIError, match="two tools are named 'get_time'"):
        plan_tools(body(tools=[*TOOLS, TOOLS[1]]), "<tool_call>")
