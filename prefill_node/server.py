"""The prefill node: computes prompts' KV, streams it layer by layer to decode nodes.

One thread polls the control socket (Prefill, Abort, HealthCheck) and one DEALER
socket per decode target (KVAck, Error), then runs one prefill batch. A prompt's
KV stays in the pool until its decode node acknowledges it, or its deadline
passes; either way the slots come back, and the client hears of any failure.
No send blocks the loop: a decode target that stops reading fails the requests
bound for it, and a target unused for a while has its socket closed.
"""

import logging
import time
from dataclasses import dataclass, field, replace

import zmq

from common.engine import EngineConfig, RequestError
from common.engine.kv_manager import KVManager
from common.engine.kv_transfer import kv_layout
from common.engine.model_config import ModelConfig
from common.engine.model_runner import ModelRunner
from common.engine.request import Request
from common.engine.request_builder import RequestBuilder
from common.engine.scheduler import unpack_logprobs
from common.node.runtime import (
    LoopClock,
    Publisher,
    RateMeter,
    bind,
    drain,
    error_event,
    reply,
    serving_socket,
    wire_logprobs,
)
from common.wire.auth import FleetKeys, same_secret, start_authenticator
from common.wire.messages import (
    Abort,
    Accepted,
    Error,
    Health,
    HealthCheck,
    KVAck,
    KVLayer,
    KVTarget,
    Prefill,
    PrefillDone,
    ProtocolError,
    TokenEvent,
    decode,
    encode,
)
from prefill_node.kv_stream import LayerStreamer
from prefill_node.scheduler import PrefillScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillNodeConfig:
    engine: EngineConfig
    node_id: str
    cluster_token: str
    host: str = "127.0.0.1"
    control_port: int = 0


# KV messages queued to one decode node before it counts as not reading.
KV_SEND_HWM = 1 << 15
# A decode target's socket is closed after this long with no request bound for it,
# or at once when more than MAX_TARGETS are open.
TARGET_IDLE_S = 60.0
MAX_TARGETS = 256


@dataclass
class Handoff:
    """Where a request's KV goes and who to tell if that fails."""

    origin: bytes  # the control plane's connection
    secret: str
    target: KVTarget
    ack_timeout_s: float
    deadline: float = float("inf")  # set once the prompt is done
    failure: str | None = None  # set when the KV could not be sent


@dataclass
class Target:
    sock: zmq.Socket
    last_used: float = field(default_factory=time.monotonic)


class PrefillServer:
    def __init__(self, config: PrefillNodeConfig) -> None:
        self.config = config
        model_config = ModelConfig.from_dir(config.engine.model)
        # A prefill node never decodes: no CUDA graphs to capture.
        self.runner = ModelRunner(replace(config.engine, cuda_graph_max_batch=0), model_config)
        self.layout = kv_layout(config.engine.model, model_config, self.runner.dtype)
        self.requests = RequestBuilder(model_config, self.runner.max_model_len, config.engine.seed)
        self.scheduler = PrefillScheduler(
            KVManager(self.runner.pool, self.runner.table), config.engine.max_prefill_tokens
        )
        self.streamer = LayerStreamer(
            self.runner.model, self.runner.pool, self.runner.table, self._send_layer
        )
        self.keys = FleetKeys.from_token(config.cluster_token)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, self.keys)
        self.control = serving_socket(self.ctx, self.keys)
        self.control_endpoint = bind(self.control, config.host, config.control_port)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.targets: dict[str, Target] = {}
        self.handoffs: dict[str, Handoff] = {}
        self.publisher = Publisher(self.control, config.node_id)
        self.tokens_per_s = RateMeter()
        self.clock = LoopClock()
        self.health = self._health(0)  # refreshed by the loop; read by the heartbeat thread
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        try:
            while not self._stopped:
                busy = self.scheduler.has_runnable
                ready = dict(self.poller.poll(0 if busy else 20))
                for sock in ready:
                    if sock is self.control:
                        drain(self.control, self._on_control)
                    else:
                        self._drain_target(sock)
                if self.scheduler.has_runnable:
                    self._run_batch()
                self._expire_handoffs()
                self._close_idle_targets()
                for origin in self.publisher.flush():
                    self._drop_origin(origin)
                self.health = self._health(0)
                self.clock.tick()
        finally:
            self.auth.stop()
            self.ctx.destroy(linger=0)

    # ---- control socket ----

    def _on_control(self, identity: bytes, message, frames) -> None:
        if isinstance(message, Prefill):
            self._on_prefill(identity, message)
        elif isinstance(message, Abort):
            handoff = self.handoffs.get(message.request_id)
            if handoff is not None and same_secret(message.secret, handoff.secret):
                self._release(message.request_id)
        elif isinstance(message, HealthCheck):
            reply(self.control, identity, self._health(message.call_id))
        else:
            reply(
                self.control,
                identity,
                Error(message=f"unexpected {type(message).__name__} on the prefill control socket"),
            )

    def _on_prefill(self, identity: bytes, message: Prefill) -> None:
        def refuse(reason: str) -> None:
            reply(
                self.control,
                identity,
                Error(
                    call_id=message.call_id,
                    request_id=message.request_id,
                    code="invalid",
                    message=reason,
                ),
            )

        mismatch = self.layout.describe_mismatch(message.target.layout)
        if mismatch:
            return refuse(f"KV layout mismatch with the decode target ({mismatch})")
        if message.params.seed is None:
            return refuse("params.seed must be set, so decode continues the same random stream")
        if message.request_id in self.handoffs:
            return refuse(f"request id {message.request_id!r} is already in use")
        try:
            request = self.requests.build(
                message.request_id, message.prompt_token_ids, message.params
            )
            self._target_socket(message.target.endpoint)
        except (RequestError, zmq.ZMQError) as exc:
            return refuse(str(exc))
        self.handoffs[message.request_id] = Handoff(
            identity, message.secret, message.target, message.ack_timeout_s
        )
        self.scheduler.add(request)
        reply(
            self.control, identity, Accepted(call_id=message.call_id, request_id=message.request_id)
        )
        return None

    def _target_socket(self, endpoint: str) -> zmq.Socket:
        target = self.targets.get(endpoint)
        if target is None:
            sock = self.ctx.socket(zmq.DEALER)
            self.keys.connect_as_member(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, KV_SEND_HWM)
            sock.connect(endpoint)
            self.poller.register(sock, zmq.POLLIN)
            target = self.targets[endpoint] = Target(sock)
        target.last_used = time.monotonic()
        return target.sock

    def _send_kv(self, handoff: Handoff, request_id: str, frames: list) -> None:
        """Queue KV frames for the decode node; never blocks. A target that cannot
        take them (not reading, or unreachable for long) fails the request."""
        if handoff.failure is not None:
            return
        try:
            sock = self._target_socket(handoff.target.endpoint)
            # copy=False: ZeroMQ sends straight from these buffers and keeps them alive.
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            handoff.failure = f"cannot send the KV to {handoff.target.endpoint}: {exc}"
            logger.warning("request %s: %s", request_id, handoff.failure)

    def _close_idle_targets(self) -> None:
        in_use = {h.target.endpoint for h in self.handoffs.values()}
        now = time.monotonic()
        idle = sorted(
            (t.last_used, endpoint)
            for endpoint, t in self.targets.items()
            if endpoint not in in_use
        )
        excess = len(self.targets) - MAX_TARGETS
        for rank, (last_used, endpoint) in enumerate(idle):
            if rank < excess or now - last_used > TARGET_IDLE_S:
                target = self.targets.pop(endpoint)
                self.poller.unregister(target.sock)
                target.sock.close(linger=0)

    def _drop_origin(self, origin: bytes) -> None:
        """A control plane that is gone or stopped reading: free its requests' KV."""
        for request_id, handoff in list(self.handoffs.items()):
            if handoff.origin == origin:
                self._release(request_id)

    def _fail(self, request_id: str, reason: str, retry: bool) -> None:
        handoff = self.handoffs.get(request_id)
        if handoff is not None:
            self.publisher.add(handoff.origin, error_event(request_id, reason, retry))
        self._release(request_id)

    # ---- acks from decode nodes ----

    def _drain_target(self, sock: zmq.Socket) -> None:
        while sock.poll(0, zmq.POLLIN):
            frames = sock.recv_multipart()
            try:
                message = decode(frames[0])
            except ProtocolError as exc:
                logger.warning("bad message from a decode node: %s", exc)
                continue
            if isinstance(message, KVAck):
                handoff = self.handoffs.get(message.request_id)
                if handoff is not None and message.error:
                    self.publisher.add(
                        handoff.origin,
                        error_event(
                            message.request_id,
                            f"decode node refused the KV: {message.error}",
                            retry=True,
                        ),
                    )
                self._release(message.request_id)
            elif isinstance(message, Error):
                logger.warning("decode node reported: %s", message.message)

    def _release(self, request_id: str) -> None:
        self.handoffs.pop(request_id, None)
        self.scheduler.release(request_id)

    def _expire_handoffs(self) -> None:
        now = time.monotonic()
        for request_id, handoff in list(self.handoffs.items()):
            if handoff.failure is not None:
                self._fail(request_id, handoff.failure, retry=True)
            elif now >= handoff.deadline:
                self._fail(
                    request_id,
                    f"decode node at {handoff.target.endpoint} did not acknowledge "
                    f"the KV within {handoff.ack_timeout_s:g} s",
                    retry=True,
                )

    # ---- prefill ----

    def _run_batch(self) -> None:
        batch = self.scheduler.schedule()
        if batch is None:
            return
        chunks = list(zip(batch.requests, batch.starts, batch.ends, strict=True))
        try:
            with self.streamer.streaming(chunks):
                sampled = iter(self.runner.run(batch))
        except Exception as exc:
            # A batch that cannot run fails its requests, not the node; the same
            # prompts would fail on any node, so they are not retried.
            logger.exception("a prefill batch failed; failing its requests")
            for request in batch.requests:
                self._fail(
                    request.request_id,
                    f"internal error while computing the prompt: {type(exc).__name__}: {exc}",
                    retry=False,
                )
            return
        for request, end, samples in zip(batch.requests, batch.ends, batch.samples, strict=True):
            self.scheduler.finish_chunk(request, end)
            if samples:
                self._send_done(request, next(sampled))
        self.tokens_per_s.add(sum(batch.ends) - sum(batch.starts))

    def _send_layer(self, request: Request, layer: int, start: int, num_tokens: int, k, v) -> None:
        handoff = self.handoffs[request.request_id]
        header = KVLayer(
            request_id=request.request_id,
            secret=handoff.secret,
            layout=self.layout,
            layer=layer,
            start=start,
            num_tokens=num_tokens,
        )
        self._send_kv(handoff, request.request_id, [encode(header), k.numpy(), v.numpy()])

    def _send_done(self, request: Request, row: list[float]) -> None:
        handoff = self.handoffs[request.request_id]
        [first] = unpack_logprobs(row, request.params.logprobs) or [None]
        logprobs = None if first is None else wire_logprobs(first)
        done = PrefillDone(
            request_id=request.request_id,
            secret=handoff.secret,
            layout=self.layout,
            num_prompt_tokens=request.num_prompt_tokens,
            first_token=int(row[0]),
            logprobs=logprobs,
        )
        self._send_kv(handoff, request.request_id, [encode(done)])
        handoff.deadline = time.monotonic() + handoff.ack_timeout_s
        # A token-less event tells the control plane the prompt is computed and its
        # last KV is in flight (the request's "transferring" state on the dashboard).
        self.publisher.add(
            handoff.origin,
            TokenEvent(request_id=request.request_id, num_prompt_tokens=request.num_prompt_tokens),
        )

    def _health(self, call_id: int) -> Health:
        pool = self.runner.pool
        return Health(
            call_id=call_id,
            node_id=self.config.node_id,
            role="prefill",
            model=self.config.engine.model,
            layout=self.layout,
            device=str(self.runner.device),
            num_slots=pool.num_slots,
            num_free_slots=pool.num_free_slots,
            num_reserved_slots=sum(r.num_slots for r in self.scheduler.held.values()),
            num_running=len(self.scheduler.prefilling),
            num_queued=len(self.scheduler.waiting),
            num_queued_tokens=self.scheduler.num_queued_tokens,
            tokens_per_s=self.tokens_per_s.rate(),
            max_model_len=self.runner.max_model_len,
        )
