"""What both node servers share: sockets, replies to clients, token events, stats.

No send on a serving loop may block: every reply and token message goes out with
NOBLOCK through a ROUTER in mandatory mode, so a peer that is gone or has stopped
reading (its queue reached the high-water mark) makes the send fail at once
instead of hanging the loop; the requests of that peer are then aborted, as are
those of a control plane that has said nothing for its lease time (``Leases``).
"""

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable

import zmq

from lightpd.common.engine.request import RequestOutput
from lightpd.common.wire.messages import (
    Error,
    Message,
    ProtocolError,
    TokenEvent,
    Tokens,
    decode,
)
from lightpd.common.wire.sockets import send

logger = logging.getLogger(__name__)


def default_node_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int) -> None:
        now = time.monotonic()
        self._events.append((now, count))
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        return sum(c for _, c in self._events) / self.window_s


class Publisher:
    """Token events back to the control planes over the connections their requests
    came in on: one message per control plane per flush, never blocking."""

    def __init__(self, sock: zmq.Socket, node_id: str) -> None:
        self.sock = sock
        self.node_id = node_id
        self._pending: dict[bytes, list[TokenEvent]] = {}

    def add(self, origin: bytes, event: TokenEvent) -> None:
        self._pending.setdefault(origin, []).append(event)

    def flush(self) -> list[bytes]:
        """Send what is pending; returns the origins that could not take it (gone,
        or not reading), whose requests the caller should abort."""
        lost = []
        for origin, events in self._pending.items():
            if not send(self.sock, origin, Tokens(node_id=self.node_id, events=events)):
                lost.append(origin)
        self._pending.clear()
        return lost


def token_event(output: RequestOutput) -> TokenEvent:
    logprobs = None
    if output.new_logprobs is not None:
        logprobs = [lp.to_wire() for lp in output.new_logprobs]
    return TokenEvent(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        logprobs=logprobs,
        finish_reason=output.finish_reason.value if output.finish_reason else None,
        error=output.error,
        retry=output.retry,
        num_prompt_tokens=output.num_prompt_tokens,
        num_output_tokens=output.num_output_tokens,
        num_cached_tokens=output.num_cached_tokens,
    )


def error_event(request_id: str, message: str, retry: bool = False) -> TokenEvent:
    return TokenEvent(request_id=request_id, finish_reason="error", error=message, retry=retry)


def receive(sock: zmq.Socket) -> tuple[bytes, Message, list[zmq.Frame]] | None:
    """One message from a ROUTER socket: (sender identity, header, raw frames).
    A bad message is answered with an Error and yields None."""
    frames = sock.recv_multipart(copy=False)
    identity = frames[0].bytes
    if len(frames) < 2:
        return None
    try:
        message = decode(frames[1].buffer)
    except ProtocolError as exc:
        logger.warning("rejected a message: %s", exc)
        send(sock, identity, Error(message=str(exc)))
        return None
    return identity, message, frames[2:]


def drain(sock: zmq.Socket, handler: Callable[[bytes, Message, list[zmq.Frame]], None]) -> bool:
    """Handle the messages waiting on a ROUTER socket; bounded, so a flood of
    messages cannot starve the running batch. True if none is left waiting."""
    for _ in range(256):
        if not sock.poll(0, zmq.POLLIN):
            return True
        received = receive(sock)
        if received is None:
            continue
        identity, message, _ = received
        try:
            handler(*received)
        except Exception as exc:  # one message's fault is that message's, not the node's
            logger.exception("handling a %s failed", type(message).__name__)
            send(
                sock,
                identity,
                Error(
                    call_id=getattr(message, "call_id", None),
                    request_id=getattr(message, "request_id", None),
                    code="invalid",
                    message=f"the node could not handle this {type(message).__name__}: {exc}",
                ),
            )
    return not sock.poll(0, zmq.POLLIN)


class Leases:
    """When each control plane was last heard from, by the identity of its
    connection: any message renews its lease. One silent for ``lease_s`` is taken
    for gone, and only the requests that came over that same connection are its.

    The caller asks ``expired`` once it has read what waits on the socket, so a
    serving loop that was itself stalled (a long step) reads the renewals that
    queued up meanwhile before it judges anyone."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._heard: dict[bytes, float] = {}

    def heard(self, origin: bytes) -> None:
        self._heard[origin] = time.monotonic()

    def expired(self, owners: set[bytes]) -> list[bytes]:
        """The ``owners`` (origins that hold requests here) silent past the lease.
        Forgets every other origin, so peers holding no request cost nothing."""
        now = time.monotonic()
        self._heard = {o: self._heard.get(o, now) for o in owners}
        return [o for o, heard in self._heard.items() if now - heard > self.lease_s]

    def forget(self, origin: bytes) -> None:
        self._heard.pop(origin, None)


class LoopClock:
    """When the serving loop last made progress; read by the heartbeat thread, so
    a loop that is stuck shows as stuck however healthy the process looks."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def tick(self) -> None:
        self._last = time.monotonic()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self._last
