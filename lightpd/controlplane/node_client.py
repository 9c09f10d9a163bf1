"""Asyncio client of the nodes: reserve, prefill, abort, health, and token streams.

One DEALER per node, keyed with the fleet's CURVE keys, carries the calls and
brings back both their replies (matched by ``call_id``) and the Tokens of the
requests sent there: a request's events are accepted only from the nodes it was
sent to. Each request gets a secret that its KV, first token and abort carry.
Each second a Lease goes to every node over the same DEALER: a node aborts the
requests of a control plane it has not heard from for its lease time. The
client subscribes to each node's prefix-cache events (CacheSync) and keeps
them in ``prefix_index`` for routing.
Used by the control plane and by tests.
"""

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from lightpd.common.wire.auth import FleetKeys, new_secret
from lightpd.common.wire.messages import (
    LEASE_RENEW_S,
    Abort,
    Accepted,
    CacheEvents,
    CacheSync,
    Error,
    Health,
    HealthCheck,
    KVTarget,
    Lease,
    Message,
    NodeStatus,
    Prefill,
    ProtocolError,
    Reserve,
    Reserved,
    TokenEvent,
    Tokens,
    decode,
    encode,
)
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.fleet_schemas import NodePublic
from lightpd.controlplane.prefix_index import PrefixIndex


class NodeError(RuntimeError):
    """A call to a node did not succeed."""


class NodeRefused(NodeError):
    """The node answered with an Error; the message is the node's."""


class NodeBusy(NodeRefused):
    """The node cannot take the request now (queue full, or no room freed in time)."""


class NodeTimeout(NodeError):
    """The node did not answer in time (it may be down)."""


logger = logging.getLogger(__name__)
# How long past the node's own queue timeout a Reserve call waits for its answer.
RESERVE_GRACE_S = 10.0
SEND_TIMEOUT_S = 5.0
RESUBSCRIBE_S = 2.0  # at most this often, a node's cache events are asked for again


@dataclass
class _Stream:
    secret: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sources: set[str] = field(default_factory=set)  # endpoints it was sent to


def _sent_without_blocking(sent: asyncio.Future) -> None:
    """Collect the outcome of a send that does not wait (a Lease, a CacheSync); a
    full queue (a node down or not reading) is expected and says nothing new."""
    if sent.cancelled():
        return
    exc = sent.exception()
    if exc is not None and not isinstance(exc, zmq.Again):
        logger.warning("could not send to a node: %s", exc)


class NodeClient:
    def __init__(self, cluster_token: str) -> None:
        self.keys = FleetKeys.from_token(cluster_token)
        self.ctx = zmq.asyncio.Context()
        # Kept across reconnects, so nodes can still route this client's tokens.
        self.identity = b"cp-" + os.urandom(12).hex().encode()
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[str, _Stream] = {}
        self._call_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._renewing: asyncio.Task | None = None
        self._lease_sends: dict[str, asyncio.Future] = {}  # the last Lease sent per node
        self.prefix_index = PrefixIndex()
        self._subscribed_at: dict[str, float] = {}  # when CacheSync last went to each node

    async def __aenter__(self) -> "NodeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)

    # ---- calls ----

    async def health(self, endpoint: str, timeout: float = 5.0) -> NodeStatus:
        reply: Health = await self._call(endpoint, HealthCheck(call_id=self._next_call()), timeout)
        return reply.status

    async def reserve(
        self,
        endpoint: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        queue_timeout_s: float = 180.0,
        kv_timeout_s: float = 30.0,
        prefill_here: bool = False,
        output_token_ids: tuple[int, ...] = (),
    ) -> Reserved:
        """Hold slots on a decode node; returns once they are granted. The node
        queues the request for up to ``queue_timeout_s``, then refuses it "busy".
        With ``prefill_here`` the node computes the prompt itself (no Prefill), and
        ``output_token_ids`` after it: what the request generated elsewhere."""
        stream = self._stream(request_id)
        stream.sources.add(endpoint)
        message = Reserve(
            call_id=self._next_call(),
            request_id=request_id,
            secret=stream.secret,
            prompt_token_ids=prompt,
            params=params,
            queue_timeout_s=queue_timeout_s,
            kv_timeout_s=kv_timeout_s,
            prefill_here=prefill_here,
            output_token_ids=output_token_ids,
        )
        return await self._call(endpoint, message, queue_timeout_s + RESERVE_GRACE_S)

    async def prefill(
        self,
        endpoint: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        target: KVTarget,
        ack_timeout_s: float = 30.0,
        timeout: float = 10.0,
    ) -> Accepted:
        stream = self._stream(request_id)
        stream.sources.add(endpoint)
        message = Prefill(
            call_id=self._next_call(),
            request_id=request_id,
            secret=stream.secret,
            prompt_token_ids=prompt,
            params=params,
            target=target,
            ack_timeout_s=ack_timeout_s,
        )
        return await self._call(endpoint, message, timeout)

    async def abort(self, endpoint: str, request_id: str) -> None:
        """Ask a node to stop a request this client sent it (never blocks for long)."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        message = Abort(request_id=request_id, secret=stream.secret)
        try:
            await asyncio.wait_for(self._dealer(endpoint).send(encode(message)), SEND_TIMEOUT_S)
        except TimeoutError:
            logger.warning("could not send an abort of %s to %s", request_id, endpoint)

    def _next_call(self) -> int:
        return next(self._call_ids)

    async def _call(self, endpoint: str, message: Message, timeout: float):
        future = asyncio.get_running_loop().create_future()
        self._calls[message.call_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._dealer(endpoint).send(encode(message))
                reply = await future
        except TimeoutError as exc:
            raise NodeTimeout(f"no answer from {endpoint} within {timeout:g} s") from exc
        finally:
            self._calls.pop(message.call_id, None)
        if isinstance(reply, Error):
            if reply.code == "busy":
                raise NodeBusy(reply.message)
            raise NodeRefused(reply.message)
        return reply

    def _dealer(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            self.keys.connect_as_member(sock)
            sock.setsockopt(zmq.ROUTING_ID, self.identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._dealers[endpoint] = sock
            self._tasks.append(asyncio.create_task(self._read(endpoint, sock)))
            if self._renewing is None:
                self._renewing = asyncio.create_task(self._renew_leases())
                self._tasks.append(self._renewing)
        return sock

    # ---- prefix cache events ----

    def follow_cache(self, endpoint: str, node_id: str) -> None:
        """Make sure the cache events of node ``node_id`` reach ``prefix_index``
        (subscribing, without waiting, if they do not yet)."""
        if self.prefix_index.synced(endpoint, node_id):
            return
        last = self._subscribed_at.get(endpoint)
        if last is None or time.monotonic() - last >= RESUBSCRIBE_S:
            self._subscribe(endpoint)

    def follow_fleet(self, nodes: list[NodePublic]) -> None:
        """The registry as just read: follow the cache events of every node in it
        that is not dead, and forget what the index holds of the nodes that left
        it (removed), so their entries do not stay forever."""
        listed = set()
        for node in nodes:
            listed.add(node.control_endpoint)
            if node.status != "dead":
                self.follow_cache(node.control_endpoint, node.node_id)
        for endpoint in (self._subscribed_at.keys() | self.prefix_index.endpoints()) - listed:
            self.prefix_index.forget(endpoint)
            self._subscribed_at.pop(endpoint, None)

    def _subscribe(self, endpoint: str) -> None:
        self._subscribed_at[endpoint] = time.monotonic()
        sent = self._dealer(endpoint).send(encode(CacheSync()), flags=zmq.NOBLOCK)
        sent.add_done_callback(_sent_without_blocking)

    # ---- leases ----

    async def _renew_leases(self) -> None:
        """Every LEASE_RENEW_S, a Lease to every node this client is connected to:
        a node frees the requests of a control plane it has not heard from for its
        lease time (5 s by default), so only a vanished one loses them.

        The Lease waits behind no call: it is sent without blocking, and a node
        whose last Lease is still queued (it is not reading) gets no other; what
        is queued renews the lease once read. A late tick is logged: it means
        the event loop was blocked, the one thing that could starve renewals."""
        lease = encode(Lease())
        loop = asyncio.get_running_loop()
        due = loop.time() + LEASE_RENEW_S
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            late = loop.time() - due
            if late > LEASE_RENEW_S:
                logger.warning("lease renewals ran %.1f s late: the event loop was blocked", late)
            for endpoint, sock in list(self._dealers.items()):
                previous = self._lease_sends.get(endpoint)
                if previous is None or previous.done():
                    sent = sock.send(lease, flags=zmq.NOBLOCK)
                    sent.add_done_callback(_sent_without_blocking)
                    self._lease_sends[endpoint] = sent
            due = loop.time() + LEASE_RENEW_S

    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                message = decode(frames[0])
            except ProtocolError as exc:
                logger.warning("bad message from %s: %s", endpoint, exc)
                continue
            if isinstance(message, Tokens):
                self._deliver(endpoint, message)
                continue
            if isinstance(message, CacheEvents):
                if not self.prefix_index.apply(endpoint, message):
                    self._subscribe(endpoint)
                continue
            future = self._calls.get(getattr(message, "call_id", None))
            if future is not None and not future.done():
                future.set_result(message)

    # ---- token streams ----

    def _deliver(self, endpoint: str, message: Tokens) -> None:
        for event in message.events:
            stream = self._streams.get(event.request_id)
            # Only the nodes a request was sent to may speak for it.
            if stream is not None and endpoint in stream.sources:
                stream.queue.put_nowait(event)

    def _stream(self, request_id: str) -> _Stream:
        stream = self._streams.get(request_id)
        if stream is None:
            stream = self._streams[request_id] = _Stream(new_secret())
        return stream

    def open_stream(self, request_id: str) -> None:
        """Start collecting a request's events; open it before the request is sent."""
        self._stream(request_id)

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def next_event(self, request_id: str, timeout: float) -> TokenEvent | None:
        """The request's next event, or None if none came within ``timeout``."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that lands as the event arrives, and the request runs on.
        try:
            async with asyncio.timeout(timeout):
                return await self._streams[request_id].queue.get()
        except TimeoutError:
            return None
