"""How much CPU an idle node burns (issue 13: under 5% of a core, no busy polling).

    .venv/bin/python -m bench.node_idle_cpu [--model DIR] [--seconds 20]

Starts a prefill node and two decode nodes (ZeroMQ and collective KV transport)
on the CPU with a tiny model, lets them settle, and prints each one's CPU time
over ``--seconds`` of idling as a share of one core.
"""

import argparse
import tempfile
import time

from bench.serving_fleet import cpu_seconds
from common.tiny import write_tiny_checkpoint
from controlplane.node_process import start_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    model = args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(), "llama"))
    shapes = (("prefill", "zmq"), ("decode", "zmq"), ("decode", "nccl"))
    nodes = []
    try:
        for role, transport in shapes:
            nodes.append(
                start_node(
                    role,
                    model,
                    "--num-kv-slots",
                    "4096",
                    "--kv-transport",
                    transport,
                    cluster_token="idle-cpu-bench",
                )
            )
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
