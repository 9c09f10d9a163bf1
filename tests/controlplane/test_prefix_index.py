"""The control plane's index of what each node's prefix cache holds."""

import time

from lightpd.common.wire.messages import CacheEvents
from lightpd.common.wire.prefix_blocks import BLOCK_TOKENS, block_hashes
from lightpd.controlplane.prefix_index import PrefixIndex

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
