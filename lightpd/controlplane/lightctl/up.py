"""lightctl up: Redis, the control plane, prefill and decode nodes on this machine.

A fleet keeps its state in its own folder (``common.FleetHome``, named after its
port), locked while it runs, so that a second `lightctl up` on the same port stops
before starting anything and leaves the first one's files alone. Once up, it
supervises what it started (``supervisor``): a process that exits is started again,
one that keeps exiting is given up alone. Whatever ends it (a signal, a failed
start, nothing left that can serve, a closed stdout, an exception), every process
it started is stopped before it exits.
"""

import errno
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from lightpd.common.kv_transports import TRANSPORT_HELP, check_transport
from lightpd.controlplane.lightctl.children import Children, Stopped, StopSignals
from lightpd.controlplane.lightctl.common import FleetHome, ensure_default_model, fail, say
from lightpd.controlplane.lightctl.launch import (
    NODE_START_TIMEOUT_S,
    NodeOptions,
    client_url,
    control_plane_starter,
    done,
    start_nodes,
    start_redis,
    step,
    wait_for_nodes,
)
from lightpd.controlplane.lightctl.supervisor import (
    FleetAccess,
    RestartPolicy,
    Supervisor,
    supervise,
)


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
    kv_transport: Annotated[str, typer.Option(help=TRANSPORT_HELP)] = "auto",
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
    try:
        check_transport(kv_transport)
    except ValueError as exc:
        raise fail(str(exc)) from exc
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
    model = _model_or_default(model).resolve()
    served_name = served_model_name or model.name
    admin_token = os.environ.get("LIGHTPD_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    cluster_token = os.environ.get("LIGHTPD_CLUSTER_TOKEN") or secrets.token_urlsafe(16)
    keys = api_keys or [k for k in os.environ.get("LIGHTPD_API_KEYS", "").split(",") if k.strip()]
    url = client_url(host, port)
    children = Children(signals, fleet)
    supervisor = Supervisor(policy, say)
    wrote_state = False
    try:
        _fresh_logs(fleet)
        redis_url = os.environ.get("LIGHTPD_REDIS_URL") or start_redis(children, cluster_token)
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
        start_control_plane = control_plane_starter(children, env, url, admin_token)
        started = step(f"starting the control plane on {url}")
        start_control_plane()
        done(started)
        wrote_state = True  # first: a signal between the two leaves no stale tokens
        _save_state(fleet, url, admin_token, cluster_token, model)
        start_nodes(children, nodes, model, host, url, cluster_token)
        wait_for_nodes(url, admin_token, children)
        _announce(url, served_name, admin_token, keys, example, fleet, default_model)
        access = FleetAccess(model, url, admin_token, cluster_token, NODE_START_TIMEOUT_S)
        supervise(supervisor, children, start_control_plane, access)
        _serve_until_stopped(supervisor)
    except Stopped as stop:
        say(f"\n{stop} received.")
    finally:
        _stop_fleet(signals, supervisor, children, url, admin_token)
        if wrote_state:
            fleet.state_file.unlink(missing_ok=True)
        say("stopped.")


def _model_or_default(model: Path | None) -> Path:
    if model is not None:
        return model
    started = step("writing the default tiny model (random weights)")
    model = ensure_default_model()
    done(started)
    return model


def _serve_until_stopped(supervisor: Supervisor) -> None:
    """Serve until a signal (Stopped), or until nothing can serve."""
    while True:
        time.sleep(0.5)
        supervisor.tick()
        if cause := supervisor.can_serve():
            raise fail(f"nothing can serve: {cause}", code=1)


def _stop_fleet(
    signals: StopSignals, supervisor: Supervisor, children: Children, url: str, admin_token: str
) -> None:
    signals.stopping()  # also on the exception paths: a signal no longer interrupts
    say("Stopping the fleet ...")
    supervisor.stop()
    children.stop(url, admin_token)
    supervisor.join()  # a start under way fails once its process is stopped
    children.end_strays()


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


def _fresh_logs(fleet: FleetHome) -> None:
    """This run's logs start empty; the run before's stay in logs.previous."""
    previous = fleet.path / "logs.previous"
    if fleet.logs.exists():
        shutil.rmtree(previous, ignore_errors=True)
        fleet.logs.rename(previous)
    fleet.logs.mkdir(parents=True)


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
