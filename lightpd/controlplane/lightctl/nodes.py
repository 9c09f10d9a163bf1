"""lightctl node add|list|drain|undrain|remove and lightctl status."""

import os
import sys
from pathlib import Path
from typing import Annotated

import httpx
import typer

from lightpd.common.kv_transports import TRANSPORT_HELP, check_transport
from lightpd.controlplane.lightctl.common import (
    admin_request,
    control_plane_url,
    ensure_default_model,
    fail,
    token,
)

node_app = typer.Typer(help="Manage the fleet's nodes.", no_args_is_help=True)
Url = Annotated[str | None, typer.Option("--control-plane", help="Control plane URL.")]
AdminTokenOpt = Annotated[str | None, typer.Option("--admin-token", help="Admin token.")]


@node_app.command("add")
def node_add(
    role: Annotated[str, typer.Option(help="prefill or decode.")],
    model: Annotated[Path | None, typer.Option(help="Model directory (the fleet's).")] = None,
    device: Annotated[str, typer.Option(help="cuda:N, cpu or auto.")] = "auto",
    control_plane: Url = None,
    cluster_token: Annotated[str | None, typer.Option(help="Cluster token.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind and advertise.")] = "127.0.0.1",
    num_kv_slots: Annotated[int | None, typer.Option(help="KV pool size in tokens.")] = None,
    kv_transport: Annotated[str, typer.Option(help=TRANSPORT_HELP)] = "auto",
    expert_parallel: Annotated[
        int,
        typer.Option(
            help="MoE models: start N decode nodes here that form one expert-parallel "
            "group, each holding 1/N of every MoE layer's experts; --device then takes "
            "N devices, comma-separated (auto: the GPUs in turn, else the CPU)."
        ),
    ] = 1,
) -> None:
    """Start a node here that joins the fleet and takes work (runs until Ctrl-C)."""
    if role not in ("prefill", "decode"):
        raise fail(f"--role must be prefill or decode, not {role!r}")
    if expert_parallel != 1 and (role != "decode" or expert_parallel < 2):
        raise fail("--expert-parallel N takes a decode role and N of 2 or more")
    devices = _group_devices(device, expert_parallel)
    if model is None:
        model = ensure_default_model()
    if not (model / "config.json").is_file():
        raise fail(f"model directory {model} not found (no config.json there)")
    for each in devices:
        _check_device(each)
    url = control_plane_url(control_plane)
    cluster = token(cluster_token, "cluster_token")
    if not cluster:
        raise fail("no cluster token: pass --cluster-token or set LIGHTPD_CLUSTER_TOKEN")
    try:
        httpx.get(f"{url}/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach the control plane at {url}: {exc}") from exc
    args = [
        sys.executable,
        "-m",
        f"lightpd.{role}_node",
        "--model",
        str(model),
        "--host",
        host,
        "--control-plane",
        url,
    ]
    if num_kv_slots:
        args += ["--num-kv-slots", str(num_kv_slots)]
    try:
        check_transport(kv_transport)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    args += ["--kv-transport", kv_transport]
    os.environ["LIGHTPD_CLUSTER_TOKEN"] = cluster
    if expert_parallel > 1:
        raise typer.Exit(_run_group(args, devices, host))
    os.execv(sys.executable, [*args, "--device", device])  # the node takes this process over


def _group_devices(device: str, size: int) -> list[str]:
    """The device of each member of a group of ``size`` (one for a lone node)."""
    if size == 1:
        return [device]
    if device == "auto":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" if count else "cpu" for i in range(size)]
    devices = device.split(",")
    if len(devices) == 1:
        return devices * size
    if len(devices) != size:
        raise fail(f"--device names {len(devices)} devices for a group of {size}")
    return devices


def _run_group(args: list[str], devices: list[str], host: str) -> int:
    """Run the members of an expert-parallel group here (they meet at a free port of
    ``host``, member 0 listening) until a signal; when one ends, the others do too
    (a member alone holds only part of the model). Returns 0 once stopped by a
    signal, else the exit code of the member that ended first."""
    import signal
    import subprocess
    import time

    from lightpd.controlplane.lightctl.embedded_redis import free_port

    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # one to connect to
    group = ["--ep-size", str(len(devices)), "--ep-init", f"{host}:{free_port(host)}"]
    members = [
        subprocess.Popen([*args, *group, "--device", device, "--ep-rank", str(rank)])
        for rank, device in enumerate(devices)
    ]
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    while not stopping and all(member.poll() is None for member in members):
        time.sleep(0.2)
    ended = next((m.returncode for m in members if m.poll() is not None), 0)
    for member in members:
        if member.poll() is None:
            member.terminate()
    deadline = time.monotonic() + 10
    for member in members:
        try:
            member.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            member.kill()
            member.wait()
    return 0 if stopping else ended


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise fail(f"device {device} absent: this machine has {torch.cuda.device_count()} GPU(s)")


@node_app.command("list")
def node_list(control_plane: Url = None, admin_token: AdminTokenOpt = None) -> None:
    """The fleet's nodes with their load."""
    url = control_plane_url(control_plane)
    nodes = admin_request("GET", url, "/admin/nodes", token(admin_token, "admin_token"))
    _print_nodes(nodes)


@node_app.command("drain")
def node_drain(
    node_id: str,
    migrate: Annotated[
        bool, typer.Option(help="Move its running requests to other decode nodes now.")
    ] = False,
    control_plane: Url = None,
    admin_token: AdminTokenOpt = None,
) -> None:
    """Send a node no new requests; its running ones finish there, or with --migrate
    continue on other decode nodes at once (the node is then empty)."""
    url = control_plane_url(control_plane)
    path = f"/admin/nodes/{node_id}/drain" + ("?migrate=true" if migrate else "")
    reply = admin_request("POST", url, path, token(admin_token, "admin_token"))
    typer.echo(f"{node_id}: {reply['status']}")


@node_app.command("undrain")
def node_undrain(
    node_id: str, control_plane: Url = None, admin_token: AdminTokenOpt = None
) -> None:
    """Let a draining or migrating node take new requests again."""
    url = control_plane_url(control_plane)
    path = f"/admin/nodes/{node_id}/undrain"
    reply = admin_request("POST", url, path, token(admin_token, "admin_token"))
    typer.echo(f"{node_id}: {reply['status']}")


@node_app.command("remove")
def node_remove(node_id: str, control_plane: Url = None, admin_token: AdminTokenOpt = None) -> None:
    """Take a node out of the fleet; it stops at its next heartbeat."""
    url = control_plane_url(control_plane)
    admin_request("DELETE", url, f"/admin/nodes/{node_id}", token(admin_token, "admin_token"))
    typer.echo(f"{node_id}: removed")


def status(control_plane: Url = None, admin_token: AdminTokenOpt = None) -> None:
    """Nodes and cluster figures."""
    url = control_plane_url(control_plane)
    admin = token(admin_token, "admin_token")
    stats = admin_request("GET", url, "/admin/stats", admin)
    _print_nodes(admin_request("GET", url, "/admin/nodes", admin))
    typer.echo(f"\nmodel {stats['model']}, running requests: {stats['running_requests']}")
    for role, figures in sorted(stats["roles"].items()):
        typer.echo(
            f"{role}: {figures['ready']}/{figures['nodes']} ready, "
            f"{figures['free_slots']}/{figures['slots']} slots free, "
            f"{figures['running']} running, {figures['queued']} queued, "
            f"{figures['tokens_per_s']:.1f} tok/s"
        )


def _print_nodes(nodes: list[dict]) -> None:
    header = (
        f"{'NODE':<28} {'ROLE':<8} {'STATUS':<9} {'DEVICE':<8} {'KV':<5} {'FREE/SLOTS':>13} "
        f"{'RUN':>4} {'QUEUE':>5} {'TOK/S':>8} {'CACHED':>14} {'RESTARTS':>8}  EP"
    )
    typer.echo(header)
    for n in nodes:
        s = n.get("stats") or {}
        typer.echo(
            f"{n['node_id']:<28} {n['role']:<8} {n['status']:<9} {n['device']:<8} "
            f"{n.get('kv_transport', 'zmq'):<5} "
            f"{str(s.get('num_free_slots', '-')) + '/' + str(n['num_slots']):>13} "
            f"{s.get('num_running', '-'):>4} {s.get('num_queued', '-'):>5} "
            f"{s.get('tokens_per_s', 0.0):>8.1f} {_cache_hits(s):>14} {n.get('restarts', 0):>8}  "
            f"{_expert_parallel(n)}"
        )


def _cache_hits(stats: dict) -> str:
    """Prompt tokens the node found in its prefix cache, and their share of all."""
    prompt, cached = stats.get("num_prompt_tokens", 0), stats.get("num_cached_prompt_tokens", 0)
    if not prompt:
        return "-"
    return f"{cached} ({100 * cached / prompt:.0f}%)"


def _expert_parallel(node: dict) -> str:
    """A member of an expert-parallel group: its rank/size@group (where it meets)."""
    if not node.get("ep_group"):
        return "-"
    return f"{node['ep_rank']}/{node['ep_size']}@{node['ep_group']}"
