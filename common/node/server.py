"""What every node is: an engine, a KV connector, a control socket, one loop.

One thread runs everything: it drains the control socket (the role's requests,
Abort, HealthCheck), runs one engine step (which also takes in the connector's
finished transfers), and publishes the step's news, one message per control
plane, back over the connection each request came in on. A role (prefill,
decode) adds only what its requests mean: ``handle`` for its messages,
``after_step`` for what it answers between steps, ``event_for`` for what its
outputs tell the control plane.

Who may speak for a request here: the control plane whose connection brought
it (its tokens go back there) and whoever holds its secret (its abort).
"""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import zmq

from common.engine import EngineConfig, LLMEngine, RequestOutput
from common.engine.connector.collective import CollectiveConnector
from common.engine.connector.zeromq import LANES, ZmqConnector
from common.engine.kv_transfer import kv_layout
from common.node.runtime import LoopClock, Publisher, RateMeter, drain
from common.wire.auth import FleetKeys, same_secret, start_authenticator
from common.wire.messages import (
    Abort,
    Error,
    Health,
    HealthCheck,
    Message,
    NodeStats,
    NodeStatus,
    TokenEvent,
)
from common.wire.sockets import bind, send, serving_socket

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 20


@dataclass(frozen=True)
class NodeConfig:
    engine: EngineConfig
    node_id: str
    cluster_token: str
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: any free port
    kv_port: int = 0  # where a decode node receives KV; 0: any free port
    max_queued: int = 4096  # reservations waiting for slots; more are refused "busy"
    # How KV tensors travel: "zmq" (frames beside the headers), "nccl" (a
    # torch.distributed group per node pair: NCCL on GPUs, Gloo on CPU), or "auto"
    # (nccl when this node's device is a GPU, else zmq).
    kv_transport: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_transport not in ("auto", "zmq", "nccl"):
            raise ValueError(f"--kv-transport must be auto, zmq or nccl, not {self.kv_transport!r}")


@dataclass
class Client:
    """The control plane a request came from, and the secret it was sent under."""

    origin: bytes
    secret: str


class NodeServer(ABC):
    role: str
    receives_kv: bool = False

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        keys = FleetKeys.from_token(config.cluster_token)
        self.engine = LLMEngine(config.engine)
        self.layout = kv_layout(
            config.engine.model, self.engine.model_config, self.engine.runner.dtype
        )
        # One I/O thread per KV lane, so CURVE encrypts the lanes in parallel.
        self.ctx = zmq.Context(io_threads=LANES)
        self.auth = start_authenticator(self.ctx, keys)
        self.control = serving_socket(self.ctx, keys)
        self.control_endpoint = bind(self.control, config.host, config.control_port)
        self.connector = self._connector_class()(
            self.layout,
            self.engine.pool,
            keys,
            self.ctx,
            bind_host=config.host if self.receives_kv else None,
            bind_port=config.kv_port,
            max_tokens=self.engine.max_model_len,
        )
        self.engine.attach(self.connector)
        self.publisher = Publisher(self.control, config.node_id)
        self.clients: dict[str, Client] = {}
        self.tokens_per_s = RateMeter()
        self.clock = LoopClock()
        # Refreshed by the loop; read by the heartbeat thread.
        self.current = self.status()
        self._stopped = False

    def _connector_class(self) -> type[ZmqConnector]:
        transport = self.config.kv_transport
        if transport == "auto":
            transport = "nccl" if self.engine.runner.device.type == "cuda" else "zmq"
        return CollectiveConnector if transport == "nccl" else ZmqConnector

    @property
    def kv_endpoint(self) -> str | None:
        return self.connector.endpoint

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        try:
            while not self._stopped:
                poller = zmq.Poller()
                for sock in (self.control, *self.connector.pollables()):
                    poller.register(sock, zmq.POLLIN)
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self.control in ready:
                    drain(self.control, self._on_control)
                self._step()
                for origin in self.publisher.flush():
                    self._drop_origin(origin)
                self.current = self.status()
                self.clock.tick()
        finally:
            self.connector.close()
            self.auth.stop()
            self.ctx.destroy(linger=0)

    def _poll_timeout_ms(self) -> int:
        """Not at all while there is a batch to run; briefly while a transfer moves
        without socket activity (device copies, collective operations); else until a
        message comes, waking every IDLE_POLL_MS for the clock and the heartbeat."""
        if self.engine.has_work:
            return 0
        return 1 if self.connector.busy() else IDLE_POLL_MS

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The engine fails a batch it cannot run by itself; this is the last
            # guard, for a fault outside it: the node's requests fail, it lives on.
            logger.exception("a step failed outside the batch; failing every request")
            outputs = [
                self.engine.fail(rid, "internal error in a step") for rid in list(self.clients)
            ]
        self.publish([o for o in outputs if o is not None])
        self.after_step()

    # ---- control socket ----

    def _on_control(self, identity: bytes, message: Message, frames: list) -> None:
        if isinstance(message, HealthCheck):
            send(self.control, identity, self._health(message.call_id))
        elif isinstance(message, Abort):
            self._on_abort(message)
        elif not self.handle(identity, message):
            kind = type(message).__name__
            send(self.control, identity, Error(message=f"unexpected {kind} on a {self.role} node"))

    def _on_abort(self, message: Abort) -> None:
        client = self.clients.get(message.request_id)
        if client is None or not same_secret(message.secret, client.secret):
            logger.warning("ignored an abort of %s without its secret", message.request_id)
            return
        output = self.engine.abort(message.request_id)
        if output is not None:
            self.publish([output])
        self.clients.pop(message.request_id, None)

    def refuse(self, identity: bytes, message: Message, reason: str, code: str) -> None:
        send(
            self.control,
            identity,
            Error(
                call_id=getattr(message, "call_id", None),
                request_id=getattr(message, "request_id", None),
                code=code,
                message=reason,
            ),
        )

    # ---- the role's part ----

    @abstractmethod
    def handle(self, identity: bytes, message: Message) -> bool:
        """Take a message of this role; False if it is not one."""

    def after_step(self) -> None:  # noqa: B027 (a role may have nothing to answer)
        """Answer what the step decided (admissions, expiries)."""

    @abstractmethod
    def event_for(self, output: RequestOutput) -> TokenEvent | None:
        """What ``output`` tells the request's control plane (None: nothing)."""

    # ---- news to the control planes ----

    def publish(self, outputs: list[RequestOutput]) -> None:
        generated = 0
        for output in outputs:
            generated += len(output.new_token_ids)
            client = self.clients.get(output.request_id)
            if client is None:
                continue
            event = self.event_for(output)
            if event is not None:
                self.publisher.add(client.origin, event)
            if output.finished:
                del self.clients[output.request_id]
        self.tokens_per_s.add(generated)

    def _drop_origin(self, origin: bytes) -> None:
        """A control plane that is gone or stopped reading: free its requests' KV."""
        lost = [rid for rid, c in self.clients.items() if c.origin == origin]
        logger.warning("a control plane stopped reading; aborting its %d requests", len(lost))
        for request_id in lost:
            del self.clients[request_id]
            self.engine.abort(request_id)

    def _health(self, call_id: int) -> Health:
        return Health(call_id=call_id, status=self.status())

    def status(self) -> NodeStatus:
        engine = self.engine
        stats = NodeStats(
            num_free_slots=engine.pool.num_free_slots,
            num_reserved_slots=engine.num_reserved_slots,
            num_running=engine.num_running,
            num_queued=engine.num_waiting,
            num_queued_tokens=engine.num_queued_tokens,
            tokens_per_s=self.tokens_per_s.rate(),
            loop_age_s=self.clock.age_s,
        )
        return NodeStatus(
            node_id=self.config.node_id,
            role=self.role,
            control_endpoint=self.control_endpoint,
            kv_endpoint=self.kv_endpoint,
            model_fingerprint=self.layout.model_fingerprint,
            model_name=Path(self.config.engine.model).name,
            device=str(engine.runner.device),
            num_slots=engine.pool.num_slots,
            max_model_len=engine.max_model_len,
            kv_transport=self.connector.transport,
            layout=self.layout,
            stats=stats,
        )
