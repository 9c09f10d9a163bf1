"""Which node holds which prompt prefixes: what cache-aware routing reads.

Two sources, per node (keyed by its control endpoint):
- events: the names of the blocks its prefix cache stores and evicts
  (``common.wire.prefix_blocks``), which it sends to every control plane that
  subscribed. Every control plane hears the same events, so control planes that
  share a fleet route alike.
- routing history: the blocks of prompts this control plane sent there in the
  last ``history_s`` seconds. A node's events trail its work by a step or two,
  and a subscription takes a round trip: for a burst of requests with one
  system prompt, this is what keeps them together until the events arrive.

A prompt's overlap with a node is the length of the longest run of its leading
blocks the node holds by either account, in tokens.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lightpd.common.wire.messages import CacheEvents
from lightpd.common.wire.prefix_blocks import BLOCK_TOKENS

# A node's blocks kept here at most (a pool of 16M tokens); past it, the node's
# entries are dropped and asked for again, so a node cannot grow this unbounded.
MAX_BLOCKS_PER_NODE = 1 << 20
MAX_HISTORY_BLOCKS = 1 << 16  # per node


@dataclass
class _NodeBlocks:
    blocks: set[int] = field(default_factory=set)
    next_seq: int | None = None  # None: no snapshot yet (or one was lost)
    node_id: str | None = None  # who sent them (a node restarted on the endpoint differs)
    history: OrderedDict[int, float] = field(default_factory=OrderedDict)  # block -> when


class PrefixIndex:
    def __init__(self, history_s: float = 10.0) -> None:
        self.history_s = history_s
        self._nodes: dict[str, _NodeBlocks] = {}

    def _node(self, endpoint: str) -> _NodeBlocks:
        node = self._nodes.get(endpoint)
        if node is None:
            node = self._nodes[endpoint] = _NodeBlocks()
        return node

    def synced(self, endpoint: str, node_id: str) -> bool:
        """Whether the events of node ``node_id`` are being followed (a snapshot came,
        no gap since)."""
        node = self._nodes.get(endpoint)
        return node is not None and node.next_seq is not None and node.node_id == node_id

    def apply(self, endpoint: str, message: CacheEvents) -> bool:
        """Take a node's message; False when one was lost before it (the caller
        subscribes again: until the snapshot comes, only history counts)."""
        node = self._node(endpoint)
        if message.reset:
            node.blocks.clear()
            node.node_id = message.node_id
        elif node.next_seq != message.seq:
            node.next_seq = None
            node.blocks.clear()
            return False
        node.blocks.difference_update(message.removed)
        node.blocks.update(message.stored)
        node.next_seq = message.seq + 1
        if len(node.blocks) > MAX_BLOCKS_PER_NODE:
            node.blocks.clear()
            node.next_seq = None
            return False
        return True

    def endpoints(self) -> set[str]:
        """The nodes this index holds anything of."""
        return set(self._nodes)

    def forget(self, endpoint: str) -> None:
        """The node left: what it held is gone with it."""
        self._nodes.pop(endpoint, None)

    def routed(self, endpoint: str, hashes: list[int]) -> None:
        """A prompt with these block names was sent to the node just now."""
        history = self._node(endpoint).history
        now = time.monotonic()
        for block in hashes:
            history[block] = now
            history.move_to_end(block)
        while len(history) > MAX_HISTORY_BLOCKS:
            history.popitem(last=False)

    def overlap(self, endpoint: str, hashes: list[int]) -> int:
        """Tokens of the prompt whose blocks are ``hashes`` that the node holds, from
        its start."""
        node = self._nodes.get(endpoint)
        if node is None:
            return 0
        recent = time.monotonic() - self.history_s
        history = node.history
        while history:  # oldest first: drop what aged out
            block, when = next(iter(history.items()))
            if when >= recent:
                break
            history.popitem(last=False)
        held = 0
        for block in hashes:
            if block not in node.blocks and block not in history:
                break
            held += 1
        return held * BLOCK_TOKENS
