"""Slow and greedy clients cannot exhaust the control plane's connections.

uvicorn holds a connection for as long as its client trickles headers, and takes
every connection it is offered until the process runs out of file descriptors; then
nobody is served. ``GuardedH11Protocol`` (uvicorn's HTTP/1.1 protocol, given to it
as ``http=``) bounds both:

- headers must be complete within ``header_timeout_s`` of the connection's start or
  of the previous response (a keep-alive connection waiting for its next request);
  past that the connection is closed;
- at most ``max_connections`` in all and ``max_per_client`` from one address: the
  one over either is answered ``503`` with ``Retry-After`` and closed at once, before
  the descriptor limit is reached.

The body's deadline is the app's (``app.BodyDeadline``): it is an HTTP answer, 408.
Production runs behind a reverse proxy all the same (docs/deployment.md).
"""

import asyncio
import json
import resource
from collections import Counter
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from lightpd.controlplane.errors import error_body

DESCRIPTORS_KEPT = 256  # for Redis, the nodes' sockets, files and logs
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int | None = None  # default: the descriptor limit less DESCRIPTORS_KEPT
    max_per_client: int = 1024

    def total(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(soft - DESCRIPTORS_KEPT, 16)


def _busy_response() -> bytes:
    """A whole HTTP response, written by the protocol itself: no app call is spent."""
    body = json.dumps(
        error_body(503, "too many connections; try again later", code="too_many_connections")
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"retry-after: {RETRY_AFTER_S}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionCounts:
    """Open connections of one server, in all and by client address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = limits.total()
        self.per_client: Counter[str] = Counter()
        self.num_open = 0

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (not counted) over a bound."""
        if self.num_open >= self.total or self.per_client[address] >= self.limits.max_per_client:
            return False
        self.num_open += 1
        self.per_client[address] += 1
        return True

    def release(self, address: str) -> None:
        self.num_open -= 1
        self.per_client[address] -= 1
        if not self.per_client[address]:
            del self.per_client[address]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol under ``counts``' limits (see the module's note);
    ``guarded_protocol`` makes a subclass with a server's own counts."""

    counts: ConnectionCounts
    _counted: str | None = None
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        if not self.counts.admit(address):
            transport.write(_busy_response())
            transport.close()
            return
        self._counted = address
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._counted is not None:
            self.counts.release(self._counted)
            self._counted = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_header_timer()  # a request's headers are in: its body is the app's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()  # the next request's, on this keep-alive connection

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_deadline = self.loop.call_later(
            self.counts.limits.header_timeout_s, self._headers_too_late
        )

    def _stop_header_timer(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """``GuardedH11Protocol`` under ``limits`` (a class, as uvicorn's ``http=`` takes
    it; the counts are shared by every connection of the server)."""
    counts = ConnectionCounts(limits)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"counts": counts})
