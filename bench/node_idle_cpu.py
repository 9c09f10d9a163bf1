"""How much CPU an idle node burns (issue 13: under 5% of a core, no busy polling).

    .venv/bin/python -m bench.node_idle_cpu [--model DIR] [--seconds 20]

Starts a prefill node, two decode nodes (ZeroMQ and collective KV transport) and
the two decode nodes of an expert-parallel group on the CPU with a tiny MoE model,
lets them settle, and prints each one's CPU time over ``--seconds`` of idling as a
share of one core. (An idle group's members agree on every poll: each agreement,
a Gloo all-gather, costs about 0.5 ms of CPU.)
"""

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.serving_fleet import cpu_seconds
from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.controlplane.lightctl.embedded_redis import free_port
from lightpd.controlplane.lightctl.node_process import start_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    model = args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(), "qwen3_moe"))
    shapes = (("prefill", "zmq"), ("decode", "zmq"), ("decode", "nccl"))
    group = ("--ep-size", "2", "--ep-init", f"127.0.0.1:{free_port()}")

    def start(role: str, transport: str, *more: str):
        return start_node(
            role,
            model,
            "--num-kv-slots",
            "4096",
            "--kv-transport",
            transport,
            *more,
            cluster_token="idle-cpu-bench",
        )

    nodes = []
    try:
        for role, transport in shapes:
            nodes.append(start(role, transport))
        with ThreadPoolExecutor(2) as pool:  # the members wait for each other
            nodes += pool.map(lambda r: start("decode", "zmq", *group, "--ep-rank", str(r)), (0, 1))
        shapes += (("decode, expert-parallel 0/2", "zmq"), ("decode, expert-parallel 1/2", "zmq"))
        time.sleep(3)
        before = [cpu_seconds(n.process.pid) for n in nodes]
        time.sleep(args.seconds)
        after = [cpu_seconds(n.process.pid) for n in nodes]
        print("| node | KV transport | CPU while idle |")
        print("| --- | --- | --- |")
        for (role, transport), b, a in zip(shapes, before, after, strict=True):
            print(f"| {role} | {transport} | {(a - b) / args.seconds * 100:.1f}% of a core |")
    finally:
        for node in nodes:
            node.stop()


if __name__ == "__main__":
    main()
