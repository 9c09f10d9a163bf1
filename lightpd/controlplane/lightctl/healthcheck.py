"""``python -m lightpd.controlplane.lightctl.healthcheck ENDPOINT``: is the node at ENDPOINT
serving?

A container health check for nodes, which have no HTTP port (compose.yaml). It asks
the node over its control socket, as a control plane does (CURVE keys from
LIGHTPD_CLUSTER_TOKEN), and exits 0 only if the node answers in time, has the role
asked for, and its serving loop went round recently. It prints one line either way,
which ``docker inspect`` shows. Loads neither torch nor the model.
"""

import argparse
import asyncio
import os
import sys

from lightpd.controlplane.node_client import NodeClient, NodeError, NodeTimeout

# As the control plane's default LIGHTPD_NODE_STALL_S: a loop stuck this long is dead.
STALL_S = 30.0


async def check(endpoint: str, cluster_token: str, role: str | None, timeout_s: float) -> str:
    """What a healthy node says of itself; raises NodeError if it is not healthy."""
    async with NodeClient(cluster_token) as client:
        try:
            status = await client.health(endpoint, timeout=timeout_s)
        except NodeTimeout as exc:  # CURVE drops a peer with another token without a word
            raise NodeError(f"{exc} (down, still loading, or another cluster token)") from exc
    stats = status.stats
    if role is not None and status.role != role:
        raise NodeError(f"{endpoint} is a {status.role} node, not a {role} node")
    if stats.loop_age_s > STALL_S:
        raise NodeError(f"the serving loop of {status.node_id} is stuck ({stats.loop_age_s:.0f} s)")
    return (
        f"{status.role} node {status.node_id}: {stats.num_running} running, "
        f"{stats.num_free_slots} of {status.num_slots} KV slots free"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightpd.controlplane.lightctl.healthcheck",
        description="Exit 0 if the node at ENDPOINT answers a health check and serves.",
    )
    parser.add_argument("endpoint", help="the node's control endpoint, e.g. tcp://prefill:7100")
    parser.add_argument("--role", choices=("prefill", "decode"), help="the role it must have")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="how long to wait")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster_token = os.environ.get("LIGHTPD_CLUSTER_TOKEN")
    if not cluster_token:
        print("unhealthy: LIGHTPD_CLUSTER_TOKEN is not set", file=sys.stderr)
        return 1
    try:
        line = asyncio.run(check(args.endpoint, cluster_token, args.role, args.timeout_s))
    except NodeError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
