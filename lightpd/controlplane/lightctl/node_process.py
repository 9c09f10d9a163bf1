"""Start a node as a child process and wait until it listens (tests, bench, lightctl)."""

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class NodeProcess:
    role: str
    process: subprocess.Popen
    control: str
    kv: str | None
    node_id: str

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass(frozen=True)
class NodeStart:
    """How `lightctl up` starts a node (and starts it again): its flags and device."""

    name: str
    role: str
    number: int
    device: str
    args: list[str]


def start_node(
    role: str,
    model: str,
    *args: str,
    device: str = "cpu",
    timeout: float = 120.0,
    log: Path | None = None,
    cluster_token: str | None = None,
) -> NodeProcess:
    """Run ``python -m lightpd.{role}_node`` and return once it prints its ready line. The
    node keys its sockets with ``cluster_token`` (default: LIGHTPD_CLUSTER_TOKEN)."""
    command = [
        sys.executable,
        "-m",
        f"lightpd.{role}_node",
        "--model",
        model,
        "--device",
        device,
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cluster_token is not None:
        env["LIGHTPD_CLUSTER_TOKEN"] = cluster_token
    stderr = open(log, "ab") if log is not None else None  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{role} node exited with code {process.returncode} before ready")
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if line.startswith("{"):
                ready = json.loads(line)
                return NodeProcess(
                    role, process, ready["control"], ready.get("kv"), ready["node_id"]
                )
    process.kill()
    raise RuntimeError(f"{role} node not ready within {timeout:g} s")
