"""The decode node: reserves slots, receives prompt KV, decodes in a continuous batch.

One thread runs everything: it polls the control socket (Reserve, Abort,
HealthCheck) and the KV socket (KVLayer, PrefillDone from prefill nodes), then
runs one engine step and publishes that step's tokens, one message per
destination. Every reservation has a deadline; one whose KV is incomplete by
then is released and its client told why.
"""

import logging
import time
from dataclasses import dataclass, field

import zmq

from common.engine import EngineConfig, LLMEngine, RequestError
from common.kv_transfer import kv_layout, scatter_layer
from common.node_base import (
    Publisher,
    RateMeter,
    bind,
    drain,
    engine_logprobs,
    error_event,
    reply,
    token_event,
)
from common.protocol import (
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


@dataclass(frozen=True)
class DecodeNodeConfig:
    engine: EngineConfig
    node_id: str
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: any free port
    kv_port: int = 0


@dataclass
class Reservation:
    reply_to: str
    identity: bytes  # who asked, for the Reserved answer
    call_id: int
    deadline: float
    timeout_s: float
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
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.kv = self.ctx.socket(zmq.ROUTER)
        for sock in (self.control, self.kv):
            sock.setsockopt(zmq.LINGER, 0)
        self.control_endpoint = bind(self.control, config.host, config.control_port)
        self.kv_endpoint = bind(self.kv, config.host, config.kv_port)
        self.publisher = Publisher(self.ctx, config.node_id)
        self.reply_to: dict[str, str] = {}
        self.reservations: dict[str, Reservation] = {}
        self.tokens_per_s = RateMeter()
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
                self.publisher.flush()
                self.health = self._health(0)
        finally:
            self.publisher.close()
            self.ctx.destroy(linger=0)

    # ---- control socket ----

    def _on_control(self, identity: bytes, message, frames) -> None:
        if isinstance(message, Reserve):
            self._on_reserve(identity, message)
        elif isinstance(message, Abort):
            self._on_abort(message.request_id)
        elif isinstance(message, HealthCheck):
            reply(self.control, identity, self._health(message.call_id))
        else:
            reply(
                self.control,
                identity,
                Error(message=f"unexpected {type(message).__name__} on the decode control socket"),
            )

    def _on_reserve(self, identity: bytes, message: Reserve) -> None:
        try:
            self.engine.reserve(message.request_id, message.prompt_token_ids, message.params)
        except RequestError as exc:
            reply(
                self.control,
                identity,
                Error(call_id=message.call_id, request_id=message.request_id, message=str(exc)),
            )
            return
        self.reply_to[message.request_id] = message.reply_to
        self.reservations[message.request_id] = Reservation(
            reply_to=message.reply_to,
            identity=identity,
            call_id=message.call_id,
            deadline=time.monotonic() + message.kv_timeout_s,
            timeout_s=message.kv_timeout_s,
            num_prompt_tokens=len(message.prompt_token_ids),
            received=[0] * self.layout.num_layers,
        )

    def _answer_admitted(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            reservation = self.reservations[request_id]
            reservation.admitted = True
            reservation.deadline = time.monotonic() + reservation.timeout_s
            reply(
                self.control,
                reservation.identity,
                Reserved(
                    call_id=reservation.call_id,
                    request_id=request_id,
                    kv_endpoint=self.kv_endpoint,
                    layout=self.layout,
                ),
            )

    def _on_abort(self, request_id: str) -> None:
        self.reservations.pop(request_id, None)
        output = self.engine.abort(request_id)
        if output is not None:
            self.publisher.add(self.reply_to.pop(request_id), token_event(output))

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

    def _fail(self, request_id: str, reason: str, identity: bytes | None = None) -> None:
        """Release a reservation, tell its client and (if known) the prefill node."""
        logger.warning("request %s failed: %s", request_id, reason)
        self.reservations.pop(request_id, None)
        self.engine.abort(request_id)
        reply_to = self.reply_to.pop(request_id, None)
        if reply_to is not None:
            self.publisher.add(reply_to, error_event(request_id, reason))
        if identity is not None:
            reply(self.kv, identity, KVAck(request_id=request_id, error=reason))

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for request_id, reservation in list(self.reservations.items()):
            if now >= reservation.deadline:
                what = "KV did not arrive" if reservation.admitted else "no KV slots freed up"
                self._fail(
                    request_id, f"{what} within {reservation.timeout_s:g} s; reservation released"
                )

    # ---- decoding ----

    def _run_step(self) -> None:
        outputs = self.engine.step()
        self._answer_admitted(self.engine.pop_reserved())
        self._publish(outputs)

    def _publish(self, outputs) -> None:
        generated = 0
        for output in outputs:
            generated += len(output.new_token_ids)
            reply_to = self.reply_to.get(output.request_id)
            if reply_to is None:
                continue
            self.publisher.add(reply_to, token_event(output))
            if output.finished:
                del self.reply_to[output.request_id]
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
