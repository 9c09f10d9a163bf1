"""The KV channel: what every transport shares, over ZeroMQ.

A connector is this channel and one transport (transport.py) that moves the K/V
tensors; the channel carries everything else: headers, secrets, first tokens,
acknowledgements and deadlines.

Sending: a few DEALERs ("lanes") per receiver, CURVE-keyed as fleet members;
each layer's header (and K/V sent as frames) goes out with NOBLOCK as soon as
the runner reports the layer written, so a receiver that stops reading fails
its requests instead of blocking the loop. A lane keeps its messages in order;
control messages (the first token, a transport's own) take lane 0. On a GPU,
messages leave through an outbox (staging.py), in order, once the K/V they carry
are copied off the device. The receiver's KVAck (or the deadline after the first
token) ends a send.

Receiving: one ROUTER bound for the whole node. A layer chunk is handed to the
transport that carries it (frames, or the tag of the connector's transport) only
if it carries the reservation's secret, matches the layout, and continues where
the last chunk of that layer ended; the first token completes the reservation
once every layer holds the whole prompt and the transport has landed it. As
lanes do not keep order between them, a first token that overtakes layers still
on other lanes waits for them (at most until the reservation's deadline).
"""

import logging
import time
from collections.abc import Callable, Sequence
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
from lightpd.common.engine.connector.transport import Channel, Transport
from lightpd.common.engine.connector.zeromq import ZmqTransport
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.request import TokenLogprob
from lightpd.common.wire import sockets
from lightpd.common.wire.auth import FleetKeys, same_secret
from lightpd.common.wire.messages import (
    Error,
    KVAck,
    KVLayer,
    KVLayout,
    Message,
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
# Connections per receiver that layers are spread over (zeromq.py says why); a
# node's ZeroMQ context runs this many I/O threads.
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


class ChannelConnector(KVConnector):
    """A KV connector: this channel, with ``transport`` moving the tensors."""

    lanes = LANES

    def __init__(
        self,
        layout: KVLayout,
        pool: TokenKVPool,
        keys: FleetKeys,
        ctx: zmq.Context,
        transport: Callable[[Channel], Transport] = ZmqTransport,
        bind_host: str | None = None,
        bind_port: int = 0,
        max_tokens: int = 1 << 20,
    ) -> None:
        self.layout = layout
        self.pool = pool
        self.keys = keys
        self.ctx = ctx
        self.host = bind_host
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
        # Every receiver takes frames, so a sender falls back to them for a receiver
        # of another transport.
        self.frames = ZmqTransport(self)
        self.tensor_transport = transport(self)

    @property
    def transport(self) -> str:
        return self.tensor_transport.name

    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def pollables(self) -> list:
        socks = [sock for t in self._targets.values() for sock in t.lanes]
        return socks if self._receiver is None else [self._receiver, *socks]

    def busy(self) -> bool:
        # Layers still being copied off the device; first tokens waiting for layers.
        return bool(self._outbox) or bool(self._early_done) or self.tensor_transport.busy()

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
            # The receiver's own transport, or frames, which every receiver takes.
            same = send.spec.transport == self.tensor_transport.name
            transport = self.tensor_transport if same else self.frames
            transport.send_layer(send.spec.endpoint, header, chunk.slots)

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

    # What transports send through (the Channel protocol).

    def send(
        self, header: KVLayer, kv: tuple[torch.Tensor, torch.Tensor] | None = None, lane: int = 0
    ) -> None:
        request_id = header.request_id
        send = self._sends.get(request_id)
        if send is None:
            return  # cancelled meanwhile
        if kv is None:
            self._send(request_id, send, [encode(header)], lane)
        elif self._outbox is not None:
            self._outbox.stage((request_id, send, lane), encode(header), *kv)
        else:  # (n, Hk, D) each, as raw bytes ZeroMQ sends without another copy
            raw = [t.reshape(-1).view(torch.uint8).numpy() for t in kv]
            self._send(request_id, send, [encode(header), *raw], lane)

    def send_to(self, endpoint: str, message: Message) -> None:
        try:
            self._target(endpoint).send(encode(message), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # its transfers fail by their sends or deadlines
            logger.warning("cannot send %s to %s: %s", type(message).__name__, endpoint, exc)

    def reply(self, peer: bytes, message: Message) -> None:
        sockets.send(self._receiver, peer, message)  # never waits on a sender

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
        self.tensor_transport.end(request_id)

    def poll(self) -> list[KVEvent]:
        for failure in self.tensor_transport.poll():
            if failure.request_id in self._sends or failure.request_id in self._recvs:
                self.cancel(failure.request_id)
                self._events.append(failure)
        self._flush_outbox()
        if self._receiver is not None:
            self._drain(self._receiver, self._from_sender)
        early, self._early_done = self._early_done, {}
        for peer, done in early.values():
            self._on_done(peer, done)
        for endpoint, target in list(self._targets.items()):
            for sock in target.lanes:
                self._drain(sock, lambda frames, e=endpoint: self._from_receiver(e, frames))
        self._expire()
        self._close_idle_targets()
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self.tensor_transport.close()
        for target in self._targets.values():
            target.close()
        if self._receiver is not None:
            self._receiver.close(linger=0)

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(DRAIN_LIMIT):
            if not sock.poll(0, zmq.POLLIN):
                return
            handle(sock.recv_multipart(copy=False))

    def _from_receiver(self, endpoint: str, frames: list[zmq.Frame]) -> None:
        try:
            message = decode(frames[0].buffer)
        except ProtocolError as exc:
            logger.warning("bad message from the receiver at %s: %s", endpoint, exc)
            return
        if self.tensor_transport.on_receiver_message(endpoint, message):
            return
        if isinstance(message, KVAck):
            send = self._sends.get(message.request_id)
            if send is None or send.spec.endpoint != endpoint:
                return  # cancelled meanwhile, or not this receiver's to end
            del self._sends[message.request_id]
            self.tensor_transport.end(message.request_id)
            if message.error:
                reason = f"the receiver refused the KV: {message.error}"
                self._events.append(KVFailed(message.request_id, reason))
            else:
                self._events.append(KVDone(message.request_id))
        elif isinstance(message, Error):
            logger.warning("the receiver at %s reported: %s", endpoint, message.message)

    def _from_sender(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        if len(frames) < 2:
            return
        try:
            message = decode(frames[1].buffer)
        except ProtocolError as exc:
            self.reply(peer, Error(message=str(exc)))
            return
        if isinstance(message, KVLayer):
            self._on_layer(peer, message, frames[2:])
        elif isinstance(message, PrefillDone):
            self._on_done(peer, message)
        elif not self.tensor_transport.on_sender_message(peer, message):
            kind = type(message).__name__
            self.reply(peer, Error(message=f"unexpected {kind} on the KV socket"))

    def _on_layer(self, peer: bytes, header: KVLayer, frames: list[zmq.Frame]) -> None:
        # A tag says the tensors come over this connector's transport, else in frames.
        transport = self.frames if header.group_tag is None else self.tensor_transport
        recv = self._recvs.get(header.request_id)
        if recv is None:
            return transport.drop_layer(peer, header)  # cancelled, failed or unknown
        if not same_secret(header.secret, recv.spec.secret):
            self.reply(peer, KVAck(request_id=header.request_id, error=WRONG_SECRET))
            return transport.drop_layer(peer, header)
        try:
            self._check_layer(header, recv)
            chunk = recv.slots[header.start : header.start + header.num_tokens]
            transport.receive_layer(peer, header, frames, chunk)
        except ProtocolError as exc:
            self._fail_recv(header.request_id, f"KV transfer rejected: {exc}", peer)
            return transport.drop_layer(peer, header)
        recv.received[header.layer] += header.num_tokens

    def _check_layer(self, header: KVLayer, recv: _Recv) -> None:
        mismatch = self.layout.describe_mismatch(header.layout)
        if mismatch:
            raise ProtocolError(f"KV layout mismatch ({mismatch})")
        if not 0 <= header.layer < self.layout.num_layers:
            raise ProtocolError(f"layer {header.layer} out of range")
        expected_start = recv.received[header.layer]
        end = header.start + header.num_tokens
        if header.start != expected_start or header.num_tokens < 1:
            raise ProtocolError(
                f"layer {header.layer}: chunk starts at {header.start}, expected {expected_start}"
            )
        if end > recv.num_prompt_tokens:
            raise ProtocolError(
                f"chunk ends at {end}, past the {recv.num_prompt_tokens}-token prompt"
            )

    def _on_done(self, peer: bytes, message: PrefillDone) -> None:
        request_id = message.request_id
        recv = self._recvs.get(request_id)
        if recv is None:
            error = "no reservation (aborted or expired)"
            self.reply(peer, KVAck(request_id=request_id, error=error))
            return
        if not same_secret(message.secret, recv.spec.secret):
            self.reply(peer, KVAck(request_id=request_id, error=WRONG_SECRET))
            return
        mismatch = self.layout.describe_mismatch(message.layout)
        if mismatch:
            return self._fail_recv(request_id, f"KV layout mismatch ({mismatch})", peer)
        if message.num_prompt_tokens != recv.num_prompt_tokens:
            reason = (
                f"the sender's prompt has {message.num_prompt_tokens} tokens, "
                f"the reservation {recv.num_prompt_tokens}"
            )
            return self._fail_recv(request_id, reason, peer)
        complete = all(n == recv.num_prompt_tokens for n in recv.received)
        if not complete or not self.tensor_transport.landed(request_id):
            # Layers still on other lanes (or in flight): taken up again by poll; the
            # reservation's deadline bounds the wait.
            self._early_done[request_id] = (peer, message)
            return None
        del self._recvs[request_id]
        self.tensor_transport.end(request_id)
        self.reply(peer, KVAck(request_id=request_id))
        logprobs = None if message.logprobs is None else [TokenLogprob.from_wire(message.logprobs)]
        self._events.append(
            KVDone(request_id, message.first_token, logprobs, message.num_cached_tokens)
        )
        return None

    def _fail_recv(
        self, request_id: str, reason: str, peer: bytes | None = None, stuck: bool = False
    ) -> None:
        self._recvs.pop(request_id, None)
        self._early_done.pop(request_id, None)
        self.tensor_transport.end(request_id, stuck)
        self._events.append(KVFailed(request_id, reason))
        if peer is not None:
            self.reply(peer, KVAck(request_id=request_id, error=reason))

    def _expire(self) -> None:
        # A transfer that ends here may be stuck in its transport (``stuck``).
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
            peer = parked[0] if parked else None
            self._fail_recv(request_id, f"{reason}; reservation released", peer, stuck=True)
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
            self.tensor_transport.end(request_id, stuck=True)
            self._events.append(KVFailed(request_id, reason))

    def _close_idle_targets(self) -> None:
        in_use = {s.spec.endpoint for s in self._sends.values()}
        now = time.monotonic()
        idle = sorted((t.last_used, e) for e, t in self._targets.items() if e not in in_use)
        excess = len(self._targets) - MAX_TARGETS
        for rank, (last_used, endpoint) in enumerate(idle):
            if rank < excess or now - last_used > TARGET_IDLE_S:
                self._targets.pop(endpoint).close()
