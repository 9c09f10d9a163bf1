"""Prefix caching through the fleet: cache-aware routing, delta-only KV transfer,
and ``cached_tokens`` in the usage, on two prefill and two decode nodes."""

import asyncio
import random
import re
import time

import httpx
import pytest

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.common.tokenizer import encode_chat, load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from tests.e2e.fleet import API_KEY, LocalFleet

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PREFIX_TOKENS = 64  # four blocks of the routing's names


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "qwen2"))


@pytest.fixture(scope="module")
def fleet(model):
    fleet = LocalFleet(model).start(prefill=2, decode=2)
    yield fleet
    fleet.stop()


def metric(fleet: LocalFleet, name: str) -> float:
    """The sum of a metric's samples on the control plane's /metrics."""
    text = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def complete(client: httpx.AsyncClient, url: str, prompt: list[int], **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0, **extra}
    reply = await client.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


_PREFIX_RNG = random.Random(3)
PREFIXES = [[_PREFIX_RNG.randrange(3, 390) for _ in range(PREFIX_TOKENS)] for _ in range(4)]


def test_repeated_prefixes_go_where_they_are_cached(fleet, model):
    rng = random.Random(4)
    prefixes = PREFIXES

    def prompt() -> list[int]:  # a shared prefix, then a question of its own
        return [rng.randrange(3, 390) for _ in range(8)]

    async def main() -> tuple[list[list[dict]], list[list[int]]]:
        rounds, prompts = [], []
        async with httpx.AsyncClient() as client:
            for _ in range(6):  # the first round is cold; each later one repeats them all
                batch = [p + prompt() for p in prefixes]
                prompts.append(batch)
                rounds.append(
                    await asyncio.gather(*(complete(client, fleet.url, p) for p in batch))
                )
        return rounds, prompts

    rounds, prompts = asyncio.run(main())
    cold = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rounds[0]]
    assert cold == [0, 0, 0, 0]
    repeats = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for b in rounds[1:] for r in b]
    hits = sum(cached >= PREFIX_TOKENS for cached in repeats)
    assert hits >= 0.95 * len(repeats), f"cached tokens of the repeats: {repeats}"
    assert all(cached < PREFIX_TOKENS + 8 for cached in repeats)  # never the question
    # The cache changed no token: the replies are the in-process engine's.
    engine = LLMEngine(EngineConfig(model=model, device="cpu", enable_prefix_cache=False))
    params = SamplingParams(temperature=0, max_new_tokens=3)
    tokenizer = load_tokenizer(model)
    for batch, replies in zip(prompts[-2:], rounds[-2:], strict=True):
        for tokens, reply in zip(engine.generate(batch, params), replies, strict=True):
            assert reply["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)

    # The nodes count their hits (both prefill nodes served and hit); their heartbeats
    # bring the counts within a second or two.
    def counted(nodes: list[dict]) -> bool:
        prefill = [n["stats"] or {} for n in nodes if n["role"] == "prefill"]
        hits = [s.get("num_cached_prompt_tokens", 0) for s in prefill]
        return sum(hits) >= sum(repeats) and min(hits) >= PREFIX_TOKENS

    fleet.wait_for(counted, timeout=15)
    deadline = time.monotonic() + 10  # /metrics reads the control plane's registry copy
    while metric(fleet, "lightpd_node_prefix_cache_hits_total") < sum(repeats):
        assert time.monotonic() < deadline, "the hits never showed in /metrics"
        time.sleep(0.5)

    # The streamed usage says it too.
    async def streamed() -> dict:
        body = {
            "model": "tiny",
            "prompt": prefixes[0] + prompt(),
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            httpx.AsyncClient() as client,
            client.stream(
                "POST", f"{fleet.url}/v1/completions", json=body, headers=HEADERS, timeout=60
            ) as reply,
        ):
            lines = [line async for line in reply.aiter_lines() if line.startswith("data: {")]
        import json

        return json.loads(lines[-1][6:])["usage"]

    usage = asyncio.run(streamed())
    assert usage["prompt_tokens_details"]["cached_tokens"] >= PREFIX_TOKENS


def test_a_chat_turn_sends_only_its_new_tokens(fleet, model):
    """Turn k lands on the decode node that served turn k-1, which holds the
    conversation so far: only the new tokens' KV moves."""
    tokenizer = load_tokenizer(model)
    messages = [{"role": "system", "content": "You answer about kernels and GPUs. " * 3}]
    previous_prompt = 0
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: how fast is decode?"})
        before = metric(fleet, "lightpd_kv_transfer_tokens_total")
        reply = httpx.post(
            f"{fleet.url}/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0},
            headers=HEADERS,
            timeout=60,
        ).json()
        sent = metric(fleet, "lightpd_kv_transfer_tokens_total") - before
        prompt = reply["usage"]["prompt_tokens"]
        assert prompt == len(encode_chat(tokenizer, messages))
        if turn == 0:
            assert sent == prompt
        else:
            # At most what this turn added (the reply, re-rendered, and the question).
            assert 0 < sent <= prompt - previous_prompt, (turn, sent, prompt, previous_prompt)
        previous_prompt = prompt
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})


def test_another_control_plane_routes_alike(fleet):
    """A control plane that never sent these prefixes anywhere (no routing history)
    routes them to where they are cached, from the nodes' events alone."""
    other = fleet.add_control_plane()
    time.sleep(2)  # it subscribes to the nodes as it sees them in the registry
    rng = random.Random(5)

    async def main() -> list[dict]:
        async with httpx.AsyncClient() as client:
            prompts = [p + [rng.randrange(3, 390) for _ in range(8)] for p in PREFIXES]
            return [await complete(client, other.url, prompt) for prompt in prompts]

    replies = asyncio.run(main())
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies]
    assert all(c >= PREFIX_TOKENS for c in cached), cached


def test_tenants_never_see_each_others_prefixes_unless_the_fleet_shares(fleet):
    """The probe of issue 25: tenant B sends tenant A's prefix and watches
    cached_tokens. By default (scope "tenant") B's count never includes A's tokens;
    a cache_salt narrows a tenant's own namespace; LIGHTPD_PREFIX_CACHE_SCOPE=fleet
    shares prefixes across keys, as before."""
    rng = random.Random(25)
    public = [rng.randrange(3, 390) for _ in range(PREFIX_TOKENS)]
    secret = [rng.randrange(3, 390) for _ in range(6)]
    other_key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]

    async def cached(url: str, key: str, prompt: list[int], **extra) -> int:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, **extra}
        async with httpx.AsyncClient() as client:
            reply = await client.post(
                f"{url}/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    def run(*args, **extra) -> int:
        return asyncio.run(cached(*args, **extra))

    # The attack: the public prefix, a guess at A's next token, one more token (so
    # that the guess is within the part a cache may cover), and cached_tokens read.
    def probe(url: str, guess: int) -> int:
        return run(url, other_key, [*public, guess, 7])

    alice = public + secret
    run(fleet.url, API_KEY, alice)
    assert run(fleet.url, API_KEY, alice) >= PREFIX_TOKENS + 1  # a tenant shares with itself
    wrong = next(t for t in range(3, 390) if t != secret[0])
    assert probe(fleet.url, wrong) == 0  # A's prefix is not B's to find
    # B's own probe cached the public part for B; never A's secret token on top.
    assert probe(fleet.url, secret[0]) == PREFIX_TOKENS
    # What B itself sent (the prefix and its right guess), never A's whole prompt.
    assert run(fleet.url, other_key, alice) == PREFIX_TOKENS + 1
    assert run(fleet.url, API_KEY, [*public, 9, 9], cache_salt="project-7") == 0  # a salt narrows
    # An operator who trusts every client shares the cache fleet-wide: there the
    # probe finds A's token.
    shared = fleet.add_control_plane(LIGHTPD_PREFIX_CACHE_SCOPE="fleet")
    public = [rng.randrange(3, 390) for _ in range(PREFIX_TOKENS)]
    run(shared.url, API_KEY, public + secret)
    assert probe(shared.url, secret[0]) == PREFIX_TOKENS + 1
