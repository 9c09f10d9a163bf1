"""`lightctl up` keeps its fleet running, the way a process supervisor does.

Each process it started (the embedded Redis, the control plane, every node) is a
``Supervised`` child: how to start it again (same role, device, ports and flags),
and a record of its exits. A child that exits is started again after a backoff
(0.5 s, doubling, at most 30 s) on a thread of its own, so the rest of the fleet
keeps serving, and requests move as they always do when a node dies. A child that
exits more than ``max_restarts`` times within ``window_s`` is given up alone: its
last log lines are shown and the fleet serves without it. `lightctl up` itself
ends only on a stop signal, or when nothing can serve at all (see ``can_serve``).
"""

import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lightpd.controlplane.lightctl.children import Children, forget_nodes, log_tail
from lightpd.controlplane.lightctl.node_process import NodeProcess, NodeStart, start_node


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # within window_s; the exit after them gives the child up
    window_s: float = 60.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError("--max-restarts must be 0 or more")
        if self.window_s <= 0:
            raise ValueError("--restart-window must be more than 0 seconds")
        if not 0 < self.first_backoff_s <= self.max_backoff_s:
            raise ValueError(f"--restart-backoff must be in (0, {self.max_backoff_s:g}] seconds")

    def backoff(self, recent_exits: int) -> float:
        """The wait before a start again, after the ``recent_exits``-th exit in the window."""
        return min(self.first_backoff_s * 2 ** max(recent_exits - 1, 0), self.max_backoff_s)


@dataclass(eq=False)
class Supervised:
    """One child: its name, how to start it again (``restart(restarts)`` blocks until
    it is ready and returns its process, or raises), and its record."""

    name: str
    kind: str  # "redis", "control plane", "prefill" or "decode"
    log: Path
    process: subprocess.Popen
    restart: Callable[[int], subprocess.Popen]
    restarts: int = 0
    state: str = "running"  # running, restarting, given up
    exits: deque[float] = field(default_factory=deque)


class Supervisor:
    """Watches its children (``tick`` from the serving loop) and starts again those
    that exit. ``say`` prints a line for the operator."""

    def __init__(self, policy: RestartPolicy, say: Callable[[str], None]) -> None:
        self.policy = policy
        self.say = say
        self.children: list[Supervised] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, child: Supervised) -> None:
        with self._lock:
            self.children.append(child)

    def tick(self) -> None:
        """Notice the children that exited since the last tick."""
        with self._lock:
            exited = [
                c for c in self.children if c.state == "running" and c.process.poll() is not None
            ]
            for child in exited:
                child.state = "restarting"
        for child in exited:
            self._exited(child, f"exited with code {child.process.returncode}")

    def can_serve(self) -> str | None:
        """None while the fleet can serve; else why it cannot (a part it cannot do
        without was given up)."""
        with self._lock:
            given_up = {c.name for c in self.children if c.state == "given up"}
            decode = [c for c in self.children if c.kind == "decode"]
            for child in self.children:
                if child.kind in ("redis", "control plane") and child.name in given_up:
                    return f"{child.name} was given up"
            if decode and all(c.name in given_up for c in decode):
                return "every decode node was given up"
        return None

    def stop(self) -> None:
        """No more starts; a start under way ends when its process is stopped."""
        self._stopping.set()

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _exited(self, child: Supervised, how: str) -> None:
        now = time.monotonic()
        child.exits.append(now)
        while child.exits and now - child.exits[0] > self.policy.window_s:
            child.exits.popleft()
        if len(child.exits) > self.policy.max_restarts:
            with self._lock:
                child.state = "given up"
            window = f"{len(child.exits)} exits in {self.policy.window_s:g} s"
            self.say(
                f"{child.name} {how}; given up ({window}), the fleet serves without it"
                + log_tail(child.log)
            )
            return
        wait = self.policy.backoff(len(child.exits))
        self.say(f"{child.name} {how}; starting it again in {wait:.1f} s")
        thread = threading.Thread(
            target=self._start_again, args=(child, wait), name=f"restart {child.name}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _start_again(self, child: Supervised, wait: float) -> None:
        if self._stopping.wait(wait):
            return
        try:
            process = child.restart(child.restarts + 1)
        except BaseException as exc:  # RuntimeError, or typer.Exit from a helper
            if self._stopping.is_set():
                return
            self._exited(child, f"did not start again ({exc or type(exc).__name__})")
            return
        if self._stopping.is_set():  # stopped while it started: it must not outlive us
            process.terminate()
            return
        with self._lock:
            child.process = process
            child.restarts += 1
            child.state = "running"
        self.say(f"{child.name} is serving again (restart {child.restarts})")


@dataclass(frozen=True)
class FleetAccess:
    """What starting a node again needs: the model, the control plane and the tokens."""

    model: Path
    url: str
    admin_token: str
    cluster_token: str
    node_start_timeout_s: float


def supervise(
    supervisor: Supervisor,
    children: Children,
    start_control_plane: Callable[[int], subprocess.Popen],
    access: FleetAccess,
) -> None:
    """Hand every process `lightctl up` started to ``supervisor``, each with how to
    start it again as it was."""
    fleet_logs = children.fleet.logs
    if children.redis is not None:
        redis = children.redis

        def start_redis(restarts: int) -> subprocess.Popen:
            redis.start()  # the same port and data folder
            assert redis.process is not None
            return redis.process

        assert redis.process is not None
        log = fleet_logs / "redis.log"
        supervisor.add(Supervised("the embedded Redis", "redis", log, redis.process, start_redis))
    assert children.control_plane is not None
    log = fleet_logs / "controlplane.log"
    cp = Supervised(
        "the control plane", "control plane", log, children.control_plane, start_control_plane
    )
    supervisor.add(cp)
    for index, (name, node, log) in enumerate(children.nodes):
        spec: NodeStart = children.node_starts[name]
        restart = partial(_restart_node, children, index, spec, node, access)
        supervisor.add(Supervised(name, spec.role, log, node.process, restart))


def _restart_node(
    children: Children,
    index: int,
    spec: NodeStart,
    first: NodeProcess,
    access: FleetAccess,
    restarts: int,
) -> subprocess.Popen:
    """Start a node again with its flags, id and ports; it reports ``restarts``."""
    # Its dead record goes first, so the id is free at once (not a TTL later) and
    # nothing more is routed to the old process.
    forget_nodes(access.url, access.admin_token, [first.node_id])
    args = [*spec.args, "--node-id", first.node_id, "--port", _port(first.control)]
    if first.kv is not None:
        args += ["--kv-port", _port(first.kv)]
    args += ["--restarts", str(restarts)]
    log = children.fleet.logs / f"{spec.role}-{spec.number}.log"
    started = start_node(
        spec.role,
        str(access.model),
        *args,
        device=spec.device,
        log=log,
        cluster_token=access.cluster_token,
        timeout=access.node_start_timeout_s,
    )
    children.nodes[index] = (spec.name, started, log)
    return started.process


def _port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[1]
