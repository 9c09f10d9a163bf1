"""Real node processes on 127.0.0.1 for end-to-end tests."""

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest


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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(role: str, model: str, *args: str, timeout: float = 60.0) -> NodeProcess:
    """Start ``python -m {role}_node`` and wait for its ready line."""
    command = [sys.executable, "-m", f"{role}_node", "--model", model, "--device", "cpu", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{role} node exited with {process.returncode} before ready")
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if line.startswith("{"):
                ready = json.loads(line)
                return NodeProcess(
                    role, process, ready["control"], ready.get("kv"), ready["node_id"]
                )
    process.kill()
    raise RuntimeError(f"{role} node not ready within {timeout} s")


@pytest.fixture
def nodes():
    """Factory of node processes, all stopped at the end of the test."""
    started: list[NodeProcess] = []

    def start(role: str, model: str, *args: str) -> NodeProcess:
        node = start_node(role, model, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
