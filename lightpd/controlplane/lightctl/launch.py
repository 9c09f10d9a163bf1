"""Starting what `lightctl up` runs, each until it answers: the fleet's Redis, the
control plane, and the nodes (one by one, or an expert-parallel group together).
Each step prints a progress line; a start that fails ends `lightctl up` with its
cause (``fail``), and stopping what did start is ``up``'s."""

import fcntl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from lightpd.controlplane.lightctl.children import Children, exit_cause, log_tail
from lightpd.controlplane.lightctl.common import FleetHome, fail, home, say
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis, free_port, redis_password
from lightpd.controlplane.lightctl.node_process import NodeStart, start_node

NODE_START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a GPU takes minutes


@dataclass(frozen=True)
class NodeOptions:
    num_prefill: int
    num_decode: int
    num_kv_slots: int | None
    max_model_len: int | None
    kv_transport: str
    expert_parallel: bool = False  # the decode nodes form one expert-parallel group


def step(message: str) -> float:
    say(f"  {message} ...", nl=False)
    return time.monotonic()


def done(started: float) -> None:
    say(f" ok ({time.monotonic() - started:.1f} s)")


def client_url(host: str, port: int) -> str:
    """Where this machine reaches the control plane (a wildcard address is no target)."""
    host = client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client_host(host: str) -> str:
    """The address of this machine's ``host`` that a client can connect to."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def start_redis(children: Children, cluster_token: str) -> str:
    """Start the fleet's own Redis; its URL. Its data (API keys, request history)
    persists in the fleet's folder, so it outlives a restart of Redis and of the fleet."""
    fleet = children.fleet
    _adopt_old_redis_data(fleet)
    started = step(f"starting redis (data in {fleet.redis_data})")
    password = redis_password(cluster_token)
    children.redis = EmbeddedRedis(data_dir=fleet.redis_data, password=password)
    try:
        children.redis.start()
    except RuntimeError as exc:  # no redis-server, or it would not start
        say()
        raise fail(str(exc), code=1) from None
    done(started)
    return children.redis.url


def _adopt_old_redis_data(fleet: FleetHome) -> None:
    """lightctl before per-fleet folders kept one Redis folder for all fleets: the
    first fleet started since takes it over (its API keys and history)."""
    shared = home() / "redis"
    if not shared.is_dir() or fleet.redis_data.exists():
        return
    try:
        with open(shared / "lightpd.lock", "a") as lock:  # a live server holds it
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shared.rename(fleet.redis_data)
    except OSError:  # in use by an older lightctl up, or taken by another fleet
        return
    say(f"  moved the Redis data of an earlier lightctl up to {fleet.redis_data}")


def control_plane_starter(
    children: Children, env: dict[str, str], url: str, admin_token: str
) -> Callable[[int], subprocess.Popen]:
    """How to start the control plane (and start it again): it returns once the
    process answers at ``url``."""
    log = children.fleet.logs / "controlplane.log"

    def start_control_plane(restarts: int = 0) -> subprocess.Popen:
        with open(log, "ab") as out:
            command = [sys.executable, "-m", "lightpd.controlplane"]
            children.control_plane = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        _wait_control_plane(url, admin_token, children.control_plane, log)
        return children.control_plane

    return start_control_plane


def _wait_control_plane(
    url: str, admin_token: str, process: subprocess.Popen, log: Path, timeout: float = 60
) -> None:
    """Until our control plane answers with our token. Another server on the port
    answers no such thing, and ours then exits with the reason in its log."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {admin_token}"}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            say()
            raise fail(exit_cause("the control plane", process, log), code=1)
        try:
            if httpx.get(f"{url}/admin/nodes", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    say()
    raise fail("the control plane did not answer in time" + log_tail(log), code=1)


def start_nodes(
    children: Children, nodes: NodeOptions, model: Path, host: str, url: str, cluster_token: str
) -> None:
    roles = ["prefill"] * nodes.num_prefill + ["decode"] * nodes.num_decode
    extra = ["--host", host, "--control-plane", url, "--kv-transport", nodes.kv_transport]
    if nodes.num_kv_slots:
        extra += ["--num-kv-slots", str(nodes.num_kv_slots)]
    if nodes.max_model_len:
        extra += ["--max-model-len", str(nodes.max_model_len)]
    group = []  # the decode nodes of an expert-parallel group, started together
    if nodes.expert_parallel:  # where they meet: member 0 listens there
        init = f"{client_host(host)}:{free_port(client_host(host))}"
    for i, (role, device) in enumerate(zip(roles, _devices(len(roles)), strict=True)):
        number = i if role == "prefill" else i - nodes.num_prefill
        name = f"the {role} node {number}"
        if role == "decode" and nodes.expert_parallel:
            ep = ["--ep-size", str(nodes.num_decode), "--ep-rank", str(number), "--ep-init", init]
            group.append(NodeStart(name, role, number, device, [*extra, *ep]))
            continue
        node = NodeStart(name, role, number, device, extra)
        started = step(f"starting {role} node {number} on {device}")
        _start(children, node, model, cluster_token)
        done(started)
    if group:
        devices = ", ".join(node.device for node in group)
        started = step(f"starting an expert-parallel group of decode nodes on {devices}")
        _start_together(children, group, model, cluster_token)
        done(started)


def _start(children: Children, node: NodeStart, model: Path, cluster_token: str) -> None:
    log = children.fleet.logs / f"{node.role}-{node.number}.log"
    try:
        started = start_node(
            node.role,
            str(model),
            *node.args,
            device=node.device,
            log=log,
            cluster_token=cluster_token,
            timeout=NODE_START_TIMEOUT_S,
        )
    except RuntimeError as exc:  # it exited, or was not ready in time
        say()
        raise fail(f"{node.name} did not start: {exc}" + log_tail(log), code=1) from None
    children.nodes.append((node.name, started, log))
    children.node_starts[node.name] = node


def _start_together(
    children: Children, nodes: list[NodeStart], model: Path, cluster_token: str
) -> None:
    """Start nodes that wait for each other (the members of a group): at once, each
    in a thread; the first that fails ends the start (stopping the fleet ends the
    others, started or not)."""
    failures: list[BaseException] = []

    def start(node: NodeStart) -> None:
        try:
            _start(children, node, model, cluster_token)
        except BaseException as exc:  # typer.Exit from fail, after its message
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(node,), daemon=True) for node in nodes]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads) and not failures:
        time.sleep(0.1)
    if failures:
        raise failures[0]


def _devices(num_nodes: int) -> list[str]:
    """A device for each of ``num_nodes`` nodes: the visible GPUs in turn, else the CPU."""
    import torch  # here, not at the top: the other commands need no torch

    count = torch.cuda.device_count()
    if count == 0:
        return ["cpu"] * num_nodes
    return [f"cuda:{i % count}" for i in range(num_nodes)]


def wait_for_nodes(url: str, admin_token: str, children: Children, timeout: float = 60) -> None:
    node_ids = {node.node_id for _, node, _ in children.nodes}
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {admin_token}"}
    while time.monotonic() < deadline:
        if exited := children.first_exited():
            name, process = exited
            raise fail(exit_cause(name, process, children.log_of(name)), code=1)
        try:
            reply = httpx.get(f"{url}/admin/nodes", headers=headers, timeout=5)
            if reply.status_code == 200 and node_ids <= {n["node_id"] for n in reply.json()}:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise fail("the nodes did not register with the control plane in time", code=1)
