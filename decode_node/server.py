"""The decode node: reserves slots, receives prompt KV, decodes in a continuous batch.

One thread runs everything: it polls the control socket (Reserve, Abort,
HealthCheck) and the KV socket (KVLayer, PrefillDone from prefill nodes), then
runs one engine step and publishes that step's tokens, one message per
control plane, back over the connection each request came in on.

A reservation waits in the engine's queue, in order, for up to its queue
timeout (then its Reserve is answered "busy"); once admitted, its KV must be
complete within its KV timeout, or it is released and its client told why.
Only the holder of a reservation's secret can send its KV or abort it. A
control plane that stops reading loses its requests here, so their KV is freed.
"""

import logging
import time
from dataclasses import dataclass, field

import zmq

from common.engine import EngineConfig, LLMEngine, RequestError
from common.engine.kv_transfer import kv_layout, scatter_layer
from common.node.runtime import (
    LoopClock,
    Publisher,
    RateMeter,
    bind,
    drain,
    engine_logprobs,
    error_event,
    reply,
    serving_socket,
    token_event,
)
from common.wire.auth import FleetKeys, same_secret, start_authenticator
from common.wire.messages import (
    Abort,
    Error,
    Health,
    HealthCheck,
    KVAck,
    KVLayer,
    PrefillDone,
    ProtocolError,
    Reserve,
    Reserved,
)

logger = logging.getLogger(__name__)
_WRONG_SECRET = "the reservation's secret does not match"


@dataclass(frozen=True)
class DecodeNodeConfig:
    engine: EngineConfig
    node_id: str
    cluster_token: str
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: any free port
    kv_port: int = 0
    max_queued: int = 4096  # reservations waiting for slots; more are refused "busy"


@dataclass
class Reservation:
    origin: bytes  # the control plane's connection: Reserved and tokens go there
    secret: str
    call_id: int
    deadline: float  # of the wait in the queue, then of the KV's arrival
    queue_timeout_s: float
    kv_timeout_s: float
    num_prompt_tokens: int
    admitted: bool = False
    received: list[int] = field(default_factory=list)  # tokens received per layer


class DecodeServer:
    def __init__(self, config: DecodeNodeConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config.engine)
        self.layout = kv_layout(
            config.engine.model, self.engine.model_config, self.engine.runner.dtype
        )
        keys = FleetKeys.from_token(config.cluster_token)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, keys)
        self.control = serving_socket(self.ctx, keys)
        # One KV frame is at most a whole context's K (or V) of one layer.
        token_bytes = self.layout.num_kv_heads * self.layout.head_dim * 4
        self.kv = serving_socket(self.ctx, keys, self.engine.max_model_len * token_bytes + 4096)
        self.control_endpoint = bind(self.control, config.host, config.control_port)
        self.kv_endpoint = bind(self.kv, config.host, config.kv_port)
        self.publisher = Publisher(self.control, config.node_id)
        self.origins: dict[str, bytes] = {}  # request id -> its control plane's connection
        self.secrets: dict[str, str] = {}
        self.reservations: dict[str, Reservation] = {}
        self.tokens_per_s = RateMeter()
        self.clock = LoopClock()
        self.health = self._health(0)  # refreshed by the loop; read by the heartbeat thread
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.kv, zmq.POLLIN)
        try:
            while not self._stopped:
                busy = self.engine.scheduler.has_runnable
                ready = dict(poller.poll(0 if busy else 20))
                if self.kv in ready:
                    drain(self.kv, self._on_kv)
                if self.control in ready:
                    drain(self.control, self._on_control)
                self._answer_admitted(self.engine.admit_reservations())
                self._expire_reservations()
                if self.engine.scheduler.has_runnable:
                    self._run_step()
                for origin in self.publisher.flush():
                    self._drop_origin(origin)
                self.health = self._health(0)
                self.clock.tick()
        finally:
            self.auth.stop()
            self.ctx.destroy(linger=0)

    # ---- control socket ----

    def _on_control(self, identity: bytes, message, frames) -> None:
        if isinstance(message, Reserve):
            self._on_reserve(identity, message)
        elif isinstance(message, Abort):
            self._on_abort(message)
        elif isinstance(message, HealthCheck):
            reply(self.control, identity, self._health(message.call_id))
        else:
            reply(
                self.control,
                identity,
                Error(message=f"unexpected {type(message).__name__} on the decode control socket"),
            )

    def _on_reserve(self, identity: bytes, message: Reserve) -> None:
        def refuse(reason: str, code: str) -> None:
            reply(
                self.control,
                identity,
                Error(
                    call_id=message.call_id,
                    request_id=message.request_id,
                    code=code,
                    message=reason,
                ),
            )

        if sum(not r.admitted for r in self.reservations.values()) >= self.config.max_queued:
            return refuse(f"the queue is full ({self.config.max_queued} waiting)", "busy")
        try:
            self.engine.reserve(message.request_id, message.prompt_token_ids, message.params)
        except RequestError as exc:
            return refuse(str(exc), "invalid")
        self.origins[message.request_id] = identity
        self.secrets[message.request_id] = message.secret
        self.reservations[message.request_id] = Reservation(
            origin=identity,
            secret=message.secret,
            call_id=message.call_id,
            deadline=time.monotonic() + message.queue_timeout_s,
            queue_timeout_s=message.queue_timeout_s,
            kv_timeout_s=message.kv_timeout_s,
            num_prompt_tokens=len(message.prompt_token_ids),
            received=[0] * self.layout.num_layers,
        )
        return None

    def _answer_admitted(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            reservation = self.reservations[request_id]
            reservation.admitted = True
            reservation.deadline = time.monotonic() + reservation.kv_timeout_s
            reply(
                self.control,
                reservation.origin,
                Reserved(
                    call_id=reservation.call_id,
                    request_id=request_id,
                    kv_endpoint=self.kv_endpoint,
                    layout=self.layout,
                ),
            )

    def _on_abort(self, message: Abort) -> None:
        request_id = message.request_id
        expected = self.secrets.get(request_id)
        if expected is None or not same_secret(message.secret, expected):
            logger.warning("ignored an abort of %s without its secret", request_id)
            return
        self.reservations.pop(request_id, None)
        self.secrets.pop(request_id, None)
        output = self.engine.abort(request_id)
        origin = self.origins.pop(request_id, None)
        if output is not None and origin is not None:
            self.publisher.add(origin, token_event(output))

    def _drop_origin(self, origin: bytes) -> None:
        """A control plane that is gone or stopped reading: free its requests' KV."""
        lost = [rid for rid, o in self.origins.items() if o == origin]
        logger.warning("a control plane stopped reading; aborting its %d requests", len(lost))
        for request_id in lost:
            self.reservations.pop(request_id, None)
            self.secrets.pop(request_id, None)
            self.origins.pop(request_id, None)
            self.engine.abort(request_id)

    # ---- KV socket ----

    def _on_kv(self, identity: bytes, message, frames) -> None:
        if isinstance(message, KVLayer):
            self._on_kv_layer(identity, message, frames)
        elif isinstance(message, PrefillDone):
            self._on_prefill_done(identity, message)
        else:
            reply(
                self.kv,
                identity,
                Error(message=f"unexpected {type(message).__name__} on the KV socket"),
            )

    def _on_kv_layer(self, identity: bytes, message: KVLayer, frames) -> None:
        reservation = self.reservations.get(message.request_id)
        if reservation is None:
            return  # released already (aborted, expired or failed): drop silently
        if not same_secret(message.secret, reservation.secret):
            reply(self.kv, identity, KVAck(request_id=message.request_id, error=_WRONG_SECRET))
            return
        try:
            self._check_kv_layer(message, reservation, frames)
            slots = self.engine.reserved_slots(message.request_id)
            chunk = slots[message.start : message.start + message.num_tokens]
            scatter_layer(
                self.engine.pool, message.layer, chunk, frames[0].buffer, frames[1].buffer
            )
        except (ProtocolError, RequestError) as exc:
            self._fail(message.request_id, f"KV transfer rejected: {exc}", identity)
            return
        reservation.received[message.layer] += message.num_tokens

    def _check_kv_layer(self, message: KVLayer, reservation: Reservation, frames) -> None:
        mismatch = self.layout.describe_mismatch(message.layout)
        if mismatch:
            raise ProtocolError(f"KV layout mismatch ({mismatch})")
        if not reservation.admitted:
            raise ProtocolError("KV arrived before the reservation was granted")
        if len(frames) != 2:
            raise ProtocolError(f"a KV layer needs 2 data frames, got {len(frames)}")
        if not 0 <= message.layer < self.layout.num_layers:
            raise ProtocolError(f"layer {message.layer} out of range")
        expected_start = reservation.received[message.layer]
        end = message.start + message.num_tokens
        if message.start != expected_start or message.num_tokens < 1:
            raise ProtocolError(
                f"layer {message.layer}: chunk starts at {message.start}, expected {expected_start}"
            )
        if end > reservation.num_prompt_tokens:
            raise ProtocolError(
                f"chunk ends at {end}, past the {reservation.num_prompt_tokens}-token prompt"
            )

    def _on_prefill_done(self, identity: bytes, message: PrefillDone) -> None:
        request_id = message.request_id
        reservation = self.reservations.get(request_id)
        if reservation is None:
            reply(
                self.kv,
                identity,
                KVAck(request_id=request_id, error="no reservation (aborted or expired)"),
            )
            return
        if not same_secret(message.secret, reservation.secret):
            reply(self.kv, identity, KVAck(request_id=request_id, error=_WRONG_SECRET))
            return
        mismatch = self.layout.describe_mismatch(message.layout)
        incomplete = [
            i for i, n in enumerate(reservation.received) if n != message.num_prompt_tokens
        ]
        if mismatch or incomplete or message.num_prompt_tokens != reservation.num_prompt_tokens:
            reason = (
                f"KV layout mismatch ({mismatch})"
                if mismatch
                else f"incomplete KV: layers {incomplete[:8]} missing tokens"
            )
            self._fail(request_id, reason, identity)
            return
        try:
            output = self.engine.complete_reservation(
                request_id, message.first_token, engine_logprobs(message.logprobs)
            )
        except RequestError as exc:
            self._fail(request_id, str(exc), identity)
            return
        del self.reservations[request_id]
        reply(self.kv, identity, KVAck(request_id=request_id))
        self._publish([output])

    def _fail(
        self, request_id: str, reason: str, identity: bytes | None = None, retry: bool = True
    ) -> None:
        """Release a request, tell its client and (if known) the prefill node. A
        failed KV hand-off may well succeed on other nodes (``retry``)."""
        logger.warning("request %s failed: %s", request_id, reason)
        self.reservations.pop(request_id, None)
        self.secrets.pop(request_id, None)
        self.engine.abort(request_id)
        origin = self.origins.pop(request_id, None)
        if origin is not None:
            self.publisher.add(origin, error_event(request_id, reason, retry))
        if identity is not None:
            reply(self.kv, identity, KVAck(request_id=request_id, error=reason))

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for request_id, reservation in list(self.reservations.items()):
            if now < reservation.deadline:
                continue
            if reservation.admitted:
                self._fail(
                    request_id,
                    f"KV did not arrive within {reservation.kv_timeout_s:g} s; "
                    "reservation released",
                )
                continue
            # Never admitted: the Reserve call is still open; answer it "busy".
            del self.reservations[request_id]
            self.secrets.pop(request_id, None)
            self.origins.pop(request_id, None)
            self.engine.abort(request_id)
            reply(
                self.control,
                reservation.origin,
                Error(
                    call_id=reservation.call_id,
                    request_id=request_id,
                    code="busy",
                    message=f"no KV slots freed up within {reservation.queue_timeout_s:g} s",
                ),
            )

    # ---- decoding ----

    def _run_step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The engine fails a batch it cannot run by itself; this is the last
            # guard, for a fault outside it: the running requests fail, the node lives.
            logger.exception("a decode step failed; failing its requests")
            for request in list(self.engine.scheduler.running):
                self._fail(request.request_id, "internal error in a decode step", retry=False)
            return
        self._answer_admitted(self.engine.pop_reserved())
        self._publish(outputs)

    def _publish(self, outputs) -> None:
        generated = 0
        for output in outputs:
            generated += len(output.new_token_ids)
            origin = self.origins.get(output.request_id)
            if origin is None:
                continue
            self.publisher.add(origin, token_event(output))
            if output.finished:
                del self.origins[output.request_id]
                self.secrets.pop(output.request_id, None)
        self.tokens_per_s.add(generated)

    def _health(self, call_id: int) -> Health:
        pool = self.engine.pool
        return Health(
            call_id=call_id,
            node_id=self.config.node_id,
            role="decode",
            model=self.config.engine.model,
            layout=self.layout,
            device=str(self.engine.runner.device),
            num_slots=pool.num_slots,
            num_free_slots=pool.num_free_slots,
            num_reserved_slots=self.engine.num_reserved_slots,
            num_running=self.engine.num_running,
            num_queued=self.engine.num_waiting,
            num_queued_tokens=sum(r.num_tokens for r in self.engine.scheduler.waiting),
            tokens_per_s=self.tokens_per_s.rate(),
            max_model_len=self.engine.max_model_len,
        )
