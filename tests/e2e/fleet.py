"""A real fleet on 127.0.0.1: embedded Redis, the control plane process, node processes."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zmq

from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import Message, decode
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis, free_port
from lightpd.controlplane.lightctl.node_process import NodeProcess, start_node

ADMIN_TOKEN = "test-admin"
CLUSTER_TOKEN = "test-cluster"
API_KEY = "sk-test"


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    """Until the control plane at ``url`` answers /health."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"control plane at {url} did not start"
        time.sleep(0.2)


def raw_call(
    endpoint: str, frames: list[bytes], keys: FleetKeys | None, timeout_ms: int = 5000
) -> Message | None:
    """Send frames from a bare DEALER (a fleet member if ``keys``) and decode the first
    reply frame; None when no reply came."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    if keys is not None:
        keys.connect_as_member(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        return decode(sock.recv_multipart()[0]) if sock.poll(timeout_ms) else None
    finally:
        sock.close()


@dataclass
class ControlPlane:
    """A control plane process of its own (beside a LocalFleet's) and its URL."""

    process: subprocess.Popen
    url: str

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class LocalFleet:
    model: str
    node_ttl_s: float = 3.0
    node_args: tuple[str, ...] = ("--num-kv-slots", "8192")
    redis: EmbeddedRedis | None = None
    control_plane: subprocess.Popen | None = None
    nodes: list[NodeProcess] = field(default_factory=list)
    url: str = ""
    control_plane_log: Path | None = None  # None: the control plane writes to ours
    settings: dict[str, str] = field(default_factory=dict)  # more LIGHTPD_* settings
    more_control_planes: list[ControlPlane] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LIGHTPD_REDIS_URL": self.redis.url,
            "LIGHTPD_MODEL": self.model,
            "LIGHTPD_ADMIN_TOKEN": ADMIN_TOKEN,
            "LIGHTPD_CLUSTER_TOKEN": CLUSTER_TOKEN,
            "LIGHTPD_API_KEYS": API_KEY,
            "LIGHTPD_NODE_TTL_S": str(self.node_ttl_s),
            "LIGHTPD_CONTROL_PLANE": self.url,
            "PYTHONUNBUFFERED": "1",
            # Every prompt takes the KV hand-off, however short (the tests' are).
            "LIGHTPD_LOCAL_PREFILL_TOKENS": "0",
            **self.settings,
        }

    def start(self, prefill: int = 1, decode: int = 1) -> "LocalFleet":
        self.redis = EmbeddedRedis().start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        output = None if self.control_plane_log is None else self.control_plane_log.open("ab")
        self.control_plane = subprocess.Popen(
            [sys.executable, "-m", "lightpd.controlplane"],
            env={**self.env, "LIGHTPD_PORT": str(port)},
            stdout=output,
            stderr=None if output is None else subprocess.STDOUT,
        )
        wait_healthy(self.url)
        for role, count in (("prefill", prefill), ("decode", decode)):
            for _ in range(count):
                self.add_node(role)
        return self

    def add_node(self, role: str) -> NodeProcess:
        os.environ["LIGHTPD_CLUSTER_TOKEN"] = CLUSTER_TOKEN
        node = start_node(role, self.model, "--control-plane", self.url, *self.node_args)
        self.nodes.append(node)
        self.wait_for(lambda nodes: node.node_id in {n["node_id"] for n in nodes})
        return node

    def add_control_plane(self, **settings: str) -> ControlPlane:
        """Another control plane on the fleet's Redis, with more LIGHTPD_* settings
        (``LIGHTPD_SHUTDOWN_GRACE_S="2"``); it writes to our output. The nodes keep
        their heartbeats going to the first one."""
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "lightpd.controlplane"],
            env={**self.env, "LIGHTPD_PORT": str(port), **settings},
        )
        control_plane = ControlPlane(process, f"http://127.0.0.1:{port}")
        self.more_control_planes.append(control_plane)
        wait_healthy(control_plane.url)
        return control_plane

    def admin(self, method: str, path: str) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}{path}",
            timeout=10,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )

    def wait_for(self, condition, timeout: float = 30.0) -> list[dict]:
        """Poll /admin/nodes until ``condition(nodes)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.admin("GET", "/admin/nodes").json()
            if condition(nodes):
                return nodes
            assert time.monotonic() < deadline, f"condition not met; nodes: {nodes}"
            time.sleep(0.2)

    def stop(self) -> None:
        for control_plane in self.more_control_planes:
            control_plane.stop()
        for node in self.nodes:
            node.stop()
        try:
            if self.control_plane is not None:
                self.control_plane.terminate()
                try:
                    self.control_plane.wait(timeout=15)
                except subprocess.TimeoutExpired:  # a failure, but nothing is left running
                    self.control_plane.kill()
                    self.control_plane.wait(timeout=10)
                    raise
        finally:
            if self.redis is not None:
                self.redis.stop()
