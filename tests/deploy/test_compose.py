"""compose.yaml without Docker: its services run as local processes on CPU.

Each service's command and environment are taken from the file as Compose would
interpolate them, then moved onto this machine: Redis becomes an EmbeddedRedis,
service hostnames become 127.0.0.1, every service port a free local port,
`--device=cuda:0` becomes `--device=cpu` and the model volume a tiny model. The
order and the readiness waits follow `depends_on` and the healthchecks.
"""

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from common.tiny import write_tiny_checkpoint
from controlplane.embedded_redis import EmbeddedRedis, free_port

COMPOSE_FILE = Path(__file__).parents[2] / "compose.yaml"
NODE_SERVICES = ("prefill", "decode")
MODEL_TARGET = "/models/model"
START_TIMEOUT_S = 45.0
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_OWN_PORT_OPTION = re.compile(r"^(--port|--kv-port)=(\d+)$")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}` and `${VAR:-default}` (default when unset or empty)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m[1]) or m[2] or "", value)
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    return value


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """The file as Compose sees it with ``env`` as the host environment (none by default)."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


# --- the file's invariants ----------------------------------------------------


def test_every_node_service_reserves_its_own_nvidia_gpu(compose):
    gpus = []
    for name in NODE_SERVICES:
        service = compose["services"][name]
        assert "--device=cuda:0" in service["command"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert len(device["device_ids"]) == 1
        gpus += device["device_ids"]
    assert len(set(gpus)) == len(gpus), "nodes would share a GPU and both size the pool from it"


def test_redis_and_controlplane_have_healthchecks_that_gate_their_dependents(compose):
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/health" in " ".join(services["controlplane"]["healthcheck"]["test"])
    assert services["controlplane"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in NODE_SERVICES:
        assert services[name]["depends_on"]["controlplane"]["condition"] == "service_healthy"


def test_tokens_come_from_the_host_environment():
    host = {"LIGHTPD_ADMIN_TOKEN": "admin-from-host", "LIGHTPD_CLUSTER_TOKEN": "cluster-from-host"}
    services = load_compose(host)["services"]
    assert services["controlplane"]["environment"]["LIGHTPD_ADMIN_TOKEN"] == "admin-from-host"
    for name in ("controlplane", *NODE_SERVICES):
        assert services[name]["environment"]["LIGHTPD_CLUSTER_TOKEN"] == "cluster-from-host"


def test_controlplane_listens_beyond_loopback_on_the_published_port(compose):
    controlplane = compose["services"]["controlplane"]
    assert controlplane["environment"]["LIGHTPD_HOST"] == "0.0.0.0"
    assert f"8000:{controlplane['environment']['LIGHTPD_PORT']}" in controlplane["ports"]


def test_model_volume_is_mounted_read_only_where_every_process_reads_it(compose):
    for name in ("controlplane", *NODE_SERVICES):
        service = compose["services"][name]
        assert f"./.cache/models/tiny-llama:{MODEL_TARGET}:ro" in service["volumes"]
    assert compose["services"]["controlplane"]["environment"]["LIGHTPD_MODEL"] == MODEL_TARGET
    for name in NODE_SERVICES:
        assert f"--model={MODEL_TARGET}" in compose["services"][name]["command"]


# --- the fleet, run from the file ---------------------------------------------


@dataclass
class LocalMapping:
    """How a service's strings change when it runs here instead of in its container."""

    hostnames: tuple[str, ...]
    model_dir: str
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (service, port) -> local

    def port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            self.ports[service, port] = free_port()
        return self.ports[service, port]

    def text(self, service: str, value: str) -> str:
        def endpoint(match: re.Match) -> str:
            host = service if match[1] == "localhost" else match[1]
            return f"127.0.0.1:{self.port(host, int(match[2]))}"

        hosts = "|".join(map(re.escape, (*self.hostnames, "localhost")))
        value = re.sub(rf"\b({hosts}):(\d+)\b", endpoint, value)
        return value.replace(MODEL_TARGET, self.model_dir)

    def command(self, service: str, command: list[str]) -> list[str]:
        local = []
        for arg in command:
            if own_port := _OWN_PORT_OPTION.match(arg):
                arg = f"{own_port[1]}={self.port(service, int(own_port[2]))}"
            elif arg == f"--host={service}":
                arg = "--host=127.0.0.1"
            elif arg.startswith("--device=cuda"):
                arg = "--device=cpu"
            local.append(self.text(service, arg))
        if local[0] == "python":
            local[0] = sys.executable
        return local

    def environment(self, service: str, env: Mapping[str, str]) -> dict[str, str]:
        local = {key: self.text(service, str(value)) for key, value in env.items()}
        if "LIGHTPD_PORT" in local:
            local["LIGHTPD_PORT"] = str(self.port(service, int(local["LIGHTPD_PORT"])))
        if local.get("LIGHTPD_HOST") == "0.0.0.0":
            local["LIGHTPD_HOST"] = "127.0.0.1"
        return local


@dataclass
class LocalFleet:
    compose: dict
    mapping: LocalMapping
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str) -> None:
        service = self.compose["services"][name]
        for dependency, rule in service.get("depends_on", {}).items():
            if rule.get("condition") == "service_healthy":
                self.wait_healthy(dependency)
        host_env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
        env = {**host_env, "PYTHONUNBUFFERED": "1"}
        env |= self.mapping.environment(name, service.get("environment", {}))
        with open(self.logs / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(
                self.mapping.command(name, service["command"]),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=COMPOSE_FILE.parent,
            )

    def wait_healthy(self, name: str) -> None:
        if name not in self.processes:  # redis: EmbeddedRedis answered PING when it started
            return
        test = self.compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        check = self.mapping.command(name, test[1:])
        self.wait_for(lambda: subprocess.run(check, capture_output=True).returncode == 0, name)

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited early\n{self.log_tails()}"
            assert time.monotonic() < deadline, f"{what} not ready in time\n{self.log_tails()}"
            time.sleep(0.5)

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tails(self, num_chars: int = 3000) -> str:
        return "\n".join(
            f"--- {log.stem}\n{log.read_text()[-num_chars:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def fleet(compose, tmp_path) -> Iterator[LocalFleet]:
    model_dir = str(write_tiny_checkpoint(tmp_path / "tiny-llama", "llama"))
    mapping = LocalMapping(hostnames=tuple(compose["services"]), model_dir=model_dir)
    redis_port = mapping.port("redis", 6379)
    fleet = LocalFleet(compose, mapping, logs=tmp_path)
    with EmbeddedRedis(redis_port):
        try:
            for name in ("controlplane", *NODE_SERVICES):
                fleet.start(name)
            yield fleet
        finally:
            fleet.stop()


def test_compose_fleet_serves_a_chat_completion(compose, fleet):
    env = compose["services"]["controlplane"]["environment"]
    base = f"http://127.0.0.1:{fleet.mapping.port('controlplane', int(env['LIGHTPD_PORT']))}"
    admin = {"Authorization": f"Bearer {env['LIGHTPD_ADMIN_TOKEN']}"}
    with httpx.Client(base_url=base, timeout=30.0) as http:
        fleet.wait_healthy("controlplane")
        assert http.get("/health").json() == {"status": "ok"}

        def both_nodes_ready() -> bool:
            nodes = http.get("/admin/nodes", headers=admin).raise_for_status().json()
            return {n["role"] for n in nodes if n["status"] == "ready"} == set(NODE_SERVICES)

        fleet.wait_for(both_nodes_ready, "node registration")
        reply = http.post(
            "/v1/chat/completions",
            json={
                "model": env["LIGHTPD_SERVED_MODEL_NAME"],
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
    assert reply.status_code == 200, f"{reply.text}\n{fleet.log_tails()}"
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
