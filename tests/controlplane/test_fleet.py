"""Routing over the registry: a node that just joined is found despite the cache."""

import asyncio

import redis.asyncio as aioredis

from lightpd.controlplane.fleet import Fleet
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
