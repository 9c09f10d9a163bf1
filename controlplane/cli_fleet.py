"""lightctl up: Redis, the control plane, prefill and decode nodes on this machine."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from controlplane.cli_common import ensure_default_model, fail, fleet_file, home
from controlplane.embedded_redis import EmbeddedRedis
from controlplane.node_process import NodeProcess, start_node


def _step(message: str):
    typer.echo(f"  {message} ...", nl=False)
    return time.monotonic()


def _done(started: float) -> None:
    typer.echo(f" ok ({time.monotonic() - started:.1f} s)")


def _devices(num_nodes: int) -> list[str]:
    """A device for each of ``num_nodes`` nodes: the visible GPUs in turn, else the CPU."""
    import torch  # here, not at the top: the other commands need no torch

    count = torch.cuda.device_count()
    if count == 0:
        return ["cpu"] * num_nodes
    return [f"cuda:{i % count}" for i in range(num_nodes)]


def _wait_for_nodes(url: str, admin_token: str, node_ids: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {admin_token}"}
    while time.monotonic() < deadline:
        nodes = httpx.get(f"{url}/admin/nodes", headers=headers, timeout=5).json()
        if node_ids <= {n["node_id"] for n in nodes}:
            return
        time.sleep(0.2)
    raise fail("the nodes did not register with the control plane in time")


def up(
    model: Annotated[
        Path | None, typer.Option(help="Model directory; default: a tiny llama.")
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the OpenAI endpoint.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    num_kv_slots: Annotated[int | None, typer.Option(help="KV pool of each node, tokens.")] = None,
    prefill_nodes: Annotated[
        int, typer.Option(help="Prefill nodes; 0: decode nodes prefill too (colocated).")
    ] = 1,
    decode_nodes: Annotated[int, typer.Option(help="Decode nodes, at least 1.")] = 1,
    kv_transport: Annotated[
        str, typer.Option(help="auto, zmq or nccl (Gloo on CPU): how KV tensors travel.")
    ] = "auto",
    example: Annotated[bool, typer.Option(help="Send one example request once up.")] = True,
) -> None:
    """Start the whole fleet here and serve until Ctrl-C."""
    if decode_nodes < 1:
        raise fail("--decode-nodes must be at least 1: every request ends on a decode node")
    if kv_transport not in ("auto", "zmq", "nccl"):
        raise fail(f"--kv-transport must be auto, zmq or nccl, not {kv_transport!r}")
    if prefill_nodes < 0:
        raise fail("--prefill-nodes must be 0 or more (0: the decode nodes prefill)")
    typer.echo("Starting a lightpd fleet:")
    if model is None:
        started = _step("writing the default tiny model")
        model = ensure_default_model()
        _done(started)
    if not (model / "config.json").is_file():
        raise fail(f"model directory {model} not found (no config.json there)")
    model = model.resolve()
    admin_token = os.environ.get("LIGHTPD_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    cluster_token = os.environ.get("LIGHTPD_CLUSTER_TOKEN") or secrets.token_urlsafe(16)
    url = f"http://{host}:{port}"
    redis = None
    processes: list[subprocess.Popen] = []
    nodes: list[NodeProcess] = []
    try:
        redis_url = os.environ.get("LIGHTPD_REDIS_URL")
        if not redis_url:
            # Its data (API keys, request history) persists in the fleet's folder, so
            # it outlives a restart of Redis and of the fleet.
            started = _step(f"starting redis (data in {home() / 'redis'})")
            redis = EmbeddedRedis(data_dir=home() / "redis").start()
            redis_url = redis.url
            _done(started)
        env = {
            **os.environ,
            "LIGHTPD_REDIS_URL": redis_url,
            "LIGHTPD_MODEL": str(model),
            "LIGHTPD_ADMIN_TOKEN": admin_token,
            "LIGHTPD_CLUSTER_TOKEN": cluster_token,
            "LIGHTPD_HOST": host,
            "LIGHTPD_PORT": str(port),
        }
        started = _step(f"starting the control plane on {url}")
        logs = home() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "controlplane.log", "ab") as log:
            command = [sys.executable, "-m", "controlplane"]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        _wait_healthy(url, processes[-1])
        _done(started)
        os.environ.update(LIGHTPD_CLUSTER_TOKEN=cluster_token)
        roles = ["prefill"] * prefill_nodes + ["decode"] * decode_nodes
        extra = ["--num-kv-slots", str(num_kv_slots)] if num_kv_slots else []
        extra += ["--kv-transport", kv_transport]
        for i, (role, device) in enumerate(zip(roles, _devices(len(roles)), strict=True)):
            number = i if role == "prefill" else i - prefill_nodes
            started = _step(f"starting {role} node {number} on {device}")
            nodes.append(
                start_node(
                    role,
                    str(model),
                    "--host",
                    host,
                    "--control-plane",
                    url,
                    *extra,
                    device=device,
                    log=logs / f"{role}-{number}.log",
                )
            )
            _done(started)
        _wait_for_nodes(url, admin_token, {n.node_id for n in nodes})
        fleet_file().parent.mkdir(parents=True, exist_ok=True)
        fleet_file().write_text(
            json.dumps({"url": url, "admin_token": admin_token, "cluster_token": cluster_token})
        )
        fleet_file().chmod(0o600)
        _announce(url, model.name, admin_token, example)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:  # serve until Ctrl-C (or SIGTERM); report a process that dies
            time.sleep(0.5)
            for process in processes + [n.process for n in nodes]:
                if process.poll() is not None:
                    raise fail(
                        f"{' '.join(map(str, process.args[1:3]))} exited with code "
                        f"{process.returncode}"
                    )
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("\nStopping the fleet ...")
        for node in nodes:
            node.stop()
        _forget_nodes(url, admin_token, [n.node_id for n in nodes])
        for process in processes:
            process.terminate()
            process.wait(timeout=15)
        if redis is not None:
            redis.stop()
        fleet_file().unlink(missing_ok=True)
        typer.echo("stopped.")


def _forget_nodes(url: str, admin_token: str, node_ids: list[str]) -> None:
    """Take the stopped nodes out of the registry, which Redis keeps on disk: they left
    on purpose, and the next `lightctl up` should not list them as dead."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    for node_id in node_ids:
        try:
            httpx.delete(f"{url}/admin/nodes/{node_id}", headers=headers, timeout=2)
        except httpx.TransportError:
            return  # the control plane is gone already; the records expire in a day


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise fail(f"the control plane exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise fail("the control plane did not become healthy in time")


def _announce(url: str, model_name: str, admin_token: str, example: bool) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 16,
    }
    typer.echo(f"\nThe fleet is up. OpenAI endpoint: {url}/v1   (admin token: {admin_token})")
    typer.echo(
        "Try:\n  curl " + f"{url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body)}'"
    )
    if example:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        answer = reply.json()
        if reply.status_code == 200:
            text = answer["choices"][0]["message"]["content"]
            typer.echo(f"Example answer ({answer['usage']['completion_tokens']} tokens): {text!r}")
        else:
            typer.echo(f"Example request failed: {answer}")
    typer.echo(f"Logs in {home() / 'logs'}. Press Ctrl-C to stop.")
    sys.stdout.flush()
