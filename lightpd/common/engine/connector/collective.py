"""The KV connector over torch.distributed: NCCL between GPUs, Gloo on CPU.

Headers, secrets, acknowledgements and deadlines travel as in the ZeroMQ
transport (whose code this reuses); the K/V tensors themselves go over a
two-rank group per (sender, receiver) pair, point to point.

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
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import zmq

from lightpd.common.engine.connector.base import KVFailed, LayerChunk
from lightpd.common.engine.connector.zeromq import ZmqConnector, _Send
from lightpd.common.wire.messages import (
    KVGroupHello,
    KVGroupReady,
    KVLayer,
    KVLayout,
    ProtocolError,
    encode,
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
        # A communicator that fails (a peer died) is aborted, and the node lives on:
        # NCCL's default handling would end the whole process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
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


class CollectiveConnector(ZmqConnector):
    def __init__(
        self,
        layout: KVLayout,
        pool,
        keys,
        ctx: zmq.Context,
        bind_host: str | None = None,
        bind_port: int = 0,
        max_tokens: int = 1 << 20,
    ) -> None:
        super().__init__(layout, pool, keys, ctx, bind_host, bind_port, max_tokens)
        self.device = pool.device
        self.backend = self.transport = _backend(self.device)
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
        if bind_host is not None:
            self._host = bind_host
            self._store = dist.TCPStore(
                bind_host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT
            )

    # ---- sending ----

    def _send_layer(self, chunk: LayerChunk, send: _Send, header: KVLayer) -> None:
        if send.spec.transport != self.backend:  # the receiver takes frames only
            return super()._send_layer(chunk, send, header)
        pair = self._out.get(send.spec.endpoint)
        if pair is None or pair.failure is not None:
            pair = self._open_pair(send.spec.endpoint)
        index = chunk.slots.long()
        layer = header.layer
        # (2, n, Hk, D) gathered on the compute stream; the pair's thread sends it.
        kv = torch.stack((self.pool.k_cache(layer)[index], self.pool.v_cache(layer)[index]))
        tag = pair.next_tag
        pair.next_tag += 1
        pair.request_ids.add(chunk.request_id)
        header = KVLayer(**{**_fields(header), "group_tag": tag})
        self._send(chunk.request_id, send, [encode(header)])
        pair.submit(lambda group: group.send([kv], 1, tag), None)
        return None

    def _open_pair(self, endpoint: str) -> _Pair:
        pair = _Pair(secrets.token_hex(16))
        self._out[endpoint] = pair
        hello = KVGroupHello(pair_id=pair.pair_id, backend=self.backend)
        self._target(endpoint).send(encode(hello), flags=zmq.NOBLOCK)
        return pair

    def _on_sender_message(self, endpoint: str, message) -> bool:
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

    def _on_receiver_extra(self, identity: bytes, message) -> bool:
        if not isinstance(message, KVGroupHello):
            return False
        if message.backend != self.backend:
            reason = f"KV group backend {message.backend} offered, this node uses {self.backend}"
            logger.warning(reason)
            return True
        pair = _Pair(message.pair_id)
        self._in[message.pair_id] = pair
        self._senders[identity] = pair
        pair.start(
            lambda: _make_group(self._store, pair.pair_id, 1, self._host, self.device),
            self._pair_failed,
        )
        ready = KVGroupReady(pair_id=message.pair_id, store_port=self._store.port)
        self._reply(identity, ready)
        return True

    def _dropped_layer(self, identity: bytes, message: KVLayer) -> None:
        pair = self._pair_of(identity)
        if message.group_tag is not None and pair is not None:
            # Refused or unknown, but its tensor is on the pair's wire all the same:
            # take it and drop it, so the pair's later transfers stay in step.
            self._post_receive(pair, message, None)

    def _receive_layer(self, identity: bytes, message: KVLayer, slots, frames) -> None:
        if message.group_tag is None:
            return super()._receive_layer(identity, message, slots, frames)
        pair = self._pair_of(identity)
        if pair is None:
            raise ProtocolError("KV over a group that was never set up with this sender")
        pair.request_ids.add(message.request_id)
        with self._lock:
            self._in_flight[message.request_id] = self._in_flight.get(message.request_id, 0) + 1
        self._post_receive(pair, message, slots)
        return None

    def _post_receive(self, pair: _Pair, message: KVLayer, slots) -> None:
        request_id, layer, tag = message.request_id, message.layer, message.group_tag
        shape = (2, message.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        buffer = torch.empty(shape, dtype=self.pool.k_cache(0).dtype, device=self.device)

        def landed() -> None:
            if slots is None:
                return
            with self._lock:
                if request_id in self._in_flight:  # not cancelled meanwhile
                    self._in_flight[request_id] -= 1
                    self._landed.setdefault(request_id, []).append((layer, slots, buffer))

        pair.submit(lambda group: group.recv([buffer], 0, tag), landed)

    def _pair_of(self, identity: bytes) -> _Pair | None:
        # A sender's layers come over the connection its hello came on.
        return self._senders.get(identity)

    def _layers_landed(self, request_id: str) -> bool:
        # Checked before scattering: a chunk counted as landed is already queued.
        with self._lock:
            landed = self._in_flight.get(request_id, 0) == 0
        self._scatter_landed()
        return landed

    def _scatter_landed(self) -> None:
        with self._lock:
            landed, self._landed = self._landed, {}
        for request_id, chunks in landed.items():
            if request_id not in self._recvs:
                continue  # cancelled or failed meanwhile
            for layer, slots, kv in chunks:
                index = slots.long()
                self.pool.k_cache(layer)[index] = kv[0]
                self.pool.v_cache(layer)[index] = kv[1]

    # ---- both ----

    def busy(self) -> bool:
        pairs = [*self._out.values(), *self._in.values()]
        return super().busy() or any(pair.inflight for pair in pairs) or bool(self._in_flight)

    def poll(self):
        for pair in [*self._out.values(), *self._in.values()]:
            pair.reap()
        self._scatter_landed()
        with self._lock:
            failed, self._failed_pairs = self._failed_pairs, []
        for pair in failed:
            for request_id in pair.request_ids:
                if request_id in self._sends or request_id in self._recvs:
                    self.cancel(request_id)
                    self._events.append(KVFailed(request_id, pair.failure or "KV group failed"))
            self._forget(pair)
        return super().poll()

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        with self._lock:
            self._landed.pop(request_id, None)
            self._in_flight.pop(request_id, None)

    def _expire(self) -> None:
        # A transfer past its deadline may be stuck on its pair: tear the pair down
        # (its other transfers fail with it; the next request builds a new pair).
        before = set(self._sends) | set(self._recvs)
        super()._expire()
        live = set(self._sends) | set(self._recvs)
        expired = before - live
        for pair in [*self._out.values(), *self._in.values()]:
            if pair.request_ids & expired and pair.failure is None:
                pair.failure = "a transfer on this KV group ran past its deadline"
                self._pair_failed(pair)
            pair.request_ids &= live

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

    def close(self) -> None:
        for pair in [*self._out.values(), *self._in.values()]:
            pair.stop()
        super().close()


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}
