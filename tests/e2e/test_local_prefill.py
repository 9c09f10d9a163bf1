"""Decode nodes that compute prompts themselves: a fleet without prefill nodes, one
that lost them, and short prompts kept off the KV hand-off. Outputs equal the
in-process engine's."""

import asyncio

import openai
import pytest

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.common.tokenizer import encode_chat, load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from tests.e2e.fleet import API_KEY, LocalFleet

MODEL_NAME = "tiny"
LOCAL_PREFILL_TOKENS = 64
SHORT = [{"role": "user", "content": "Tell me about the quick brown fox."}]  # 35 tokens
LONG = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 8}]  # 195
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.8, "seed": 7}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / MODEL_NAME, "qwen2"))


@pytest.fixture(scope="module")
def engine(model) -> LLMEngine:
    # The reference computes every prompt whole (no prefix cache).
    config = EngineConfig(model=model, device="cpu", num_kv_slots=4096, enable_prefix_cache=False)
    return LLMEngine(config)


@pytest.fixture(scope="module")
def colocated(model):
    fleet = LocalFleet(model).start(prefill=0, decode=1)
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def mixed(model):
    """One prefill and one decode node; prompts of up to 64 tokens stay on the decode node."""
    settings = {"LIGHTPD_LOCAL_PREFILL_TOKENS": str(LOCAL_PREFILL_TOKENS)}
    fleet = LocalFleet(model, node_ttl_s=2.0, settings=settings).start(prefill=1, decode=1)
    yield fleet
    fleet.stop()


def node_id(fleet: LocalFleet, role: str) -> str:
    return next(n.node_id for n in fleet.nodes if n.role == role)


def want(engine: LLMEngine, prompt_ids: list[int], max_tokens: int, sampling: dict):
    """The in-process engine's text and token count."""
    params = SamplingParams(max_new_tokens=max_tokens, **sampling)
    tokens = engine.generate([prompt_ids], params)[0]
    text = load_tokenizer(engine.config.model).decode(tokens, skip_special_tokens=True)
    return text, len(tokens)


def ask_chat(fleet: LocalFleet, messages, max_tokens: int, sampling: dict, stream: bool = False):
    """The fleet's text and token count for a chat request."""
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, **sampling)
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.completion_tokens


def ask_completion(fleet: LocalFleet, prompt: str, max_tokens: int, sampling: dict, stream: bool):
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, **sampling)
    if not stream:
        reply = client.completions.create(**kwargs)
        return reply.choices[0].text, reply.usage.completion_tokens
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks[-1].usage.completion_tokens


def latest_request(fleet: LocalFleet) -> dict:
    """The record of the request sent last (its nodes are written before its first token)."""
    return fleet.admin("GET", "/admin/requests?limit=1").json()[0]


def states(record: dict) -> list[str]:
    return [step["state"] for step in record["timeline"]]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_fleet_without_prefill_nodes_answers_as_the_in_process_engine(
    colocated, engine, sampling, stream
):
    tokenizer = load_tokenizer(colocated.model)
    got = ask_chat(colocated, LONG, 20, sampling, stream)
    assert got == want(engine, encode_chat(tokenizer, LONG), 20, sampling)
    decode = node_id(colocated, "decode")
    record = latest_request(colocated)
    assert record["prefill_node"] == record["decode_node"] == decode
    assert "transferring" not in states(record)  # no KV hand-off
    got = ask_completion(colocated, "Hello world", 12, sampling, stream)
    assert got == want(engine, tokenizer.encode("Hello world"), 12, sampling)


def test_a_fleet_without_prefill_nodes_batches_prompts_with_decodes(colocated, engine):
    # Prompts arrive while others decode, so the decode node's steps mix both.
    tokenizer = load_tokenizer(colocated.model)
    messages = [[{"role": "user", "content": f"Request number {i}"}] for i in range(6)]

    async def one(client, i: int) -> str:
        await asyncio.sleep(0.1 * i)
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages[i],
            max_tokens=16,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=f"{colocated.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
        )
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(6))), 120)

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        expected, _ = want(
            engine, encode_chat(tokenizer, messages[i]), 16, {"temperature": 0.7, "seed": i}
        )
        assert text == expected, f"request {i}"


def test_short_prompts_stay_on_the_decode_node_and_long_ones_go_through_prefill(mixed, engine):
    tokenizer = load_tokenizer(mixed.model)
    decode, prefill = node_id(mixed, "decode"), node_id(mixed, "prefill")
    short, long = encode_chat(tokenizer, SHORT), encode_chat(tokenizer, LONG)
    assert len(short) <= LOCAL_PREFILL_TOKENS < len(long)

    assert ask_chat(mixed, SHORT, 16, SEEDED) == want(engine, short, 16, SEEDED)
    record = latest_request(mixed)
    assert (record["prefill_node"], record["decode_node"]) == (decode, decode)
    assert "transferring" not in states(record)

    reply, _ = ask_chat(mixed, LONG, 16, SEEDED)
    assert (reply, _) == want(engine, long, 16, SEEDED)
    record = latest_request(mixed)
    assert (record["prefill_node"], record["decode_node"]) == (prefill, decode)

    # The next turn is long too, but the decode node holds all of it but the reply and
    # the new question (its prefix cache): it computes that part itself.
    turn = [*LONG, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    tokens = encode_chat(tokenizer, turn)
    assert len(tokens) - len(long) <= LOCAL_PREFILL_TOKENS < len(tokens)
    assert ask_chat(mixed, turn, 8, SEEDED) == want(engine, tokens, 8, SEEDED)
    record = latest_request(mixed)
    assert (record["prefill_node"], record["decode_node"]) == (decode, decode)
    # ("transferring" is not asserted: the prefill node's word that the prompt is done
    # and the decode node's first token come over two connections, and the first token
    # may be read first, which skips that state.)


def test_a_fleet_whose_prefill_node_died_keeps_serving(mixed, engine):
    tokenizer = load_tokenizer(mixed.model)
    decode = node_id(mixed, "decode")
    victim = next(n for n in mixed.nodes if n.role == "prefill")
    fresh = [{"role": "user", "content": "Hello world! How are you today? " * 8}]  # uncached
    long = encode_chat(tokenizer, fresh)
    victim.kill()
    # Sent at once, while the registry still lists the prefill node as ready: the
    # attempt there fails when the node is found dead, and the decode node prefills.
    assert ask_chat(mixed, fresh, 16, GREEDY) == want(engine, long, 16, GREEDY)
    record = latest_request(mixed)
    assert record["prefill_node"] == decode and record["attempts"] == 2
    mixed.wait_for(
        lambda nodes: {n["node_id"]: n["status"] for n in nodes}[victim.node_id] == "dead"
    )
    for sampling, stream in ((GREEDY, True), (SEEDED, False)):
        assert ask_chat(mixed, fresh, 16, sampling, stream) == want(engine, long, 16, sampling)
        record = latest_request(mixed)
        assert record["prefill_node"] == record["decode_node"] == decode
        assert record["state"] in ("decoding", "finished")
