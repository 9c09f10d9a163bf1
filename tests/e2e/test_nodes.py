"""Prefill and decode nodes as real processes, KV streamed over ZeroMQ on loopback."""

import asyncio
import random

import msgspec
import pytest

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import (
    PROTOCOL_VERSION,
    Error,
    HealthCheck,
    KVAck,
    KVLayer,
    KVTarget,
    PrefillDone,
    encode,
)
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.node_process import start_node
from lightpd.controlplane.node_client import NodeClient, NodeError
from tests.e2e import node_calls
from tests.e2e.fleet import CLUSTER_TOKEN, raw_call

SLOTS = 4096
NODE_ARGS = ("--num-kv-slots", str(SLOTS), "--max-prefill-tokens", "256")
# Every test runs over both KV transports: ZeroMQ frames, and a torch.distributed
# pair group ("nccl": NCCL between GPUs, Gloo here on the CPU).
TRANSPORTS = ("zmq", "nccl")


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
def node_args(transport) -> tuple[str, ...]:
    return (*NODE_ARGS, "--kv-transport", transport)


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(1, 300))] for _ in range(n)]
    params = []
    for i in range(n):
        max_new = rng.randint(1, 40)
        if i % 2:
            params.append(
                SamplingParams(
                    temperature=0.9,
                    top_p=0.95,
                    seed=1000 + i,
                    max_new_tokens=max_new,
                    logprobs=2 if i % 4 == 1 else None,
                )
            )
        else:
            params.append(SamplingParams(temperature=0, max_new_tokens=max_new))
    return prompts, params


def in_process(model: str, prompts, params) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_kv_slots=SLOTS))
    return engine.generate(prompts, params)


async def wait_for_idle(client: NodeClient, *endpoints: str, timeout: float = 10.0) -> None:
    """Until every node's pool has all its slots free again (acks are asynchronous)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        healths = [await client.health(e) for e in endpoints]
        if all(h.stats.num_free_slots == h.num_slots for h in healths):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"slots still held: {[(h.node_id, h.stats.num_free_slots) for h in healths]}"
            )
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from lightpd.common.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture(scope="module")
def pair(model, transport):
    args = (*NODE_ARGS, "--kv-transport", transport)
    prefill = start_node("prefill", model, *args, cluster_token=CLUSTER_TOKEN)
    decode_ = start_node("decode", model, *args, cluster_token=CLUSTER_TOKEN)
    yield prefill, decode_
    prefill.stop()
    decode_.stop()


def test_concurrent_requests_match_the_in_process_engine(model, pair):
    prefill, decode_ = pair
    prompts, params = workload(32)
    expected = in_process(model, prompts, params)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            results = await asyncio.gather(
                *(
                    node_calls.generate(client, prefill.control, decode_.control, f"c{i}", p, sp)
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
                )
            )
            await wait_for_idle(client, prefill.control, decode_.control)
            health = await client.health(decode_.control)
            return results, health

    results, health = asyncio.run(main())
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert result.error is None, result.error
        assert result.token_ids == want, f"request {i}"
        assert result.finish_reason in ("stop", "length")
        if params[i].logprobs is not None:
            assert [lp.token_id for lp in result.logprobs] == want
            assert all(len(lp.top) == 2 for lp in result.logprobs)
    assert health.role == "decode"
    assert health.stats.num_running == 0 and health.stats.num_queued == 0


def test_abort_mid_stream_frees_both_pools(model, pair):
    prefill, decode_ = pair
    prompt = list(range(3, 200))
    params = SamplingParams(temperature=0, max_new_tokens=500, min_new_tokens=500, seed=1)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            client.open_stream("long")
            reserved = await client.reserve(decode_.control, "long", prompt, params)
            await client.prefill(
                prefill.control,
                "long",
                prompt,
                params,
                reserved.target(),
            )
            received, last = 0, None
            async for event in node_calls.events(client, "long"):
                received += len(event.token_ids)
                last = event
                if received >= 5 and received < 100:
                    await client.abort(decode_.control, "long")
                    await client.abort(prefill.control, "long")
                    received = 100  # abort once
            await wait_for_idle(client, prefill.control, decode_.control)
            return last

    last = asyncio.run(main())
    assert last.finish_reason == "abort"
    assert last.num_output_tokens < 500


def test_expired_reservation_is_released_with_an_error(model, pair):
    _, decode_ = pair

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            client.open_stream("orphan")
            await client.reserve(
                decode_.control, "orphan", [5, 6, 7], SamplingParams(seed=1), kv_timeout_s=0.5
            )
            events = [e async for e in node_calls.events(client, "orphan", timeout=10)]
            await wait_for_idle(client, decode_.control)
            return events

    [event] = asyncio.run(main())
    assert event.finish_reason == "error"
    assert "KV did not arrive within 0.5 s; reservation released" in event.error


def test_prefill_whose_decode_target_is_gone_frees_its_kv(model, pair):
    prefill, decode_ = pair
    params = SamplingParams(seed=3)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            layout = (await client.health(decode_.control)).layout
            dead = KVTarget("tcp://127.0.0.1:9", layout)  # nothing listens there
            client.open_stream("lost")
            await client.prefill(
                prefill.control, "lost", list(range(3, 50)), params, dead, ack_timeout_s=0.5
            )
            events = [e async for e in node_calls.events(client, "lost", timeout=10)]
            await wait_for_idle(client, prefill.control)
            return events

    # The prefill node says the prompt is computed (a token-less event), then the error.
    computed, event = asyncio.run(main())
    assert not computed.token_ids and computed.finish_reason is None
    assert computed.num_prompt_tokens == 47
    assert event.finish_reason == "error"
    assert "did not acknowledge the KV within 0.5 s" in event.error


MEMBER = FleetKeys.from_token(CLUSTER_TOKEN)


def test_bad_messages_get_clear_errors_and_nodes_keep_serving(model, pair):
    prefill, decode_ = pair
    garbage = raw_call(decode_.control, [b"\x93not msgpack at all"], MEMBER)
    assert isinstance(garbage, Error) and garbage.message.startswith("malformed message")

    future = msgspec.msgpack.encode({"type": "health_check", "version": 99, "call_id": 1})
    wrong = raw_call(prefill.control, [future], MEMBER)
    assert isinstance(wrong, Error)
    assert wrong.message == (
        f"protocol version 99 is not supported; this node speaks {PROTOCOL_VERSION}"
    )

    bad_params = msgspec.msgpack.encode(
        {
            "type": "reserve",
            "version": PROTOCOL_VERSION,
            "call_id": 2,
            "request_id": "x",
            "secret": "0" * 32,
            "prompt_token_ids": [1, 2],
            "params": {"top_p": 7.0},
        }
    )
    refused = raw_call(decode_.control, [bad_params], MEMBER)
    assert "top_p must be in (0, 1], got 7.0" in refused.message

    health = raw_call(decode_.control, [encode(HealthCheck(call_id=3))], MEMBER)
    assert health.status.role == "decode"

    async def layout_mismatch():
        async with NodeClient(CLUSTER_TOKEN) as client:
            layout = (await client.health(decode_.control)).layout
            other = msgspec.structs.replace(layout, num_layers=layout.num_layers + 1)
            with pytest.raises(
                NodeError,
                match=r"KV layout mismatch with the decode target "
                r"\(num_layers: 2 here, 3 there\)",
            ):
                await client.prefill(
                    prefill.control,
                    "mm",
                    [4, 5],
                    SamplingParams(seed=1),
                    KVTarget(decode_.kv, other),
                )
            # A sender with another layout is refused by the decode node too.
            client.open_stream("mm2")
            reserved = await client.reserve(
                decode_.control, "mm2", [4, 5, 6], SamplingParams(seed=1)
            )
            header = KVLayer(
                request_id="mm2",
                secret=node_calls.secret(client, "mm2"),
                layout=other,
                layer=0,
                start=0,
                num_tokens=3,
            )
            ack = raw_call(reserved.kv_endpoint, [encode(header), b"\0" * 8, b"\0" * 8], MEMBER)
            events = [e async for e in node_calls.events(client, "mm2", timeout=10)]
            done = PrefillDone(
                request_id="nobody",
                secret="0" * 32,
                layout=layout,
                num_prompt_tokens=1,
                first_token=1,
            )
            late = raw_call(reserved.kv_endpoint, [encode(done)], MEMBER)
            await wait_for_idle(client, prefill.control, decode_.control)
            result = await node_calls.generate(
                client,
                prefill.control,
                decode_.control,
                "after",
                [7, 8, 9],
                SamplingParams(temperature=0, max_new_tokens=4),
            )
            return ack, events, late, result

    ack, events, late, result = asyncio.run(layout_mismatch())
    assert (
        isinstance(ack, KVAck) and "KV layout mismatch (num_layers: 2 here, 3 there)" in ack.error
    )
    assert events[-1].finish_reason == "error" and "KV layout mismatch" in events[-1].error
    assert isinstance(late, KVAck) and late.error == "no reservation (aborted or expired)"
    assert result.error is None and len(result.token_ids) == 4


def test_two_prefill_nodes_feed_one_decode_node(model, nodes, node_args):
    prefills = [nodes("prefill", model, *node_args) for _ in range(2)]
    decode_ = nodes("decode", model, *node_args)
    prompts, params = workload(12, seed=1)
    expected = in_process(model, prompts, params)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            results = await asyncio.gather(
                *(
                    node_calls.generate(
                        client, prefills[i % 2].control, decode_.control, f"t{i}", p, sp
                    )
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
                )
            )
            await wait_for_idle(client, decode_.control, *(p.control for p in prefills))
            return results

    assert [r.token_ids for r in asyncio.run(main())] == expected


def test_one_prefill_node_feeds_two_decode_nodes(model, nodes, node_args):
    prefill = nodes("prefill", model, *node_args)
    decodes = [nodes("decode", model, *node_args) for _ in range(2)]
    prompts, params = workload(12, seed=2)
    expected = in_process(model, prompts, params)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            results = await asyncio.gather(
                *(
                    node_calls.generate(
                        client, prefill.control, decodes[i % 2].control, f"u{i}", p, sp
                    )
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
                )
            )
            await wait_for_idle(client, prefill.control, *(d.control for d in decodes))
            return results

    assert [r.token_ids for r in asyncio.run(main())] == expected


def test_killing_the_prefill_node_mid_transfer_ends_requests_with_an_error(
    model, nodes, node_args, transport
):
    # Small chunks make the long prompts take many steps, so the kill lands mid-transfer.
    args = ("--num-kv-slots", str(SLOTS), "--max-prefill-tokens", "8", "--kv-transport", transport)
    prefill = nodes("prefill", model, *args)
    decode_ = nodes("decode", model, *node_args)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as client:
            params = SamplingParams(temperature=0, max_new_tokens=8, seed=1)
            prompt = list(range(3, 395)) * 4  # 1568 tokens: about 200 prefill steps
            ids = [f"k{i}" for i in range(4)]
            for request_id in ids:
                client.open_stream(request_id)
                reserved = await client.reserve(
                    decode_.control, request_id, prompt, params, kv_timeout_s=2.0
                )
                await client.prefill(
                    prefill.control,
                    request_id,
                    prompt,
                    params,
                    reserved.target(),
                )
            prefill.kill()
            finals = []
            for request_id in ids:
                events = [e async for e in node_calls.events(client, request_id, timeout=20)]
                finals.append(events[-1])
            await wait_for_idle(client, decode_.control)
            return finals

    finals = asyncio.run(main())
    # Every request ends; those the kill caught end with the reason, none hangs.
    affected = [f for f in finals if f.finish_reason == "error"]
    assert affected, "the kill was meant to land mid-transfer"
    # Nothing arrived, or the first token did and some layers never did (the 2 s KV
    # deadline ends it), or the pair's group saw the sender's connection close.
    ends = ("KV did not arrive within 2 s", "incomplete KV after 2 s", "KV group ")
    assert all(f.error.startswith(ends) for f in affected), [f.error for f in affected]
    assert all(f.finish_reason == "length" for f in finals if f not in affected)
