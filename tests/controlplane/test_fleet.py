"""Routing over the registry: a node that just joined is found despite the cache;
slots freed or taken since a node's last heartbeat count."""

import asyncio

import redis.asyncio as aioredis

from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.fleet_schemas import NodeStats
from lightpd.controlplane.store import Store
from tests.controlplane.test_store import registration


def test_a_node_that_just_joined_is_picked_despite_the_cache(redis_url):
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        store = Store(client, node_ttl_s=5.0)
        fleet = Fleet(store, "f" * 16, refresh_s=60.0)
        assert await fleet.pick("decode", set()) is None
        assert await fleet.max_model_len() is None
        await store.register(registration("d1"))
        picked = await fleet.pick("decode", set())
        assert picked is not None and picked.node_id == "d1"
        assert await fleet.pick("decode", {"d1"}) is None
        await store.register(registration("d2"))
        # With a ready node in the cache, the cache is used as it is.
        assert (await fleet.pick("decode", set())).node_id == "d1"
        assert await fleet.max_model_len() == 256
        await client.aclose()

    asyncio.run(main())


def stats(free: int) -> NodeStats:
    return NodeStats(
        num_free_slots=free,
        num_reserved_slots=0,
        num_running=0,
        num_queued=0,
        num_queued_tokens=0,
        tokens_per_s=0.0,
    )


def test_slots_freed_since_the_last_heartbeat_count_as_free(redis_url):
    """A chat's next turn, sent as soon as the last reply ended, goes back to the
    decode node holding the chat, though that node's last heartbeat still counts
    the reply's slots; the next heartbeat replaces the estimate."""

    async def main():
        client = aioredis.Redis.from_url(redis_url)
        store = Store(client, node_ttl_s=5.0)
        fleet = Fleet(store, "f" * 16, refresh_s=0.0)
        for node_id in ("d1", "d2"):
            await store.register(registration(node_id))
        await store.heartbeat("d1", stats(60))  # the reply's 68 slots still in use
        await store.heartbeat("d2", stats(128))
        holds = {"d1": 48, "d2": 0}  # d1's cache holds the chat's first 48 tokens

        def overlap(node):
            return holds[node.node_id]

        async def pick() -> str:
            with fleet.charge(80) as charge:
                node = await fleet.pick("decode", set(), charge, overlap)
                assert fleet.inflight_tokens[node.node_id] == 80  # until the first token
            assert fleet.inflight_tokens[node.node_id] == 0
            return node.node_id

        async def chat_turn(settle: float = 0.0) -> None:
            """A turn on d1 that reserved 68 slots ``settle`` s after d1's last heartbeat
            and is over now."""
            heard = (await fleet.nodes())[0].last_heartbeat
            with fleet.charge(60) as charge:
                charge.add(next(n for n in await fleet.nodes() if n.node_id == "d1"))
                charge.since = heard + settle
                charge.settled()  # the first token: the prompt's 60 slots are held
                charge.grew(8)  # 8 tokens generated

        assert await pick() == "d2"  # d1's free slots, less the uncached part, are fewer
        # The reply was admitted before d1's last heartbeat, which counts it; it ended.
        await chat_turn(settle=-1.0)
        assert await pick() == "d1"
        # A heartbeat after the release is the count from then on.
        await asyncio.sleep(0.01)
        await store.heartbeat("d1", stats(60))
        assert await pick() == "d2"
        # A turn admitted and ended between two heartbeats was never counted.
        await chat_turn(settle=0.001)
        assert await pick() == "d2"
        # Admitted since the last heartbeat: charged until one comes.
        await store.heartbeat("d1", stats(128))
        assert await pick() == "d1"
        with fleet.charge(100) as charge:
            charge.add(next(n for n in await fleet.nodes() if n.node_id == "d1"))
            charge.settled()
            assert await pick() == "d2"
            await asyncio.sleep(0.01)
            await store.heartbeat("d1", stats(28))  # it shows the 100 slots
            assert await pick() == "d2"
            await store.heartbeat("d1", stats(128))  # (as if another request ended)
            assert await pick() == "d1"
        await client.aclose()

    asyncio.run(main())
