"""compose.yaml without Docker: its services run as local processes on CPU.

Each service's command and environment are taken from the file as Compose would
interpolate them, then moved onto this machine: Redis becomes an EmbeddedRedis,
service hostnames become 127.0.0.1, every service port a free local port,
`--device=cuda:0` becomes `--device=cpu`, each named volume a folder, and each
mount point the folder of what is mounted there. The order and the waits follow
`depends_on`: a one-shot service must exit 0, a long-running one pass its health
check, which runs as the same command line moved the same way.
"""

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lightpd.controlplane.lightctl.embedded_redis import free_port
from tests.deploy.compose_file import ROOT

START_TIMEOUT_S = 60.0
_OWN_PORT_OPTION = re.compile(r"^(--port|--kv-port)=(\d+)$")
BIN = Path(sys.executable).parent


@dataclass
class LocalMapping:
    """How a service's strings change when it runs here instead of in its container."""

    compose: dict
    volumes_dir: Path  # where named volumes live
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (service, port) -> local

    def port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            self.ports[service, port] = free_port()
        return self.ports[service, port]

    def mounts(self, service: str) -> dict[str, str]:
        """Mount point in the container -> folder here."""
        found = {}
        for volume in self.compose["services"][service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in self.compose.get("volumes", {}):
                (self.volumes_dir / source).mkdir(parents=True, exist_ok=True)
                source = str(self.volumes_dir / source)
            found[target] = source
        return found

    def text(self, service: str, value: str) -> str:
        def endpoint(match: re.Match) -> str:
            host = service if match[1] == "localhost" else match[1]
            return f"127.0.0.1:{self.port(host, int(match[2]))}"

        hosts = "|".join(map(re.escape, (*self.compose["services"], "localhost")))
        value = re.sub(rf"\b({hosts}):(\d+)\b", endpoint, value)
        for target, source in self.mounts(service).items():
            value = re.sub(rf"{re.escape(target)}(?![\w.-])", source, value)
        return value

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
        # The console scripts of this checkout's environment (in `sh -c` scripts too).
        return [re.sub(r"(?<![\w/.-])lightctl\b", str(BIN / "lightctl"), a) for a in local]

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

    def start_all(self, skip: tuple[str, ...] = ()) -> None:
        """Start every service but ``skip``, dependencies first."""
        started: list[str] = []

        def visit(name: str) -> None:
            if name in started or name in skip:
                return
            for dependency in self.compose["services"][name].get("depends_on", {}):
                visit(dependency)
            self.start(name)
            started.append(name)

        for name in self.compose["services"]:
            visit(name)

    def start(self, name: str) -> None:
        service = self.compose["services"][name]
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                self.wait_healthy(dependency)
            elif rule["condition"] == "service_completed_successfully":
                self.wait_completed(dependency)
        with open(self.logs / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(
                self.mapping.command(name, service["command"]),
                env=self.environment(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def environment(self, name: str) -> dict[str, str]:
        """What the service's processes see: this machine's environment, less its
        LIGHTPD_* settings, with the service's (as in its container, where its health
        check runs too)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
        env |= {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        service_env = self.compose["services"][name].get("environment", {})
        return env | self.mapping.environment(name, service_env)

    def healthcheck(self, name: str) -> list[str]:
        """The service's health check command line, moved here."""
        test = self.compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        return self.mapping.command(name, test[1:])

    def run_in(self, name: str, command: list[str], **env: str) -> subprocess.CompletedProcess:
        """Run ``command`` (moved here) as in the service's container, as Docker runs
        its health check."""
        return subprocess.run(
            command, env=self.environment(name) | env, capture_output=True, text=True, timeout=30
        )

    def run_healthcheck(self, name: str) -> subprocess.CompletedProcess:
        return self.run_in(name, self.healthcheck(name))

    def wait_healthy(self, name: str) -> None:
        if name not in self.processes:  # redis: EmbeddedRedis answered PING when it started
            return
        self.wait_for(lambda: self.run_healthcheck(name).returncode == 0, f"{name} health")

    def wait_completed(self, name: str) -> None:
        process = self.processes[name]
        self.wait_for(lambda: process.poll() is not None, f"{name} exit")
        assert process.returncode == 0, f"{name} exited {process.returncode}\n{self.log_tails()}"

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        services = self.compose["services"]
        while not ready():
            for name, process in self.processes.items():
                if services[name].get("restart") != "no":  # not a one-shot
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
