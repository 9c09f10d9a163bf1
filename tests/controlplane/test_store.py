"""The registry and request records in Redis: dead nodes, timelines."""

import asyncio
import time

import redis.asyncio as aioredis

from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.fleet_schemas import NodeRegistration, NodeStats
from lightpd.controlplane.store import Store

STATS = NodeStats(
    num_free_slots=100,
    num_reserved_slots=8,
    num_running=2,
    num_queued=1,
    num_queued_tokens=40,
    tokens_per_s=12.5,
)


def registration(node_id: str, role: str = "decode") -> NodeRegistration:
    return NodeRegistration(
        node_id=node_id,
        role=role,
        control_endpoint="tcp://127.0.0.1:1",
        kv_endpoint="tcp://127.0.0.1:2" if role == "decode" else None,
        model_fingerprint="f" * 16,
        model_name="tiny",
        device="cpu",
        num_slots=128,
        max_model_len=256,
    )


def run(body):
    """Run ``body(store)`` against the test's Redis with a node TTL of 0.5 s."""

    async def main(url: str):
        client = aioredis.Redis.from_url(url)
        try:
            return await body(Store(client, node_ttl_s=0.5))
        finally:
            await client.aclose()

    return lambda url: asyncio.run(main(url))


def test_a_dead_node_is_listed_as_dead_and_gets_no_work_until_removed(redis_url):
    async def body(store: Store):
        fleet = Fleet(store, "f" * 16, refresh_s=0)
        await store.register(registration("d1"))
        assert await store.heartbeat("d1", STATS) == "ready"
        [node] = await store.nodes()
        assert node.status == "ready" and node.stats == STATS
        assert await fleet.is_alive("d1") and (await fleet.pick("decode", set())).node_id == "d1"

        await asyncio.sleep(0.7)  # no heartbeat for longer than the TTL
        [node] = await store.nodes()
        assert node.status == "dead" and node.stats == STATS  # the last figures stay
        assert not await fleet.is_alive("d1")
        assert await fleet.pick("decode", set()) is None
        assert await fleet.max_model_len() is None
        # A late heartbeat is refused, so the node registers again from scratch.
        assert await store.heartbeat("d1", STATS) is None
        await asyncio.sleep(1.0)
        assert [n.status for n in await store.nodes()] == ["dead"]  # still there

        assert await store.remove("d1")
        assert await store.nodes() == []
        assert await store.was_removed("d1")
        await store.register(registration("d1"))  # an admin may let it back in
        assert [n.status for n in await store.nodes()] == ["ready"]

    run(body)(redis_url)


def test_draining_survives_heartbeats_and_a_dead_node_shows_dead(redis_url):
    async def body(store: Store):
        await store.register(registration("d1"))
        await store.register(registration("p1", "prefill"))
        assert await store.set_status("d1", "draining")
        assert not await store.set_status("nobody", "draining")
        for _ in range(3):
            await asyncio.sleep(0.25)
            assert await store.heartbeat("d1", STATS) == "draining"
        assert {n.node_id: n.status for n in await store.nodes()} == {
            "d1": "draining",
            "p1": "dead",
        }

    run(body)(redis_url)


def test_request_records_carry_a_typed_timeline(redis_url):
    async def body(store: Store):
        await store.record_request("r1", "queued", prompt_tokens=7, max_tokens=16)
        await store.record_request("r1", "prefilling", prefill_node="p1", decode_node="d1")
        await store.record_request("r1", "transferring")
        # A retry: prefilling again on other nodes; the first transfer is void.
        await store.record_request("r1", "prefilling", prefill_node="p2", decode_node="d2")
        await store.record_request("r2", "queued", prompt_tokens=3)
        [running_r2, running_r1] = await store.requests(10, running_only=True)
        assert (running_r2.request_id, running_r1.request_id) == ("r2", "r1")
        assert [r.request_id for r in await store.requests(1, running_only=True)] == ["r2"]
        assert await store.num_running() == 2
        assert [s.state for s in running_r1.timeline] == ["queued", "prefilling"]
        assert running_r1.prefill_node == "p2" and running_r1.max_tokens == 16

        await store.record_request("r1", "decoding", ttft_s=0.25)
        await store.record_request("r1", "finished", output_tokens=16, error="", e2e_s=1.5)
        await store.record_request("r2", "failed", output_tokens=0, error="no ready decode node")
        assert await store.requests(10, running_only=True) == []
        r2, r1 = await store.requests(10)
        assert [s.state for s in r1.timeline] == ["queued", "prefilling", "decoding", "finished"]
        assert all(a.at <= b.at for a, b in zip(r1.timeline, r1.timeline[1:], strict=False))
        assert (r1.ttft_s, r1.e2e_s, r1.output_tokens, r1.error) == (0.25, 1.5, 16, None)
        assert r2.state == "failed" and r2.error == "no ready decode node"
        assert r1.timeline[0].at <= time.time()

    run(body)(redis_url)


def test_a_live_node_id_cannot_be_taken_over_or_its_stats_rewritten(redis_url):
    async def body(store: Store):
        mine, theirs = "a" * 32, "b" * 32
        assert await store.register(registration("d1"), mine)
        # Another process that knows the cluster token, posing as d1:
        assert not await store.register(registration("d1"), theirs)
        assert await store.heartbeat("d1", STATS, theirs) == "conflict"
        assert await store.heartbeat("d1", STATS, mine) == "ready"
        [node] = await store.nodes()
        assert node.control_endpoint == "tcp://127.0.0.1:1" and node.stats == STATS
        # Once d1 is dead (no heartbeat for the TTL), a restarted node may take its id.
        await asyncio.sleep(0.7)
        assert await store.register(registration("d1"), theirs)
        assert await store.heartbeat("d1", STATS, theirs) == "ready"

    run(body)(redis_url)


def test_a_node_whose_loop_is_stuck_is_dead_though_it_heartbeats(redis_url):
    async def main(url: str):
        client = aioredis.Redis.from_url(url)
        try:
            store = Store(client, node_ttl_s=5.0, node_stall_s=2.0)
            await store.register(registration("d1"), "s" * 32)
            stuck = STATS.model_copy(update={"loop_age_s": 2.5})
            assert await store.heartbeat("d1", stuck, "s" * 32) == "ready"
            assert [n.status for n in await store.nodes()] == ["dead"]
            assert await store.heartbeat("d1", STATS, "s" * 32) == "ready"
            assert [n.status for n in await store.nodes()] == ["ready"]
        finally:
            await client.aclose()

    asyncio.run(main(redis_url))


def test_the_registry_schemas_are_the_nodes_own_status():
    # Nodes describe themselves with one struct (common.wire.messages.NodeStatus); the
    # control plane's HTTP schemas must take exactly its fields, or they drift apart.
    from lightpd.common.wire.messages import NodeStats as WireStats
    from lightpd.common.wire.messages import NodeStatus

    identity = set(NodeStatus.__struct_fields__) - {"layout", "stats"}
    assert set(NodeRegistration.model_fields) == identity
    assert set(NodeStats.model_fields) == set(WireStats.__struct_fields__)
