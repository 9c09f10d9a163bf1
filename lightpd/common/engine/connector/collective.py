"""K/V over torch.distributed: NCCL between GPUs, Gloo on CPU.

The channel carries the headers, secrets, acknowledgements and deadlines; the
K/V tensors go over a two-rank group per (sender, receiver) pair, point to
point, each under the tag its header carries.

A pair is made on first use: the sender sends ``KVGroupHello`` with a random
pair id over the CURVE channel; the receiver answers ``KVGroupReady`` with the
port of its TCPStore, and both build the group under a store prefix only they
know. Each pair has one thread per side that builds the group and then moves
the pair's tensors in order, so neither serving loop ever waits on the network.
The sender gathers a layer chunk on the compute stream and hands it to its
thread; the receiver's thread lands it in a buffer, and the loop scatters it
into the reserved slots once it is complete.

A pair whose transfer fails (a peer that died, a deadline) is torn down: its
group is aborted, not waited on, every transfer on it fails, and the next
request builds a new pair.
"""

import datetime
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch
import torch.distributed as dist
import zmq

from lightpd.common.engine.connector.base import KVFailed
from lightpd.common.engine.connector.transport import Channel, Transport
from lightpd.common.engine.nccl_env import let_failed_communicators_abort
from lightpd.common.wire.messages import (
    KVGroupHello,
    KVGroupReady,
    KVLayer,
    Message,
    ProtocolError,
)

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(seconds=30)
_STOP = object()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _make_group(store: dist.Store, pair_id: str, rank: int, host: str, device: torch.device):
    prefixed = dist.PrefixStore(f"lightpd/{pair_id}/", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this thread's sends and receives run there
        let_failed_communicators_abort()
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = GROUP_TIMEOUT
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupGloo(prefixed, rank, 2, options)


def _finish(work, pair: "_Pair") -> None:
    """Wait, on the pair's thread, until one send or receive is complete."""
    if pair.group_is_nccl:
        # NCCL's wait() only orders streams; completion is polled, so a torn-down
        # pair can stop waiting.
        while not work.is_completed():
            if pair.failure is not None:
                raise RuntimeError(pair.failure)
            time.sleep(0.0002)
        return
    work.wait(GROUP_TIMEOUT)


@dataclass
class _Pair:
    """One side of a (sender, receiver) group and the thread that drives it."""

    pair_id: str
    jobs: queue.Queue = field(default_factory=queue.Queue)
    group: object | None = None
    failure: str | None = None
    thread: threading.Thread | None = None
    next_tag: int = 0
    request_ids: set[str] = field(default_factory=set)
    group_is_nccl: bool = False
    # NCCL, once the group is built and its backlog sent: operations are issued by
    # the serving loop itself (they run on NCCL's stream) and reaped when complete.
    direct: bool = False
    inflight: list = field(default_factory=list)  # (work, on_done) issued directly
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, op: Callable[[object], object], on_done: Callable[[], None] | None) -> None:
        """Run ``op(group)`` (a send or a receive) after those submitted before it."""
        with self.lock:
            if self.direct:
                self.inflight.append((op(self.group), on_done))
                return
            self.jobs.put((op, on_done))

    def reap(self) -> None:
        """Finish the direct operations that completed (in order)."""
        while self.inflight and self.inflight[0][0].is_completed():
            _, on_done = self.inflight.pop(0)
            if on_done is not None:
                on_done()

    def start(self, build: Callable[[], object], on_failure: Callable[["_Pair"], None]) -> None:
        def run() -> None:
            try:
                self.group = build()
                self.group_is_nccl = isinstance(self.group, getattr(dist, "ProcessGroupNCCL", ()))
                while True:
                    with self.lock:
                        if self.group_is_nccl and self.jobs.empty():
                            self.direct = True
                    job = self.jobs.get()
                    if job is _STOP:
                        return
                    op, on_done = job
                    _finish(op(self.group), self)
                    if on_done is not None:
                        on_done()
            except Exception as exc:  # a peer gone, a timeout, an abort
                self.failure = f"KV group {self.pair_id[:8]} failed: {exc}"
                on_failure(self)

        self.thread = threading.Thread(target=run, name=f"kv-{self.pair_id[:8]}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(_STOP)
        group = self.group
        if group is not None and hasattr(group, "abort"):
            try:
                group.abort()
            except Exception:  # already broken: nothing more to release
                logger.debug("aborting KV group %s", self.pair_id[:8], exc_info=True)


class CollectiveTransport(Transport):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.device = channel.pool.device
        self.name = _backend(self.device)
        self._lock = threading.Lock()
        self._failed_pairs: list[_Pair] = []
        # Sender side: one pair per receiver endpoint.
        self._out: dict[str, _Pair] = {}
        # Receiver side: a store that senders rendezvous at, and one pair per sender.
        self._store: dist.TCPStore | None = None
        self._in: dict[str, _Pair] = {}
        self._senders: dict[bytes, _Pair] = {}  # the connection a pair's hello came on
        self._landed: dict[str, list] = {}  # request id -> chunks received, not yet scattered
        self._in_flight: dict[str, int] = {}  # request id -> chunks still on the wire
        if channel.host is not None:
            self._store = dist.TCPStore(
                channel.host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT
            )

    def _pairs(self) -> list[_Pair]:
        return [*self._out.values(), *self._in.values()]

    # ---- sending ----

    def send_layer(self, endpoint: str, header: KVLayer, slots: torch.Tensor) -> None:
        pair = self._out.get(endpoint)
        if pair is None or pair.failure is not None:
            pair = self._open_pair(endpoint)
        pool, index, layer = self.channel.pool, slots.long(), header.layer
        # (2, n, Hk, D) gathered on the compute stream; the pair's thread sends it.
        kv = torch.stack((pool.k_cache(layer)[index], pool.v_cache(layer)[index]))
        tag = pair.next_tag
        pair.next_tag += 1
        pair.request_ids.add(header.request_id)
        # On lane 0, like the hello: the receiver knows the pair by that connection,
        # and takes the tensors in the order of their headers.
        self.channel.send(msgspec.structs.replace(header, group_tag=tag))
        pair.submit(lambda group: group.send([kv], 1, tag), None)

    def _open_pair(self, endpoint: str) -> _Pair:
        pair = _Pair(secrets.token_hex(16))
        self._out[endpoint] = pair
        self.channel.send_to(endpoint, KVGroupHello(pair_id=pair.pair_id, backend=self.name))
        return pair

    def on_receiver_message(self, endpoint: str, message: Message) -> bool:
        if not isinstance(message, KVGroupReady):
            return False
        pair = self._out.get(endpoint)
        if pair is None or pair.pair_id != message.pair_id or pair.thread is not None:
            return True
        host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]

        def build():
            store = dist.TCPStore(host, message.store_port, is_master=False, timeout=GROUP_TIMEOUT)
            return _make_group(store, pair.pair_id, 0, host, self.device)

        pair.start(build, self._pair_failed)
        return True

    # ---- receiving ----

    def on_sender_message(self, peer: bytes, message: Message) -> bool:
        if not isinstance(message, KVGroupHello):
            return False
        if message.backend != self.name:
            reason = f"KV group backend {message.backend} offered, this node uses {self.name}"
            logger.warning(reason)
            return True
        pair = _Pair(message.pair_id)
        self._in[message.pair_id] = pair
        self._senders[peer] = pair
        host = self.channel.host
        pair.start(
            lambda: _make_group(self._store, pair.pair_id, 1, host, self.device),
            self._pair_failed,
        )
        self.channel.reply(peer, KVGroupReady(pair_id=message.pair_id, store_port=self._store.port))
        return True

    def receive_layer(
        self, peer: bytes, header: KVLayer, frames: list[zmq.Frame], slots: torch.Tensor
    ) -> None:
        if frames:
            raise ProtocolError(f"a KV layer needs 0 data frames, got {len(frames)}")
        # A sender's layers come over the connection its hello came on.
        pair = self._senders.get(peer)
        if pair is None:
            raise ProtocolError("KV over a group that was never set up with this sender")
        pair.request_ids.add(header.request_id)
        with self._lock:
            self._in_flight[header.request_id] = self._in_flight.get(header.request_id, 0) + 1
        self._post_receive(pair, header, slots)

    def drop_layer(self, peer: bytes, header: KVLayer) -> None:
        pair = self._senders.get(peer)
        if pair is not None:
            # Refused or unknown, but its tensor is on the pair's wire all the same:
            # take it and drop it, so the pair's later transfers stay in step.
            self._post_receive(pair, header, None)

    def _post_receive(self, pair: _Pair, header: KVLayer, slots: torch.Tensor | None) -> None:
        request_id, layer, tag = header.request_id, header.layer, header.group_tag
        layout = self.channel.layout
        shape = (2, header.num_tokens, layout.num_kv_heads, layout.head_dim)
        dtype = self.channel.pool.k_cache(0).dtype
        buffer = torch.empty(shape, dtype=dtype, device=self.device)

        def landed() -> None:
            if slots is None:
                return
            with self._lock:
                if request_id in self._in_flight:  # not ended meanwhile
                    self._in_flight[request_id] -= 1
                    self._landed.setdefault(request_id, []).append((layer, slots, buffer))

        pair.submit(lambda group: group.recv([buffer], 0, tag), landed)

    def landed(self, request_id: str) -> bool:
        # Checked before scattering: a chunk counted as landed is already queued.
        with self._lock:
            landed = self._in_flight.get(request_id, 0) == 0
        self._scatter_landed()
        return landed

    def _scatter_landed(self) -> None:
        # Only live transfers' chunks are here: ``end`` drops the others.
        with self._lock:
            landed, self._landed = self._landed, {}
        pool = self.channel.pool
        for chunks in landed.values():
            for layer, slots, kv in chunks:
                index = slots.long()
                pool.k_cache(layer)[index] = kv[0]
                pool.v_cache(layer)[index] = kv[1]

    # ---- upkeep ----

    def poll(self) -> list[KVFailed]:
        for pair in self._pairs():
            pair.reap()
        self._scatter_landed()
        with self._lock:
            failed, self._failed_pairs = self._failed_pairs, []
        failures = []
        for pair in failed:
            reason = pair.failure or "KV group failed"
            failures += [KVFailed(request_id, reason) for request_id in pair.request_ids]
            self._forget(pair)
        return failures

    def busy(self) -> bool:
        return any(pair.inflight for pair in self._pairs()) or bool(self._in_flight)

    def end(self, request_id: str, stuck: bool = False) -> None:
        with self._lock:
            self._landed.pop(request_id, None)
            self._in_flight.pop(request_id, None)
        for pair in self._pairs():
            if request_id not in pair.request_ids:
                continue
            pair.request_ids.discard(request_id)
            if stuck and pair.failure is None:
                # Its other transfers fail with it; the next request builds a new pair.
                pair.failure = "a transfer on this KV group ran past its deadline"
                self._pair_failed(pair)

    def close(self) -> None:
        for pair in self._pairs():
            pair.stop()

    def _pair_failed(self, pair: _Pair) -> None:
        logger.warning("tearing down KV group %s: %s", pair.pair_id[:8], pair.failure)
        pair.stop()
        with self._lock:
            self._failed_pairs.append(pair)

    def _forget(self, pair: _Pair) -> None:
        for pairs in (self._out, self._in):
            for key, value in list(pairs.items()):
                if value is pair:
                    del pairs[key]
        for key, value in list(self._senders.items()):
            if value is pair:
                del self._senders[key]
