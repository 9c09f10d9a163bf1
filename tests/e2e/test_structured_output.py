"""Structured output and tool calls through a whole fleet, with the official openai
client: the prefill node samples the first token under the grammar, the decode
node goes on from it, and every reply that ends validates."""

import json
import re
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.fleet import API_KEY, LocalFleet
from tests.json_schema_check import ALL_SCHEMAS, check

MODEL = "tiny"
# A chat template that shows the tools and teaches Hermes' <tool_call> syntax.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The first token decides what follows (see tests/common/test_grammar.py).
FORK = "x[0-9]{5}|y[a-z]{5}"
MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ALARM = {
    "type": "object",
    "properties": {"on": {"type": "boolean"}, "hour": {"type": "integer", "minimum": 0}},
    "required": ["on"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": ALARM}},
]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lightpd.common.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path_factory.mktemp("m") / MODEL, "qwen2")
    (model / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return model


def start_fleet(model, transport: str) -> LocalFleet:
    return LocalFleet(str(model), node_args=(*LocalFleet.node_args, "--kv-transport", transport))


@pytest.fixture(scope="module")
def fleet(model):
    running = start_fleet(model, "zmq").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def collective_client(model):
    """A fleet whose KV goes over a torch.distributed group (Gloo on the CPU)."""
    running = start_fleet(model, "nccl").start()
    yield openai.OpenAI(base_url=f"{running.url}/v1", api_key=API_KEY, max_retries=0)
    running.stop()


def chat(client, **options):
    options.setdefault("max_tokens", 100)
    options.setdefault("temperature", 1.0)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **options)


def streamed(client, **options) -> tuple[dict[int, str], dict[int, list], dict[int, str]]:
    """Content, tool calls (merged from their deltas) and finish reason of each choice."""
    texts, calls, reasons = {}, {}, {}
    for chunk in chat(client, stream=True, **options):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            for d in c.delta.tool_calls or []:
                merged = calls.setdefault(c.index, [])
                if d.index == len(merged):
                    assert d.id and d.type == "function" and d.function.name, d
                    merged.append({"id": d.id, "name": d.function.name, "arguments": ""})
                merged[d.index]["arguments"] += d.function.arguments or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, calls, reasons


def test_json_schema_replies_validate_whole_and_streamed(client):
    for i, schema in enumerate(ALL_SCHEMAS):
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        }
        reply = chat(client, n=4, seed=10 * i, response_format=response_format)
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice
            check(choice.message.content, schema)
        texts, _, reasons = streamed(client, n=3, seed=10 * i + 5, response_format=response_format)
        for index, text in texts.items():
            assert reasons[index] == "stop"
            check(text, schema)


def test_the_vllm_extras_and_json_object(client):
    schema = ALL_SCHEMAS[2]
    for extra in ({"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        for choice in chat(client, n=3, seed=1, extra_body=extra).choices:
            check(choice.message.content, schema)
    choices = ["alpha", "beta", "gamma ray"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        reply = chat(client, n=3, seed=2, extra_body=extra)
        assert all(c.message.content in choices for c in reply.choices)
    reply = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=40, n=3, seed=3, extra_body={"guided_regex": FORK}
    )
    assert all(re.fullmatch(FORK, c.text) for c in reply.choices)
    reply = chat(client, n=3, seed=4, response_format={"type": "json_object"}, max_tokens=60)
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # an open-ended object may run long
            assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("transport", ["zmq", "collective"])
def test_the_decode_node_goes_on_from_the_prefill_nodes_first_token(request, transport):
    """A decode node that started its matcher from scratch after the first token
    would write a whole match after it: 'x' + 'y' + five letters."""
    client = request.getfixturevalue("client" if transport == "zmq" else "collective_client")
    texts, _, _ = streamed(client, n=8, seed=7, extra_body={"guided_regex": FORK})
    whole = chat(client, n=8, seed=8, extra_body={"guided_regex": FORK})
    for text in [*texts.values(), *(c.message.content for c in whole.choices)]:
        assert re.fullmatch(FORK, text), text
        assert text[0] in "xy"


def check_calls(calls: list, allowed: set[str]) -> None:
    for call in calls:
        assert call["name"] in allowed
        check(call["arguments"], SCHEMAS[call["name"]])


def as_dicts(tool_calls) -> list[dict]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in tool_calls
    ]


def test_forced_tool_calls_validate_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [("required", True), ("required", False), (named, False)]
    for tool_choice, parallel in cases:
        allowed = set(SCHEMAS) if tool_choice == "required" else {"get_weather"}
        options = dict(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel)
        # A random model may go on adding parallel calls: such a reply is cut
        # short ("length") and holds no call; every other one is complete.
        unbounded = parallel and tool_choice == "required"
        reply = chat(client, n=3, seed=5, max_tokens=120, **options)
        for choice in reply.choices:
            if unbounded and choice.finish_reason == "length":
                assert choice.message.tool_calls is None
                continue
            assert choice.finish_reason == "tool_calls", choice
            calls = as_dicts(choice.message.tool_calls)
            assert len(calls) == 1 or unbounded
            assert all(c["id"].startswith("call_") for c in calls)
            check_calls(calls, allowed)
        _, calls, reasons = streamed(client, n=2, seed=6, max_tokens=120, **options)
        for index, reason in reasons.items():
            assert reason == "tool_calls" or (unbounded and index not in calls)
            check_calls(calls.get(index, []), allowed)
        assert len(calls) == 2 or unbounded


def test_auto_reads_the_models_own_tool_call_syntax(client):
    # The model is made to write a Hermes call; auto reads it into tool_calls.
    arguments = r'\{"city":"(Paris|Rome)","unit":"c","days":[1-7]\}'
    call = r'<tool_call>\{"name":"get_weather","arguments":' + arguments + r"\}</tool_call>"
    extra = {"structured_outputs": {"regex": "(Sure!)?" + call}}
    reply = chat(client, n=2, seed=9, tools=TOOLS, extra_body=extra)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content in (None, "Sure!")
        check_calls(as_dicts(choice.message.tool_calls), {"get_weather"})
    texts, calls, reasons = streamed(client, n=2, seed=9, tools=TOOLS, extra_body=extra)
    assert set(reasons.values()) == {"tool_calls"}
    assert [t or None for t in texts.values()] == [c.message.content for c in reply.choices]
    for found in calls.values():
        check_calls(found, {"get_weather"})
    # Without a call in the text, the reply is its content.
    reply = chat(client, tools=TOOLS, max_tokens=8, seed=1, extra_body={"guided_regex": "[a-z]{4}"})
    assert reply.choices[0].message.tool_calls is None
    assert re.fullmatch("[a-z]{4}", reply.choices[0].message.content)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            'response_format: Unsupported type "objectx"',
        ),
        ({"extra_body": {"guided_regex": "(ab"}}, "guided_regex: Regex parsing error"),
        ({"extra_body": {"guided_grammar": "root ::= b"}}, 'Rule "b" is not defined'),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
            "give one output constraint, not several (response_format, guided_regex)",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice names 'nope', which is not in tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters (of 'f')",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "should match pattern",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        (
            {"extra_body": {"guided_regex": "a+", "min_tokens": 2}},
            "min_tokens cannot be combined with guided_regex",
        ),
        ({"extra_body": {"guided_decoding_backend": "outlines"}}, "one grammar backend"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_it(client, options, message):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **options)
    assert message in info.value.message


def test_a_grammar_that_compiles_for_seconds_freezes_no_one(fleet):
    """The probe's grammar bomb, within the control plane's bounds (40 choices of 790
    characters, seconds to compile here): plain requests on the same nodes are
    answered in under a second throughout, and the constrained one then runs."""
    choices = [f"{i:04d}" + "q" * 786 for i in range(40)]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 12, "guided_choice": choices}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    answer: dict = {}

    def constrained() -> None:
        reply = httpx.post(f"{fleet.url}/v1/completions", json=body, headers=headers, timeout=120)
        answer["reply"] = reply

    thread = threading.Thread(target=constrained)
    thread.start()
    took = []
    while thread.is_alive():
        started = time.monotonic()
        reply = httpx.post(
            f"{fleet.url}/v1/completions",
            json={"model": MODEL, "prompt": "hello", "max_tokens": 4},
            headers=headers,
            timeout=30,
        )
        took.append(time.monotonic() - started)
        assert reply.status_code == 200, reply.text
        time.sleep(0.05)
    thread.join()
    assert len(took) >= 3 and max(took) < 1.0, took
    reply = answer["reply"]
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["text"]
    assert any(choice.startswith(text) for choice in choices), text
