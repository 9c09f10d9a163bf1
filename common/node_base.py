"""What both node servers share: sockets, replies to clients, token events, stats."""

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable

import zmq

from common.engine.request import RequestOutput, TokenLogprob
from common.protocol import (
    Error,
    Message,
    ProtocolError,
    TokenEvent,
    TokenLogprobs,
    Tokens,
    decode,
    encode,
)

logger = logging.getLogger(__name__)


def default_node_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def bind(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind ``sock`` (a free port when ``port`` is 0) and return its endpoint."""
    if port == 0:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


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
    """Token events to the control planes, one message per destination per flush."""

    def __init__(self, ctx: zmq.Context, node_id: str) -> None:
        self.ctx = ctx
        self.node_id = node_id
        self._sockets: dict[str, zmq.Socket] = {}
        self._pending: dict[str, list[TokenEvent]] = {}

    def add(self, reply_to: str, event: TokenEvent) -> None:
        self._pending.setdefault(reply_to, []).append(event)

    def flush(self) -> None:
        for reply_to, events in self._pending.items():
            sock = self._sockets.get(reply_to)
            if sock is None:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(reply_to)
                self._sockets[reply_to] = sock
            sock.send(encode(Tokens(node_id=self.node_id, events=events)))
        self._pending.clear()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()


def wire_logprobs(logprob: TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(logprob.token_id, logprob.logprob, [tuple(t) for t in logprob.top])


def token_event(output: RequestOutput) -> TokenEvent:
    logprobs = None
    if output.new_logprobs is not None:
        logprobs = [wire_logprobs(lp) for lp in output.new_logprobs]
    return TokenEvent(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        logprobs=logprobs,
        finish_reason=output.finish_reason.value if output.finish_reason else None,
        error=output.error,
        num_prompt_tokens=output.num_prompt_tokens,
        num_output_tokens=output.num_output_tokens,
    )


def error_event(request_id: str, message: str) -> TokenEvent:
    return TokenEvent(request_id=request_id, finish_reason="error", error=message)


def engine_logprobs(logprobs: TokenLogprobs | None) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    top = tuple((int(t), float(v)) for t, v in logprobs.top)
    return [TokenLogprob(logprobs.token_id, logprobs.logprob, top)]


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
        reply(sock, identity, Error(message=str(exc)))
        return None
    return identity, message, frames[2:]


def drain(sock: zmq.Socket, handler: Callable[[bytes, Message, list[zmq.Frame]], None]) -> None:
    """Handle the messages waiting on a ROUTER socket; bounded, so a flood of
    messages cannot starve the running batch."""
    for _ in range(256):
        if not sock.poll(0, zmq.POLLIN):
            return
        received = receive(sock)
        if received is not None:
            handler(*received)


def reply(sock: zmq.Socket, identity: bytes, message: Message) -> None:
    sock.send_multipart([identity, encode(message)])
