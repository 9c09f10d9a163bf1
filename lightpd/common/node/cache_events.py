"""A node's news of its prefix cache, for the control planes that route by it.

A control plane subscribes with CacheSync and gets a snapshot (the names of every
block the cache holds), then, after each loop round that changed the cache, the
names stored and removed since (``CacheEvents``). Each subscriber's messages are
numbered from 0, so it sees a lost one as a gap and subscribes again. A
subscriber that cannot take a message (gone, or not reading) is dropped; it
subscribes again when it notices. Sends never block the loop.
"""

import logging

import zmq

from lightpd.common.engine import LLMEngine
from lightpd.common.wire.messages import MAX_BLOCK_HASHES, CacheEvents
from lightpd.common.wire.sockets import send

logger = logging.getLogger(__name__)


class CacheEventPublisher:
    def __init__(self, engine: LLMEngine, sock: zmq.Socket, node_id: str) -> None:
        self.engine = engine
        self.sock = sock
        self.node_id = node_id
        self._next_seq: dict[bytes, int] = {}  # per subscriber
        self.engine.take_cache_events()  # from now on the cache notes its changes

    def subscribe(self, origin: bytes) -> None:
        """Send ``origin`` everything the cache holds (again, if it asks again)."""
        blocks = self.engine.cached_block_names()
        self._next_seq[origin] = 0
        chunks = [blocks[i : i + MAX_BLOCK_HASHES] for i in range(0, len(blocks), MAX_BLOCK_HASHES)]
        for number, chunk in enumerate(chunks or [[]]):
            if not self._send(origin, stored=chunk, reset=number == 0):
                return

    def forget(self, origin: bytes) -> None:
        self._next_seq.pop(origin, None)

    def publish(self) -> None:
        """What changed since the last call, to every subscriber."""
        stored, removed = self.engine.take_cache_events()
        if not (stored or removed) or not self._next_seq:
            return
        for start in range(0, max(len(stored), len(removed)), MAX_BLOCK_HASHES):
            end = start + MAX_BLOCK_HASHES
            for origin in list(self._next_seq):
                self._send(origin, stored=stored[start:end], removed=removed[start:end])

    def _send(
        self, origin: bytes, stored: list[int], removed: list[int] = (), reset: bool = False
    ) -> bool:
        seq = self._next_seq[origin]
        message = CacheEvents(
            node_id=self.node_id, seq=seq, reset=reset, stored=stored, removed=list(removed)
        )
        if not send(self.sock, origin, message):
            logger.info("a control plane is not reading cache events; dropped until it asks again")
            self.forget(origin)
            return False
        self._next_seq[origin] = seq + 1
        return True
