"""A whole fleet on this machine for serving benchmarks, with a command run against it.

    python3 bench/serving_fleet.py --model DIR [--devices cuda:0,cuda:1] \
        [--prefill-nodes 1] [--decode-nodes 1] [--kv-transport auto] \
        [--prefill-args "--num-kv-slots 49152"] [--decode-args "..."] [--logs DIR] \
        [--expert-parallel] -- COMMAND ...

Starts an embedded Redis, the control plane, the prefill nodes and then the
decode nodes, each on the next of ``--devices`` in turn (nodes that land on one
GPU share it), waits until every node is registered, runs COMMAND with
``LIGHTPD_BENCH_URL``, ``OPENAI_API_KEY`` and ``LIGHTPD_BENCH_PIDS`` set, stops
everything and exits with COMMAND's status. With no prefill node the decode
nodes prefill themselves (a colocated fleet). With ``--expert-parallel`` the
decode nodes (an MoE model, two or more) form one expert-parallel group, started
together as `lightctl up --expert-parallel` starts them. This is the test
suite's LocalFleet with devices, per-role node options and log files.

    python3 bench/serving_fleet.py --cpu-of "$LIGHTPD_BENCH_PIDS"

prints the CPU seconds each fleet process has used so far, as JSON (take two
and subtract, to see which process a run kept busy).

    python3 bench/serving_fleet.py --phases-of "$LIGHTPD_BENCH_URL" --last N

prints where the last N requests' time to first token went, from the state
timelines the control plane keeps (p50 and p90 of each step, in ms): queued ->
prefilling (waiting for the decode node's slots), prefilling -> transferring
(the prefill node computing the prompt), transferring -> decoding (the KV
hand-off and the first token), or queued -> decoding where a node prefills
locally.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from lightpd.controlplane.lightctl.embedded_redis import free_port
from lightpd.controlplane.lightctl.node_process import NodeProcess, start_node
from tests.e2e.fleet import ADMIN_TOKEN, API_KEY, CLUSTER_TOKEN, LocalFleet

PHASES = (
    ("queued", "prefilling"),
    ("prefilling", "transferring"),
    ("transferring", "decoding"),
    ("queued", "decoding"),
)


@dataclass
class BenchFleet(LocalFleet):
    devices: tuple[str, ...] = ("cpu",)
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    log_dir: Path | None = None
    node_start_timeout_s: float = 900.0  # a GPU node loads weights and captures graphs
    expert_parallel: bool = False  # the decode nodes form one expert-parallel group

    def __post_init__(self) -> None:
        if self.log_dir is not None:
            self.control_plane_log = self.log_dir / "controlplane.log"

    def start(self, prefill: int = 1, decode: int = 1) -> "BenchFleet":
        if not self.expert_parallel:
            return super().start(prefill, decode)
        super().start(prefill, 0)
        self.add_group(decode)
        return self

    def add_group(self, size: int) -> list[NodeProcess]:
        """``size`` decode nodes of one expert-parallel group, started at once (each
        waits in its engine for the others)."""
        init = f"127.0.0.1:{free_port()}"
        first = sum(node.role == "decode" for node in self.nodes)

        def member(rank: int) -> NodeProcess:
            group = ("--ep-size", str(size), "--ep-rank", str(rank), "--ep-init", init)
            return self._start("decode", first + rank, len(self.nodes) + rank, group)

        with ThreadPoolExecutor(size) as pool:
            members = list(pool.map(member, range(size)))
        self.nodes += members
        ids = {node.node_id for node in members}
        self.wait_for(lambda nodes: ids <= {n["node_id"] for n in nodes})
        return members

    def add_node(self, role: str) -> NodeProcess:
        index = sum(node.role == role for node in self.nodes)
        node = self._start(role, index, len(self.nodes))
        self.nodes.append(node)
        self.wait_for(lambda nodes: node.node_id in {n["node_id"] for n in nodes})
        return node

    def _start(self, role: str, index: int, number: int, more: tuple[str, ...] = ()) -> NodeProcess:
        """Start ``role`` node ``index``, the fleet's ``number``-th node (which picks
        its device from ``devices`` in turn)."""
        os.environ["LIGHTPD_CLUSTER_TOKEN"] = CLUSTER_TOKEN
        args = self.prefill_args if role == "prefill" else self.decode_args
        log = self.log_dir / f"{role}{index}.log" if self.log_dir else None
        return start_node(
            role,
            self.model,
            "--control-plane",
            self.url,
            *args,
            *more,
            device=self.devices[number % len(self.devices)],
            log=log,
            timeout=self.node_start_timeout_s,
        )

    def pids(self) -> dict[str, int]:
        """Process ids by part: redis, controlplane, prefill0, ..., decode0, ..."""
        pids = {"redis": self.redis.process.pid, "controlplane": self.control_plane.pid}
        counts: dict[str, int] = {}
        for node in self.nodes:
            index = counts[node.role] = counts.get(node.role, -1) + 1
            pids[f"{node.role}{index}"] = node.process.pid
        return pids


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (later threads inherit from their creator)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a whole process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_report(pids: str) -> dict:
    """``"part=pid,..."`` -> the time now and each part's CPU seconds so far."""
    parts = dict(item.split("=") for item in pids.split(","))
    return {"time": time.time(), "cpu_s": {k: cpu_seconds(int(v)) for k, v in parts.items()}}


def phases(url: str, last: int) -> dict[str, dict[str, float]]:
    """p50 and p90 (ms) of each timeline step over the last ``last`` requests."""
    reply = httpx.get(
        f"{url}/admin/requests",
        params={"limit": last},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    reply.raise_for_status()
    steps: dict[str, list[float]] = {}
    for request in reply.json():
        at = {step["state"]: step["at"] for step in request["timeline"]}
        for begin, end in PHASES:
            if begin in at and end in at:
                steps.setdefault(f"{begin}->{end}", []).append(1000 * (at[end] - at[begin]))
    return {
        name: {
            "n": len(ms),
            "p50": statistics.median(ms),
            "p90": statistics.quantiles(ms, n=10)[-1] if len(ms) > 1 else ms[0],
        }
        for name, ms in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-of", help="print the CPU seconds of these fleet processes")
    parser.add_argument("--phases-of", metavar="URL", help="print where TTFT went")
    parser.add_argument("--last", type=int, default=100, help="requests --phases-of reads")
    parser.add_argument("--model")
    parser.add_argument("--devices", default="cpu", help="comma-separated, used in turn")
    parser.add_argument("--prefill-nodes", type=int, default=1)
    parser.add_argument("--decode-nodes", type=int, default=1)
    parser.add_argument("--kv-transport", default="auto", choices=("auto", "zmq", "nccl"))
    parser.add_argument("--prefill-args", default="", help="extra prefill node options")
    parser.add_argument("--decode-args", default="", help="extra decode node options")
    parser.add_argument("--logs", type=Path, help="folder for the nodes' logs")
    parser.add_argument(
        "--expert-parallel", action="store_true", help="the decode nodes form one group (MoE)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="LIGHTPD_NAME=VALUE",
        help="a control-plane setting (repeatable); LIGHTPD_LOCAL_PREFILL_TOKENS is 0 unless set",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.cpu_of:
        print(json.dumps(cpu_report(args.cpu_of)))
        return
    if args.phases_of:
        print(json.dumps(phases(args.phases_of, args.last)))
        return
    if not args.model:
        parser.error("--model is needed to start a fleet")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    fleet = BenchFleet(
        args.model,
        node_args=(),
        devices=tuple(args.devices.split(",")),
        prefill_args=(*shlex.split(args.prefill_args), "--kv-transport", args.kv_transport),
        decode_args=(*shlex.split(args.decode_args), "--kv-transport", args.kv_transport),
        log_dir=args.logs,
        expert_parallel=args.expert_parallel,
        settings=dict(setting.split("=", 1) for setting in args.setting),
    )
    try:
        fleet.start(prefill=args.prefill_nodes, decode=args.decode_nodes)
        print(f"fleet up at {fleet.url}: {fleet.pids()}", flush=True)
        pids = ",".join(f"{part}={pid}" for part, pid in fleet.pids().items())
        env = {
            **os.environ,
            "LIGHTPD_BENCH_URL": fleet.url,
            "OPENAI_API_KEY": API_KEY,
            "LIGHTPD_BENCH_PIDS": pids,
        }
        status = subprocess.run(command, env=env).returncode
    finally:
        fleet.stop()
    sys.exit(status)


if __name__ == "__main__":
    main()
