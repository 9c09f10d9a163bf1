"""What every node is: an engine, a KV connector, a control socket, one loop.

One thread runs everything: it drains the control socket (the role's requests,
Abort, HealthCheck), runs one engine step (which also takes in the connector's
finished transfers), and publishes the step's news, one message per control
plane, back over the connection each request came in on. A role (prefill,
decode) adds only what its requests mean: ``handle`` for its messages,
``after_step`` for what it answers between steps, ``event_for`` for what its
outputs tell the control plane.

Who may speak for a request here: the control plane whose connection brought
it (its tokens go back there, and its messages renew the request's lease) and
whoever holds its secret (its abort). A control plane that cannot be reached,
or has sent nothing for ``lease_s``, is gone: its requests are aborted.
"""

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from lightpd.common.engine import EngineConfig, LLMEngine, RequestOutput
from lightpd.common.engine.connector import LANES, make_connector
from lightpd.common.engine.kv_transfer import kv_layout
from lightpd.common.kv_transports import check_transport
from lightpd.common.node.cache_events import CacheEventPublisher
from lightpd.common.node.runtime import Leases, LoopClock, Publisher, RateMeter, drain, error_event
from lightpd.common.wire.auth import FleetKeys, same_secret, start_authenticator
from lightpd.common.wire.messages import (
    LEASE_RENEW_S,
    Abort,
    CacheSync,
    Error,
    Health,
    HealthCheck,
    Lease,
    Message,
    NodeStats,
    NodeStatus,
    TokenEvent,
)
from lightpd.common.wire.sockets import bind, send, serving_socket

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 20
# A member of an expert-parallel group whose group failed ends its requests and exits
# with this code: it holds only part of the model, and serves nothing alone.
EXIT_GROUP_FAILED = 3
LEASE_CHECK_S = 0.25  # how often the loop looks for control planes past their lease
DEFAULT_LEASE_S = 5.0
MAX_LEASE_S = 3600.0


@dataclass(frozen=True)
class NodeConfig:
    engine: EngineConfig
    node_id: str
    cluster_token: str
    host: str = "127.0.0.1"
    control_port: int = 0  # 0: any free port
    kv_port: int = 0  # where a decode node receives KV; 0: any free port
    max_queued: int = 4096  # reservations waiting for slots; more are refused "busy"
    # How KV tensors travel (lightpd/common/kv_transports.py): "zmq" (frames beside
    # the headers), "nccl" (a torch.distributed group per node pair: NCCL on GPUs,
    # Gloo on CPU), or "auto" (nccl when this node's device is a GPU, else zmq).
    kv_transport: str = "auto"
    # A control plane renews its lease every LEASE_RENEW_S; one that has sent this
    # node nothing for lease_s is taken for gone and its requests here are aborted.
    lease_s: float = DEFAULT_LEASE_S
    restarts: int = 0  # times a supervisor started this node again (it reports them)

    def __post_init__(self) -> None:
        check_transport(self.kv_transport)
        if not 2 * LEASE_RENEW_S <= self.lease_s <= MAX_LEASE_S:
            raise ValueError(
                f"--lease-s must be between {2 * LEASE_RENEW_S:g} (twice the control plane's "
                f"renewal period) and {MAX_LEASE_S:g}, not {self.lease_s:g}"
            )


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
        self.connector = make_connector(
            config.kv_transport,
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
        self.cache_events = CacheEventPublisher(self.engine, self.control, config.node_id)
        self.clients: dict[str, Client] = {}
        self.leases = Leases(config.lease_s)
        self._next_lease_check = 0.0
        self._last_drained = time.monotonic()  # when no message last waited unread
        self._unreachable: set[bytes] = set()  # origins a send failed to, this round
        self.tokens_per_s = RateMeter()
        self.clock = LoopClock()
        # Refreshed by the loop; read by the heartbeat thread.
        self.current = self.status()
        self._stopped = False
        self.exit_code = 0

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
                drained = drain(self.control, self._on_control) if self.control in ready else True
                self._expire_leases(drained)
                self._step()
                lost, self._unreachable = {*self._unreachable, *self.publisher.flush()}, set()
                for origin in lost:
                    self._abort_origin(origin, "a control plane is gone or stopped reading")
                self.cache_events.publish()
                self.current = self.status()
                self.clock.tick()
        finally:
            self.engine.close()  # the connector too
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
        if self.engine.failure is not None and not self._stopped:
            # Its requests have their errors (published with this step); the node
            # leaves, so the control plane stops sending it work.
            logger.error("%s; this node stops", self.engine.failure)
            self.exit_code = EXIT_GROUP_FAILED
            self.stop()

    # ---- control socket ----

    def _on_control(self, identity: bytes, message: Message, frames: list) -> None:
        self.leases.heard(identity)  # whatever it says, its sender is alive
        if isinstance(message, Lease):
            return  # that is all a Lease says
        if isinstance(message, HealthCheck):
            send(self.control, identity, self._health(message.call_id))
        elif isinstance(message, CacheSync):
            self.cache_events.subscribe(identity)
        elif isinstance(message, Abort):
            self._on_abort(message)
        elif not self.handle(identity, message):
            kind = type(message).__name__
            send(self.control, identity, Error(message=f"unexpected {kind} on a {self.role} node"))

    def _on_abort(self, message: Abort) -> None:
        client = self.clients.get(message.request_id)
        if client is None:  # it ended here already (the abort crossed its last token)
            logger.debug("abort of %s, which is not running here", message.request_id)
            return
        if not same_secret(message.secret, client.secret):
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

    def send_to_origin(self, origin: bytes, message: Message) -> None:
        """Send to the control plane of a request; one that cannot take it is gone
        (or not reading), and all its requests here are aborted after this step."""
        if not send(self.control, origin, message):
            self._unreachable.add(origin)

    def _expire_leases(self, drained: bool) -> None:
        """Abort the requests of control planes silent past their lease. Judged once
        every message that came is read (a loop that was stalled reads the renewals
        that queued up meanwhile first), or after a whole lease of backlog: the
        socket reads its peers in turn, so by then each live one has been heard."""
        now = time.monotonic()
        if drained:
            self._last_drained = now
        elif now - self._last_drained < self.leases.lease_s:
            return
        if now < self._next_lease_check:
            return
        self._next_lease_check = now + LEASE_CHECK_S
        owners = {client.origin for client in self.clients.values()}
        for origin in self.leases.expired(owners):
            silence = f"sent nothing for {self.leases.lease_s:g} s (its lease)"
            for request_id in self._abort_origin(origin, f"a control plane {silence}"):
                # Were it alive after all (its loop blocked that long), it learns why.
                error = f"aborted by the node: this control plane {silence}"
                self.publisher.add(origin, error_event(request_id, error))

    def _abort_origin(self, origin: bytes, reason: str) -> list[str]:
        """Abort every request that came from ``origin`` (wherever it is: queued,
        reserved, prefilling, decoding, sending its KV) and free its KV; returns
        their ids."""
        self.leases.forget(origin)
        self.cache_events.forget(origin)
        lost = [rid for rid, c in self.clients.items() if c.origin == origin]
        if not lost:
            return lost
        logger.warning("%s; aborting its %d requests", reason, len(lost))
        for request_id in lost:
            del self.clients[request_id]
        # Published like any ending (the role forgets them too); with their clients
        # gone, nothing is sent for them.
        self.publish([o for rid in lost if (o := self.engine.abort(rid)) is not None])
        return lost

    def _health(self, call_id: int) -> Health:
        return Health(call_id=call_id, status=self.status())

    def status(self) -> NodeStatus:
        engine = self.engine
        stats = NodeStats(
            **asdict(engine.stats()),
            tokens_per_s=self.tokens_per_s.rate(),
            loop_age_s=self.clock.age_s,
        )
        group = self.config.engine.expert_parallel
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
            ep_group=None if group is None else group.init,
            ep_rank=0 if group is None else group.rank,
            ep_size=1 if group is None else group.size,
            restarts=self.config.restarts,
        )
