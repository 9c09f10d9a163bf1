"""The control plane's index of what each node's prefix cache holds."""

import asyncio
import time

import redis.asyncio as aioredis

from lightpd.common.wire.messages import CacheEvents
from lightpd.common.wire.prefix_blocks import BLOCK_TOKENS, block_hashes
from lightpd.controlplane.node_client import NodeClient
from lightpd.controlplane.prefix_index import PrefixIndex
from lightpd.controlplane.store import Store
from tests.controlplane.test_store import registration

NODE = "tcp://127.0.0.1:5000"


def events(seq: int, stored=(), removed=(), reset=False) -> CacheEvents:
    return CacheEvents(
        node_id="n1", seq=seq, reset=reset, stored=list(stored), removed=list(removed)
    )


def test_overlap_is_the_longest_held_run_of_leading_blocks():
    prompt = list(range(3, 3 + 5 * BLOCK_TOKENS + 7))
    names = block_hashes(prompt)
    assert len(names) == 5  # the partial block has no name
    index = PrefixIndex()
    assert index.apply(NODE, events(0, names[:3], reset=True))
    assert index.synced(NODE, "n1") and not index.synced(NODE, "n2")
    assert index.overlap(NODE, names) == 3 * BLOCK_TOKENS
    # A block held further on does not count past a missing one.
    assert index.apply(NODE, events(1, [names[4]], removed=[names[1]]))
    assert index.overlap(NODE, names) == BLOCK_TOKENS
    # Another prompt that shares the first block only (names are chained).
    other = prompt[:BLOCK_TOKENS] + [9] * BLOCK_TOKENS
    assert index.overlap(NODE, block_hashes(other)) == BLOCK_TOKENS


def test_a_lost_message_drops_the_node_until_a_snapshot():
    names = block_hashes(list(range(4 * BLOCK_TOKENS)))
    index = PrefixIndex()
    index.apply(NODE, events(0, names, reset=True))
    assert not index.apply(NODE, events(2, removed=names[:1]))  # seq 1 never came
    assert not index.synced(NODE, "n1") and index.overlap(NODE, names) == 0
    assert index.apply(NODE, events(0, names[:2], reset=True))
    assert index.overlap(NODE, names) == 2 * BLOCK_TOKENS


def test_routing_history_counts_until_it_ages_out():
    names = block_hashes(list(range(3 * BLOCK_TOKENS)))
    index = PrefixIndex(history_s=0.2)
    index.routed(NODE, names)
    assert index.overlap(NODE, names) == 3 * BLOCK_TOKENS
    time.sleep(0.3)
    assert index.overlap(NODE, names) == 0


def test_a_removed_node_is_forgotten(redis_url):
    """What the index holds of a node goes when the node leaves the registry (the
    control plane reads it each second), so removed nodes do not pile up there."""

    async def main():
        client = aioredis.Redis.from_url(redis_url)
        store = Store(client, node_ttl_s=5.0)
        await store.register(registration("d1"))
        names = block_hashes(list(range(4 * BLOCK_TOKENS)))
        async with NodeClient("a cluster token of the test") as nodes:
            nodes.follow_fleet(await store.nodes())
            endpoint = registration("d1").control_endpoint
            nodes.prefix_index.apply(endpoint, CacheEvents(node_id="d1", seq=0, reset=True))
            nodes.prefix_index.routed(endpoint, names)
            nodes.follow_fleet(await store.nodes())  # still listed: kept
            assert nodes.prefix_index.overlap(endpoint, names) == 4 * BLOCK_TOKENS
            assert await store.remove("d1")
            nodes.follow_fleet(await store.nodes())
            assert nodes.prefix_index.overlap(endpoint, names) == 0
            assert nodes.prefix_index.endpoints() == set()
        await client.aclose()

    asyncio.run(main())
