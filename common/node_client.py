"""Asyncio client of the nodes: reserve, prefill, abort, health, and token streams.

One PULL socket (``reply_to``) receives the Tokens of every request this client
started; calls go over one DEALER per node and their replies are matched by
``call_id``. Used by the control plane and by tests.
"""

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from common.protocol import (
    Abort,
    Accepted,
    Error,
    Health,
    HealthCheck,
    KVTarget,
    Message,
    Prefill,
    ProtocolError,
    Reserve,
    Reserved,
    TokenEvent,
    TokenLogprobs,
    Tokens,
    decode,
    encode,
)
from common.sampling_params import SamplingParams


class NodeError(RuntimeError):
    """A call to a node did not succeed."""


class NodeRefused(NodeError):
    """The node answered with an Error; the message is the node's."""


class NodeTimeout(NodeError):
    """The node did not answer in time (it may be down)."""


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class NodeClient:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.ctx = zmq.asyncio.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        port = self.inbox.bind_to_random_port(f"tcp://{host}")
        self.reply_to = f"tcp://{host}:{port}"
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._call_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "NodeClient":
        self._tasks.append(asyncio.create_task(self._read_inbox()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)

    # ---- calls ----

    async def health(self, endpoint: str, timeout: float = 5.0) -> Health:
        return await self._call(endpoint, HealthCheck(call_id=self._next_call()), timeout)

    async def reserve(
        self,
        endpoint: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        kv_timeout_s: float = 30.0,
        timeout: float = 60.0,
    ) -> Reserved:
        """Hold slots on a decode node; returns once they are granted."""
        message = Reserve(
            call_id=self._next_call(),
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            reply_to=self.reply_to,
            kv_timeout_s=kv_timeout_s,
        )
        return await self._call(endpoint, message, timeout)

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
        message = Prefill(
            call_id=self._next_call(),
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            reply_to=self.reply_to,
            target=target,
            ack_timeout_s=ack_timeout_s,
        )
        return await self._call(endpoint, message, timeout)

    async def abort(self, endpoint: str, request_id: str) -> None:
        await self._dealer(endpoint).send(encode(Abort(request_id=request_id)))

    def _next_call(self) -> int:
        return next(self._call_ids)

    async def _call(self, endpoint: str, message: Message, timeout: float):
        future = asyncio.get_running_loop().create_future()
        self._calls[message.call_id] = future
        try:
            await self._dealer(endpoint).send(encode(message))
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise NodeTimeout(f"no answer from {endpoint} within {timeout:g} s") from exc
        finally:
            self._calls.pop(message.call_id, None)
        if isinstance(reply, Error):
            raise NodeRefused(reply.message)
        return reply

    def _dealer(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._dealers[endpoint] = sock
            self._tasks.append(asyncio.create_task(self._read_replies(sock)))
        return sock

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                reply = decode(frames[0])
            except ProtocolError:
                continue
            future = self._calls.get(getattr(reply, "call_id", None))
            if future is not None and not future.done():
                future.set_result(reply)

    # ---- token streams ----

    async def _read_inbox(self) -> None:
        while True:
            frame = await self.inbox.recv()
            try:
                message = decode(frame)
            except ProtocolError:
                continue
            if isinstance(message, Tokens):
                for event in message.events:
                    queue = self._streams.get(event.request_id)
                    if queue is not None:
                        queue.put_nowait(event)

    def open_stream(self, request_id: str) -> None:
        """Start collecting a request's events; open it before the request is sent."""
        self._streams[request_id] = asyncio.Queue()

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def next_event(self, request_id: str, timeout: float) -> TokenEvent | None:
        """The request's next event, or None if none came within ``timeout``."""
        try:
            return await asyncio.wait_for(self._streams[request_id].get(), timeout)
        except TimeoutError:
            return None

    async def events(self, request_id: str, timeout: float = 60.0) -> AsyncIterator[TokenEvent]:
        """A request's events up to and including the one that finishes it."""
        queue = self._streams[request_id]
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError as exc:
                    raise NodeTimeout(f"request {request_id}: nothing for {timeout:g} s") from exc
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._streams.pop(request_id, None)

    async def generate(
        self,
        prefill_endpoint: str,
        decode_endpoint: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        timeout: float = 60.0,
    ) -> Generation:
        """Reserve on the decode node, prefill, and collect the whole output."""
        if params.seed is None:
            params = msgspec.structs.replace(params, seed=random.getrandbits(63))
        self.open_stream(request_id)
        try:
            reserved = await self.reserve(decode_endpoint, request_id, prompt, params)
            target = KVTarget(reserved.kv_endpoint, reserved.layout)
            await self.prefill(prefill_endpoint, request_id, prompt, params, target)
        except NodeError:
            self._streams.pop(request_id, None)
            await self.abort(decode_endpoint, request_id)
            raise
        result = Generation()
        async for event in self.events(request_id, timeout):
            result.token_ids += event.token_ids
            result.logprobs += event.logprobs or []
            result.finish_reason = event.finish_reason
            result.error = event.error
        return result
