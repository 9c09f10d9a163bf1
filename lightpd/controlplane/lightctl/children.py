"""The processes a `lightctl up` started: the signals that stop it, stopping them all
on every exit path, and the cause of a failure, from a child's log."""

import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from lightpd.controlplane.lightctl.common import FleetHome
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis
from lightpd.controlplane.lightctl.node_process import NodeProcess

LOG_LINES = 5  # of a failed process's log, shown as its cause


class Stopped(Exception):
    """SIGINT, SIGTERM or SIGHUP asked `lightctl up` to stop."""


class StopSignals:
    """`lightctl up` handles its stop signals itself, whatever it inherited: started
    with `nohup` or `&`, SIGINT arrives ignored. The first signal raises Stopped;
    any later one, while the fleet stops, makes it kill what is left at once."""

    def __init__(self) -> None:
        self.hurry = False
        self._signals: list[signal.Signals] = []

    def install(self) -> None:
        # A SIGHUP that `nohup` ignores stays ignored: that is what nohup is for.
        hangup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
        self._signals = [signal.SIGINT, signal.SIGTERM, *hangup]
        for sig in self._signals:
            signal.signal(sig, self._stop)

    def stopping(self) -> None:
        """From now on a signal hurries the stop rather than interrupting it."""
        for sig in self._signals:
            signal.signal(sig, self._hurry)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping()
        raise Stopped(signal.Signals(signum).name)

    def _hurry(self, signum: int, frame: FrameType | None) -> None:
        self.hurry = True


class Children:
    """Every process this `lightctl up` started, and how to stop them all."""

    def __init__(self, signals: StopSignals, fleet: FleetHome) -> None:
        self.signals = signals
        self.fleet = fleet
        self.redis: EmbeddedRedis | None = None
        self.control_plane: subprocess.Popen | None = None
        self.nodes: list[tuple[str, NodeProcess, Path]] = []  # (name, node, its log)
        self.node_starts: dict[str, Any] = {}  # name: how lightctl up started it

    def first_exited(self) -> tuple[str, subprocess.Popen] | None:
        if self.control_plane is not None and self.control_plane.poll() is not None:
            return "the control plane", self.control_plane
        for name, node, _ in self.nodes:
            if node.process.poll() is not None:
                return name, node.process
        return None

    def log_of(self, name: str) -> Path:
        logs = {node_name: log for node_name, _, log in self.nodes}
        return logs.get(name, self.fleet.logs / "controlplane.log")

    def stop(self, url: str, admin_token: str) -> None:
        """Nodes first (all at once), then the control plane, then Redis, then any
        child caught starting (a node still loading when the signal came)."""
        self._end([node.process for _, node, _ in self.nodes], timeout=10)
        if self.control_plane is not None and self.control_plane.poll() is None:
            forget_nodes(url, admin_token, [node.node_id for _, node, _ in self.nodes])
        if self.control_plane is not None:
            self._end([self.control_plane], timeout=15)
        if self.redis is not None:
            self.redis.stop()
        self.end_strays()

    def end_strays(self) -> None:
        """Stop any child not stopped above: one caught starting (a node still
        loading when the signal came, or being started again)."""
        for pid in _child_pids():
            _end_stray(pid)

    def _end(self, processes: list[subprocess.Popen], timeout: float) -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes):
            if self.signals.hurry or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def exit_cause(name: str, process: subprocess.Popen, log: Path) -> str:
    return f"{name} exited with code {process.returncode}" + log_tail(log)


def log_tail(log: Path) -> str:
    """The last lines of a child's log (its error, the end of a traceback)."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    shown = "".join(f"\n    {line}" for line in lines[-LOG_LINES:])
    return f":{shown}\n  (log: {log})" if shown else f" (log: {log})"


def forget_nodes(url: str, admin_token: str, node_ids: list[str]) -> None:
    """Take the stopped nodes out of the registry, which Redis keeps on disk: they left
    on purpose, and the next `lightctl up` should not list them as dead."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    for node_id in node_ids:
        try:
            httpx.delete(f"{url}/admin/nodes/{node_id}", headers=headers, timeout=2)
        except httpx.HTTPError:
            return  # the control plane is gone already; the records expire in a day


def _child_pids() -> list[int]:
    """This process's children, from /proc (Linux): a node whose start a signal
    interrupted is one, though start_node never returned its handle."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        if fields[1] == me:
            found.append(int(stat.parent.name))
    return found


def _end_stray(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.05)
    except (ProcessLookupError, ChildProcessError):
        pass  # gone, or reaped already
