"""The KV connector over ZeroMQ: layers as raw frames beside a msgpack header.

Sending: a few DEALERs ("lanes") per receiver, CURVE-keyed as fleet members;
each layer's K/V go out with NOBLOCK as soon as the runner reports them written,
so a receiver that stops reading fails its requests instead of blocking the
loop. Layer L always takes lane L % LANES, so the chunks of one layer stay in
order while CURVE's encryption, which bounds one connection near 1.5 GB/s,
runs on several of ZeroMQ's I/O threads at once. Control messages (the first
token, group hellos) take lane 0. The receiver's KVAck (or the deadline after
the first token) ends a send.

Receiving: one ROUTER bound for the whole node. A layer is written into the
reservation's slots only if it carries the reservation's secret, matches the
layout, and continues where the last chunk of that layer ended; the first
token completes the reservation once every layer holds the whole prompt. As
lanes do not keep order between them, a first token that overtakes layers
still on other lanes waits for them (at most until the reservation's deadline).
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from lightpd.common.engine.connector.base import (
    KVConnector,
    KVDone,
    KVEvent,
    KVFailed,
    KVRecvSpec,
    KVSendSpec,
    LayerChunk,
)
from lightpd.common.engine.connector.staging import DeviceOutbox
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.kv_transfer import gather_layer, scatter_layer
from lightpd.common.engine.request import TokenLogprob
from lightpd.common.wire import sockets
from lightpd.common.wire.auth import FleetKeys, same_secret
from lightpd.common.wire.messages import (
    Error,
    KVAck,
    KVLayer,
    KVLayout,
    PrefillDone,
    ProtocolError,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

# KV messages queued to one receiver before it counts as not reading.
SEND_HWM = 1 << 15
# A receiver's socket is closed after this long with no transfer bound for it, or
# at once when more than MAX_TARGETS are open.
TARGET_IDLE_S = 60.0
MAX_TARGETS = 256
# Connections per receiver that layers are spread over (see the module docstring);
# a node's ZeroMQ context runs this many I/O threads.
LANES = 4
DRAIN_LIMIT = 256  # messages read from one socket per poll, so a flood cannot starve steps
WRONG_SECRET = "the reservation's secret does not match"


@dataclass
class _Send:
    spec: KVSendSpec
    deadline: float = float("inf")  # set once the first token is out
    failure: str | None = None


@dataclass
class _Recv:
    slots: torch.Tensor
    num_prompt_tokens: int
    spec: KVRecvSpec
    deadline: float
    received: list[int] = field(default_factory=list)  # tokens received per layer


@dataclass
class _Target:
    lanes: list[zmq.Socket]
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        for sock in self.lanes:
            sock.close(linger=0)


class ZmqConnector(KVConnector):
    transport = "zmq"
    lanes = LANES  # connections per receiver that layer frames are spread over

    def __init__(
        self,
        layout: KVLayout,
        pool: TokenKVPool,
        keys: FleetKeys,
        ctx: zmq.Context,
        bind_host: str | None = None,
        bind_port: int = 0,
        max_tokens: int = 1 << 20,
    ) -> None:
        self.layout = layout
        self.pool = pool
        self.keys = keys
        self.ctx = ctx
        self._sends: dict[str, _Send] = {}
        self._recvs: dict[str, _Recv] = {}
        self._targets: dict[str, _Target] = {}
        self._events: list[KVEvent] = []
        # On a GPU, layers leave through the outbox (staging.py): copied on the
        # compute stream without waiting, sent in order once their copy is done.
        self._outbox = DeviceOutbox() if pool.device.type == "cuda" else None
        # First tokens that arrived ahead of their KV, by request id.
        self._early_done: dict[str, tuple[bytes, PrefillDone]] = {}
        self._receiver: zmq.Socket | None = None
        self._endpoint: str | None = None
        if bind_host is not None:
            # One frame is at most a whole context's K (or V) of one layer.
            token_bytes = layout.num_kv_heads * layout.head_dim * 4
            self._receiver = sockets.serving_socket(ctx, keys, max_tokens * token_bytes + 4096)
            self._endpoint = sockets.bind(self._receiver, bind_host, bind_port)

    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def pollables(self) -> list:
        socks = [sock for t in self._targets.values() for sock in t.lanes]
        return socks if self._receiver is None else [self._receiver, *socks]

    def busy(self) -> bool:
        # Layers still being copied off the device; first tokens waiting for layers.
        return bool(self._outbox) or bool(self._early_done)

    # ---- sending ----

    def start_send(self, request_id: str, spec: KVSendSpec) -> None:
        if request_id in self._sends:
            raise ValueError(f"request id {request_id!r} is already being sent")
        try:
            self._target(spec.endpoint)
        except zmq.ZMQError as exc:
            raise ValueError(f"cannot reach {spec.endpoint}: {exc}") from exc
        self._sends[request_id] = _Send(spec)

    def save_layer(self, layer: int, chunks: Sequence[LayerChunk]) -> None:
        self._flush_outbox()  # earlier layers whose copies are done go out meanwhile
        for chunk in chunks:
            send = self._sends.get(chunk.request_id)
            if send is None or send.failure is not None:
                continue
            header = KVLayer(
                request_id=chunk.request_id,
                secret=send.spec.secret,
                layout=self.layout,
                layer=layer,
                start=chunk.start,
                num_tokens=chunk.slots.numel(),
            )
            self._send_layer(chunk, send, header)

    def _send_layer(self, chunk: LayerChunk, send: _Send, header: KVLayer) -> None:
        """Ship one layer chunk: here as two raw frames beside the header."""
        if self._outbox is None:
            k, v = gather_layer(self.pool, header.layer, chunk.slots)
            frames = [encode(header), k.numpy(), v.numpy()]
            self._send(chunk.request_id, send, frames, lane=header.layer % self.lanes)
            return
        index = chunk.slots.long()
        k = self.pool.k_cache(header.layer)[index]  # (n, Hk, D) on the device
        v = self.pool.v_cache(header.layer)[index]
        key = (chunk.request_id, send, header.layer % self.lanes)
        self._outbox.stage(key, encode(header), k, v)

    def finish_send(
        self,
        request_id: str,
        num_prompt_tokens: int,
        first_token: int,
        logprobs: list[TokenLogprob] | None,
        num_cached_tokens: int = 0,
    ) -> None:
        send = self._sends.get(request_id)
        if send is None:  # cancelled meanwhile: the engine must still hear it ended
            self._events.append(KVFailed(request_id, "the send was cancelled"))
            return
        wire = logprobs[0].to_wire() if logprobs else None
        done = PrefillDone(
            request_id=request_id,
            secret=send.spec.secret,
            layout=self.layout,
            num_prompt_tokens=num_prompt_tokens,
            first_token=first_token,
            logprobs=wire,
            num_cached_tokens=num_cached_tokens,
        )
        self._send(request_id, send, [encode(done)])
        send.deadline = time.monotonic() + send.spec.timeout_s

    def _send(self, request_id: str, send: _Send, frames: list, lane: int = 0) -> None:
        if self._outbox:  # behind layers still being copied off the device
            self._outbox.add((request_id, send, lane), frames)
            return
        self._send_now(request_id, send, frames, lane)

    def _send_now(self, request_id: str, send: _Send, frames: list, lane: int) -> list:
        """Send without blocking; the trackers of frames sent from our buffers."""
        if send.failure is not None:
            return []
        parts = [frames[0], *(zmq.Frame(f, track=True) for f in frames[1:])]
        try:
            # copy=False: ZeroMQ sends straight from these buffers; the trackers say
            # when it is done with them.
            sock = self._target(send.spec.endpoint, lane)
            sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            send.failure = f"cannot send the KV to {send.spec.endpoint}: {exc}"
            logger.warning("request %s: %s", request_id, send.failure)
            return []
        return [part.tracker for part in parts[1:]]

    def _flush_outbox(self) -> None:
        if self._outbox is None:
            return

        def send_now(key: tuple[str, _Send, int], frames: list) -> list:
            request_id, send, lane = key
            if self._sends.get(request_id) is not send:
                return []  # cancelled meanwhile: nothing to send
            return self._send_now(request_id, send, frames, lane)

        self._outbox.flush(send_now)

    def _target(self, endpoint: str, lane: int = 0) -> zmq.Socket:
        """The socket of ``lane`` to ``endpoint``, connected on first use."""
        target = self._targets.get(endpoint)
        if target is None:
            target = self._targets[endpoint] = _Target([])
        while len(target.lanes) <= lane:
            sock = self.ctx.socket(zmq.DEALER)
            target.lanes.append(sock)  # closed with the target even if connect fails
            self.keys.connect_as_member(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.connect(endpoint)
        target.last_used = time.monotonic()
        return target.lanes[lane]

    # ---- receiving ----

    def start_recv(
        self, request_id: str, slots: torch.Tensor, num_prompt_tokens: int, spec: KVRecvSpec
    ) -> None:
        if self._receiver is None:
            raise ValueError("this connector does not receive")
        self._recvs[request_id] = _Recv(
            slots,
            num_prompt_tokens,
            spec,
            deadline=time.monotonic() + spec.timeout_s,
            received=[0] * self.layout.num_layers,
        )

    # ---- both ----

    def cancel(self, request_id: str) -> None:
        self._sends.pop(request_id, None)
        self._recvs.pop(request_id, None)
        self._early_done.pop(request_id, None)

    def poll(self) -> list[KVEvent]:
        self._flush_outbox()
        if self._receiver is not None:
            self._drain(self._receiver, self._on_receiver_message)
        early, self._early_done = self._early_done, {}
        for identity, done in early.values():
            self._on_done(identity, done)
        for endpoint, target in list(self._targets.items()):
            for sock in target.lanes:
                self._drain(sock, lambda frames, e=endpoint: self._on_ack(e, frames))
        self._expire()
        self._close_idle_targets()
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        if self._receiver is not None:
            self._receiver.close(linger=0)

    def _drain(self, sock: zmq.Socket, handle) -> None:
        for _ in range(DRAIN_LIMIT):
            if not sock.poll(0, zmq.POLLIN):
                return
            handle(sock.recv_multipart(copy=False))

    def _on_ack(self, endpoint: str, frames: list[zmq.Frame]) -> None:
        try:
            message = decode(frames[0].buffer)
        except ProtocolError as exc:
            logger.warning("bad message from the receiver at %s: %s", endpoint, exc)
            return
        if self._on_sender_message(endpoint, message):
            return
        if isinstance(message, KVAck):
            send = self._sends.get(message.request_id)
            if send is None or send.spec.endpoint != endpoint:
                return  # cancelled meanwhile, or not this receiver's to end
            del self._sends[message.request_id]
            if message.error:
                reason = f"the receiver refused the KV: {message.error}"
                self._events.append(KVFailed(message.request_id, reason))
            else:
                self._events.append(KVDone(message.request_id))
        elif isinstance(message, Error):
            logger.warning("the receiver at %s reported: %s", endpoint, message.message)

    def _on_receiver_message(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) < 2:
            return
        try:
            message = decode(frames[1].buffer)
        except ProtocolError as exc:
            self._reply(identity, Error(message=str(exc)))
            return
        if isinstance(message, KVLayer):
            self._on_layer(identity, message, frames[2:])
        elif isinstance(message, PrefillDone):
            self._on_done(identity, message)
        elif not self._on_receiver_extra(identity, message):
            kind = type(message).__name__
            self._reply(identity, Error(message=f"unexpected {kind} on the KV socket"))

    def _on_layer(self, identity: bytes, message: KVLayer, frames: list[zmq.Frame]) -> None:
        recv = self._recvs.get(message.request_id)
        if recv is None:
            return self._dropped_layer(identity, message)  # cancelled, failed or unknown
        if not same_secret(message.secret, recv.spec.secret):
            self._reply(identity, KVAck(request_id=message.request_id, error=WRONG_SECRET))
            return self._dropped_layer(identity, message)
        try:
            self._check_layer(message, recv, frames)
            chunk = recv.slots[message.start : message.start + message.num_tokens]
            self._receive_layer(identity, message, chunk, frames)
        except ProtocolError as exc:
            self._fail_recv(message.request_id, f"KV transfer rejected: {exc}", identity)
            return self._dropped_layer(identity, message)
        recv.received[message.layer] += message.num_tokens

    def _receive_layer(
        self, identity: bytes, message: KVLayer, slots: torch.Tensor, frames: list[zmq.Frame]
    ) -> None:
        """Land one layer chunk in ``slots``: here from the two frames beside it."""
        if message.group_tag is not None:
            raise ProtocolError("this node receives KV over ZeroMQ only")
        scatter_layer(self.pool, message.layer, slots, frames[0].buffer, frames[1].buffer)

    # Extension points of transports that move the tensors some other way.

    def _on_sender_message(self, endpoint: str, message) -> bool:
        return False

    def _on_receiver_extra(self, identity: bytes, message) -> bool:
        return False

    def _dropped_layer(self, identity: bytes, message: KVLayer) -> None:
        """A layer header whose KV is not taken into any slots."""

    def _layers_landed(self, request_id: str) -> bool:
        """Whether every chunk taken in so far is in the pool (not still in flight)."""
        return True

    def _check_layer(self, message: KVLayer, recv: _Recv, frames: list[zmq.Frame]) -> None:
        mismatch = self.layout.describe_mismatch(message.layout)
        if mismatch:
            raise ProtocolError(f"KV layout mismatch ({mismatch})")
        expected_frames = 0 if message.group_tag is not None else 2
        if len(frames) != expected_frames:
            raise ProtocolError(
                f"a KV layer needs {expected_frames} data frames, got {len(frames)}"
            )
        if not 0 <= message.layer < self.layout.num_layers:
            raise ProtocolError(f"layer {message.layer} out of range")
        expected_start = recv.received[message.layer]
        end = message.start + message.num_tokens
        if message.start != expected_start or message.num_tokens < 1:
            raise ProtocolError(
                f"layer {message.layer}: chunk starts at {message.start}, expected {expected_start}"
            )
        if end > recv.num_prompt_tokens:
            raise ProtocolError(
                f"chunk ends at {end}, past the {recv.num_prompt_tokens}-token prompt"
            )

    def _on_done(self, identity: bytes, message: PrefillDone) -> None:
        request_id = message.request_id
        recv = self._recvs.get(request_id)
        if recv is None:
            error = "no reservation (aborted or expired)"
            self._reply(identity, KVAck(request_id=request_id, error=error))
            return
        if not same_secret(message.secret, recv.spec.secret):
            self._reply(identity, KVAck(request_id=request_id, error=WRONG_SECRET))
            return
        mismatch = self.layout.describe_mismatch(message.layout)
        if mismatch:
            return self._fail_recv(request_id, f"KV layout mismatch ({mismatch})", identity)
        if message.num_prompt_tokens != recv.num_prompt_tokens:
            reason = (
                f"the sender's prompt has {message.num_prompt_tokens} tokens, "
                f"the reservation {recv.num_prompt_tokens}"
            )
            return self._fail_recv(request_id, reason, identity)
        complete = all(n == recv.num_prompt_tokens for n in recv.received)
        if not complete or not self._layers_landed(request_id):
            # Layers still on other lanes (or in flight): taken up again by poll; the
            # reservation's deadline bounds the wait.
            self._early_done[request_id] = (identity, message)
            return None
        del self._recvs[request_id]
        self._reply(identity, KVAck(request_id=request_id))
        logprobs = None if message.logprobs is None else [TokenLogprob.from_wire(message.logprobs)]
        self._events.append(
            KVDone(request_id, message.first_token, logprobs, message.num_cached_tokens)
        )
        return None

    def _fail_recv(self, request_id: str, reason: str, identity: bytes | None = None) -> None:
        self._recvs.pop(request_id, None)
        self._early_done.pop(request_id, None)
        self._events.append(KVFailed(request_id, reason))
        if identity is not None:
            self._reply(identity, KVAck(request_id=request_id, error=reason))

    def _reply(self, identity: bytes, message) -> None:
        sockets.send(self._receiver, identity, message)  # never waits on a sender

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id, recv in list(self._recvs.items()):
            if now < recv.deadline:
                continue
            parked = self._early_done.get(request_id)
            if parked is None:
                reason = f"KV did not arrive within {recv.spec.timeout_s:g} s"
            else:  # the first token came, some layers never did
                short = [i for i, n in enumerate(recv.received) if n != recv.num_prompt_tokens]
                reason = f"incomplete KV after {recv.spec.timeout_s:g} s: layers {short[:8]} short"
            identity = parked[0] if parked else None
            self._fail_recv(request_id, f"{reason}; reservation released", identity)
        for request_id, send in list(self._sends.items()):
            if send.failure is not None:
                reason = send.failure
            elif now >= send.deadline:
                reason = (
                    f"decode node at {send.spec.endpoint} did not acknowledge "
                    f"the KV within {send.spec.timeout_s:g} s"
                )
            else:
                continue
            del self._sends[request_id]
            self._events.append(KVFailed(request_id, reason))

    def _close_idle_targets(self) -> None:
        in_use = {s.spec.endpoint for s in self._sends.values()}
        now = time.monotonic()
        idle = sorted((t.last_used, e) for e, t in self._targets.items() if e not in in_use)
        excess = len(self._targets) - MAX_TARGETS
        for rank, (last_used, endpoint) in enumerate(idle):
            if rank < excess or now - last_used > TARGET_IDLE_S:
                self._targets.pop(endpoint).close()
