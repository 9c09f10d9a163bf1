"""lightctl up: Redis, the control plane, prefill and decode nodes on this machine.

A fleet keeps its state in its own folder (``cli_common.FleetHome``, named after its
port), locked while it runs, so that a second `lightctl up` on the same port stops
before starting anything and leaves the first one's files alone. Once up, it
supervises what it started (``supervisor``): a process that exits is started again,
one that keeps exiting is given up alone. Whatever ends it (a signal, a failed
start, nothing left that can serve, a closed stdout, an exception), every process
it started is stopped before it exits.
"""

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer

from lightpd.controlplane.cli_common import FleetHome, ensure_default_model, fail, home, say
from lightpd.controlplane.embedded_redis import EmbeddedRedis, free_port, redis_password
from lightpd.controlplane.fleet_children import (
    Children,
    Stopped,
    StopSignals,
    exit_cause,
    log_tail,
)
from lightpd.controlplane.node_process import NodeStart, start_node
from lightpd.controlplane.supervisor import FleetAccess, RestartPolicy, Supervisor, supervise

NODE_START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a GPU takes minutes


@dataclass(frozen=True)
class NodeOptions:
    num_prefill: int
    num_decode: int
    num_kv_slots: int | None
    max_model_len: int | None
    kv_transport: str
    expert_parallel: bool = False  # the decode nodes form one expert-parallel group


def up(
    model_dir: Annotated[
        Path | None,
        typer.Argument(
            envvar="LIGHTPD_MODEL",
            metavar="MODEL_DIR",
            show_default=False,
            help="Model directory (Hugging Face layout); default: a tiny llama with random "
            "weights, which answers gibberish.",
        ),
    ] = None,
    model: Annotated[Path | None, typer.Option(help="The same as MODEL_DIR.")] = None,
    port: Annotated[
        int, typer.Option(envvar="LIGHTPD_PORT", help="Port of the OpenAI endpoint.")
    ] = 8000,
    host: Annotated[str, typer.Option(envvar="LIGHTPD_HOST", help="Address to serve on.")] = (
        "127.0.0.1"
    ),
    served_model_name: Annotated[
        str | None,
        typer.Option(
            envvar="LIGHTPD_SERVED_MODEL_NAME",
            help="The model name clients ask for; default: the folder's name.",
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="A key clients must send (repeat for more); default: LIGHTPD_API_KEYS, "
            "none: the API is open."
        ),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context length cap, tokens; default: the model's.")
    ] = None,
    num_kv_slots: Annotated[int | None, typer.Option(help="KV pool of each node, tokens.")] = None,
    prefill_nodes: Annotated[
        int, typer.Option(help="Prefill nodes; 0: decode nodes prefill too (colocated).")
    ] = 1,
    decode_nodes: Annotated[int, typer.Option(help="Decode nodes, at least 1.")] = 1,
    kv_transport: Annotated[
        str, typer.Option(help="auto, zmq or nccl (Gloo on CPU): how KV tensors travel.")
    ] = "auto",
    expert_parallel: Annotated[
        bool,
        typer.Option(
            help="MoE models: the decode nodes form one expert-parallel group, each "
            "holding 1/N of every MoE layer's experts (at least 2 decode nodes)."
        ),
    ] = False,
    example: Annotated[bool, typer.Option(help="Send one example request once up.")] = True,
    max_restarts: Annotated[
        int,
        typer.Option(
            help="A process that exits is started again; one that exits more often than "
            "this within --restart-window is given up (the fleet serves without it)."
        ),
    ] = 5,
    restart_window: Annotated[
        float, typer.Option(help="Seconds over which --max-restarts counts exits.")
    ] = 60.0,
    restart_backoff: Annotated[
        float,
        typer.Option(
            help="Seconds before the first start again; each next one waits twice as "
            "long (at most 30)."
        ),
    ] = 0.5,
    prefix_cache_scope: Annotated[
        str,
        typer.Option(
            envvar="LIGHTPD_PREFIX_CACHE_SCOPE",
            help="tenant: cached prompt prefixes are shared only among requests with "
            "the same API key; fleet: among all (trust every client).",
        ),
    ] = "tenant",
) -> None:
    """Start the whole fleet here and serve until Ctrl-C (or SIGTERM)."""
    if decode_nodes < 1:
        raise fail("--decode-nodes must be at least 1: every request ends on a decode node")
    if kv_transport not in ("auto", "zmq", "nccl"):
        raise fail(f"--kv-transport must be auto, zmq or nccl, not {kv_transport!r}")
    if prefill_nodes < 0:
        raise fail("--prefill-nodes must be 0 or more (0: the decode nodes prefill)")
    if expert_parallel and decode_nodes < 2:
        raise fail("--expert-parallel needs --decode-nodes of 2 or more: they share the experts")
    if max_model_len is not None and max_model_len < 1:
        raise fail("--max-model-len must be at least 1")
    try:
        policy = RestartPolicy(
            max_restarts=max_restarts, window_s=restart_window, first_backoff_s=restart_backoff
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if prefix_cache_scope not in ("tenant", "fleet"):
        raise fail(f"--prefix-cache-scope must be tenant or fleet, not {prefix_cache_scope!r}")
    if model_dir and model and model_dir.resolve() != model.resolve():
        raise fail(f"two models given: {model_dir} and --model {model}; pass one")
    model = model_dir or model
    if model is not None and not (model / "config.json").is_file():
        raise fail(f"model directory {model} not found (no config.json there)")
    fleet = FleetHome.for_port(port)
    lock = fleet.lock()
    if lock is None:
        raise fail(f"port {port} is in use by another lightctl up (its state: {fleet.path})")
    try:
        _check_port(host, port)
        signals = StopSignals()
        signals.install()
        nodes = NodeOptions(
            prefill_nodes, decode_nodes, num_kv_slots, max_model_len, kv_transport, expert_parallel
        )
        settings = {"LIGHTPD_PREFIX_CACHE_SCOPE": prefix_cache_scope}  # more, the control plane's
        _run(
            fleet, signals, model, host, port, served_model_name, api_key, example, nodes, policy,
            settings,
        )  # fmt: skip
    except Stopped as stop:  # before anything started
        say(f"\n{stop} received: stopped.")
    finally:
        os.close(lock)


def _run(
    fleet: FleetHome,
    signals: StopSignals,
    model: Path | None,
    host: str,
    port: int,
    served_model_name: str | None,
    api_keys: list[str] | None,
    example: bool,
    nodes: NodeOptions,
    policy: RestartPolicy,
    settings: dict[str, str],
) -> None:
    say("Starting a lightpd fleet:")
    default_model = model is None
    if model is None:
        started = _step("writing the default tiny model (random weights)")
        model = ensure_default_model()
        _done(started)
    model = model.resolve()
    served_name = served_model_name or model.name
    admin_token = os.environ.get("LIGHTPD_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    cluster_token = os.environ.get("LIGHTPD_CLUSTER_TOKEN") or secrets.token_urlsafe(16)
    keys = api_keys or [k for k in os.environ.get("LIGHTPD_API_KEYS", "").split(",") if k.strip()]
    url = _client_url(host, port)
    children = Children(signals, fleet)
    supervisor = Supervisor(policy, say)
    wrote_state = False
    try:
        _fresh_logs(fleet)
        redis_url = os.environ.get("LIGHTPD_REDIS_URL")
        if not redis_url:
            # Its data (API keys, request history) persists in the fleet's folder, so
            # it outlives a restart of Redis and of the fleet.
            _adopt_old_redis_data(fleet)
            started = _step(f"starting redis (data in {fleet.redis_data})")
            password = redis_password(cluster_token)
            children.redis = EmbeddedRedis(data_dir=fleet.redis_data, password=password)
            try:
                children.redis.start()
            except RuntimeError as exc:  # no redis-server, or it would not start
                say()
                raise fail(str(exc), code=1) from None
            redis_url = children.redis.url
            _done(started)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LIGHTPD_REDIS_URL": redis_url,
            "LIGHTPD_MODEL": str(model),
            "LIGHTPD_ADMIN_TOKEN": admin_token,
            "LIGHTPD_CLUSTER_TOKEN": cluster_token,
            "LIGHTPD_HOST": host,
            "LIGHTPD_PORT": str(port),
            "LIGHTPD_SERVED_MODEL_NAME": served_name,
            "LIGHTPD_API_KEYS": ",".join(keys),
            **settings,
        }
        started = _step(f"starting the control plane on {url}")
        log = fleet.logs / "controlplane.log"

        def start_control_plane(restarts: int = 0) -> subprocess.Popen:
            with open(log, "ab") as out:
                command = [sys.executable, "-m", "lightpd.controlplane"]
                children.control_plane = subprocess.Popen(command, env=env, stdout=out, stderr=out)
            _wait_control_plane(url, admin_token, children.control_plane, log)
            return children.control_plane

        start_control_plane()
        _done(started)
        wrote_state = True  # first: a signal between the two leaves no stale tokens
        _save_state(fleet, url, admin_token, cluster_token, model)
        _start_nodes(children, nodes, model, host, url, cluster_token)
        _wait_for_nodes(url, admin_token, children)
        _announce(url, served_name, admin_token, keys, example, fleet, default_model)
        access = FleetAccess(model, url, admin_token, cluster_token, NODE_START_TIMEOUT_S)
        supervise(supervisor, children, start_control_plane, access)
        while True:  # serve until a signal, or until nothing can serve
            time.sleep(0.5)
            supervisor.tick()
            if cause := supervisor.can_serve():
                raise fail(f"nothing can serve: {cause}", code=1)
    except Stopped as stop:
        say(f"\n{stop} received.")
    finally:
        signals.stopping()  # also on the exception paths: a signal no longer interrupts
        say("Stopping the fleet ...")
        supervisor.stop()
        children.stop(url, admin_token)
        supervisor.join()  # a start under way fails once its process is stopped
        children.end_strays()
        if wrote_state:
            fleet.state_file.unlink(missing_ok=True)
        say("stopped.")


def _step(message: str) -> float:
    say(f"  {message} ...", nl=False)
    return time.monotonic()


def _done(started: float) -> None:
    say(f" ok ({time.monotonic() - started:.1f} s)")


def _check_port(host: str, port: int) -> None:
    """Bind the port as uvicorn will (SO_REUSEADDR), then let it go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise fail(f"cannot serve on {host}: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise fail(f"port {port} is in use (another lightctl up?)") from exc
            raise fail(f"cannot serve on {host}:{port}: {exc.strerror}") from exc


def _client_url(host: str, port: int) -> str:
    """Where this machine reaches the control plane (a wildcard address is no target)."""
    host = _client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _fresh_logs(fleet: FleetHome) -> None:
    """This run's logs start empty; the run before's stay in logs.previous."""
    previous = fleet.path / "logs.previous"
    if fleet.logs.exists():
        shutil.rmtree(previous, ignore_errors=True)
        fleet.logs.rename(previous)
    fleet.logs.mkdir(parents=True)


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


def _save_state(
    fleet: FleetHome, url: str, admin_token: str, cluster_token: str, model: Path
) -> None:
    """fleet.json, readable by its owner only (it holds the tokens), written whole."""
    state = {
        "url": url,
        "admin_token": admin_token,
        "cluster_token": cluster_token,
        "model": str(model),
        "pid": os.getpid(),
    }
    partial = fleet.state_file.with_suffix(".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(state, out)
    partial.replace(fleet.state_file)


def _start_nodes(
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
        init = f"{_client_host(host)}:{free_port(_client_host(host))}"
    for i, (role, device) in enumerate(zip(roles, _devices(len(roles)), strict=True)):
        number = i if role == "prefill" else i - nodes.num_prefill
        name = f"the {role} node {number}"
        if role == "decode" and nodes.expert_parallel:
            ep = ["--ep-size", str(nodes.num_decode), "--ep-rank", str(number), "--ep-init", init]
            group.append(NodeStart(name, role, number, device, [*extra, *ep]))
            continue
        node = NodeStart(name, role, number, device, extra)
        started = _step(f"starting {role} node {number} on {device}")
        _start(children, node, model, cluster_token)
        _done(started)
    if group:
        devices = ", ".join(node.device for node in group)
        started = _step(f"starting an expert-parallel group of decode nodes on {devices}")
        _start_together(children, group, model, cluster_token)
        _done(started)


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


def _client_host(host: str) -> str:
    """The address of this machine's ``host`` that a client can connect to."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _devices(num_nodes: int) -> list[str]:
    """A device for each of ``num_nodes`` nodes: the visible GPUs in turn, else the CPU."""
    import torch  # here, not at the top: the other commands need no torch

    count = torch.cuda.device_count()
    if count == 0:
        return ["cpu"] * num_nodes
    return [f"cuda:{i % count}" for i in range(num_nodes)]


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


def _wait_for_nodes(url: str, admin_token: str, children: Children, timeout: float = 60) -> None:
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


def _announce(
    url: str,
    model_name: str,
    admin_token: str,
    api_keys: list[str],
    example: bool,
    fleet: FleetHome,
    default_model: bool,
) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 16,
    }
    auth = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else {}
    say(f"\nThe fleet is up. OpenAI endpoint: {url}/v1   (admin token: {admin_token})")
    key_header = "".join(f" -H '{k}: {v}'" for k, v in auth.items())
    say(
        f"Try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json'"
        f"{key_header} -d '{json.dumps(body)}'"
    )
    if default_model:
        say(
            "The default model has random weights: its answers are gibberish. "
            "Serve a real checkpoint with `lightctl up /path/to/model`."
        )
    if example:
        try:
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
            answer = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            say(f"Example request failed: {exc}")
        else:
            if reply.status_code == 200:
                text = answer["choices"][0]["message"]["content"]
                tokens = answer["usage"]["completion_tokens"]
                say(f"Example answer ({tokens} tokens): {text!r}")
            else:
                say(f"Example request failed: {answer}")
    say(f"State and logs in {fleet.path}. Press Ctrl-C to stop.")
