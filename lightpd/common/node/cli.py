"""Command-line start of a node process (``python -m lightpd.prefill_node`` / ``decode_node``):
one command for both roles, made by ``node_app``."""

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from lightpd.common.engine import EngineConfig
from lightpd.common.engine.config import ExpertParallelConfig
from lightpd.common.engine.expert_parallel import ExpertParallelError
from lightpd.common.node.registrar import Registrar
from lightpd.common.node.runtime import default_node_id
from lightpd.common.node.server import DEFAULT_LEASE_S, EXIT_GROUP_FAILED, NodeConfig, NodeServer

Model = Annotated[str, typer.Option(help="Local Hugging Face model directory.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")]
Host = Annotated[str, typer.Option(help="Address to bind and advertise.")]
Port = Annotated[int, typer.Option(help="Control port; 0 picks a free one.")]
Slots = Annotated[int | None, typer.Option(help="KV pool size in tokens.")]
MaxReqs = Annotated[int, typer.Option(help="Requests held at once.")]
PrefillTokens = Annotated[int, typer.Option(help="Prefill token budget per step.")]
ModelLen = Annotated[int | None, typer.Option(help="Context length cap.")]
GpuMemory = Annotated[
    float, typer.Option(help="Share of the GPU this node may fill (weights, graphs, KV pool).")
]
NodeId = Annotated[str | None, typer.Option(help="Node id; default role-host-pid.")]
ControlPlane = Annotated[
    str | None,
    typer.Option(envvar="LIGHTPD_CONTROL_PLANE", help="Control plane URL to register with."),
]
ClusterToken = Annotated[
    str | None,
    typer.Option(envvar="LIGHTPD_CLUSTER_TOKEN", help="Token that admits nodes to the fleet."),
]


def engine_config(
    model: str,
    device: str,
    dtype: str,
    num_kv_slots: int | None,
    max_num_reqs: int,
    max_prefill_tokens: int,
    max_model_len: int | None,
    gpu_memory_fraction: float = 0.9,
) -> EngineConfig:
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"model directory {model} not found (no config.json there)")
    return EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        num_kv_slots=num_kv_slots,
        max_num_reqs=max_num_reqs,
        max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len,
        gpu_memory_fraction=gpu_memory_fraction,
    )


def expert_parallel_config(
    role: str,
    size: int,
    rank: int,
    init: str | None,
    cluster_token: str,
    host: str,
    timeout_s: float,
    cuda_graphs: bool = False,
) -> ExpertParallelConfig:
    if role != "decode":
        raise ValueError("--ep-size is for decode nodes: a prefill node holds every expert")
    if size < 2:
        raise ValueError("--ep-rank and --ep-init need --ep-size of 2 or more")
    if init is None:
        raise ValueError("--ep-init HOST:PORT is needed with --ep-size")
    return ExpertParallelConfig(
        size,
        rank,
        init,
        cluster_token=cluster_token,
        host=host,
        timeout_s=timeout_s,
        cuda_graphs=cuda_graphs,
    )


# After SIGTERM, a node that has not stopped within this many seconds exits anyway.
STOP_GRACE_S = 5.0


def node_app(role: str, make_server: Callable[[NodeConfig], NodeServer]) -> typer.Typer:
    """The command line of a ``role`` node; ``make_server`` builds it from its config
    (imported late by the caller, so ``--help`` does not load torch)."""
    app = typer.Typer(add_completion=False)

    @app.command(help=f"Run a {role} node.")
    def main(
        model: Model,
        device: Device = "auto",
        dtype: Dtype = "auto",
        host: Host = "127.0.0.1",
        port: Port = 0,
        kv_port: Annotated[
            int, typer.Option(help="KV receive port of a decode node; 0 picks a free one.")
        ] = 0,
        num_kv_slots: Slots = None,
        max_num_reqs: MaxReqs = 256,
        max_prefill_tokens: PrefillTokens = 8192,
        max_model_len: ModelLen = None,
        gpu_memory_fraction: GpuMemory = 0.9,
        node_id: NodeId = None,
        control_plane: ControlPlane = None,
        cluster_token: ClusterToken = None,
        kv_transport: Annotated[
            str,
            typer.Option(
                help="How KV tensors travel: zmq, nccl (NCCL between GPUs, Gloo on CPU), "
                "or auto (nccl on a GPU, else zmq)."
            ),
        ] = "auto",
        lease_s: Annotated[
            float,
            typer.Option(
                help="Seconds a control plane may send nothing (it renews its lease every "
                "second) before this node takes it for gone and aborts its requests, "
                "freeing their KV; at least 2."
            ),
        ] = DEFAULT_LEASE_S,
        ep_size: Annotated[
            int,
            typer.Option(
                help="Decode nodes of an MoE model: the size of this node's expert-parallel "
                "group (each member holds 1/N of every MoE layer's experts); 1: none."
            ),
        ] = 1,
        ep_rank: Annotated[int, typer.Option(help="This node's rank in its group, 0..N-1.")] = 0,
        ep_init: Annotated[
            str | None,
            typer.Option(
                help="HOST:PORT where the group meets: rank 0 listens there, the others "
                "connect (all must give the same)."
            ),
        ] = None,
        ep_timeout_s: Annotated[
            float,
            typer.Option(
                help="Seconds a collective of the group may take before the group is "
                "taken for failed (a member died or hangs): its requests end with an "
                "error and the node exits."
            ),
        ] = 10.0,
        ep_cuda_graphs: Annotated[
            bool,
            typer.Option(
                help="Expert parallelism on GPUs: decode steps replay CUDA graphs on every "
                "member together (faster; a member dying mid-step was seen to leave another "
                "stuck after it noticed). Give it to every member of the group, or none."
            ),
        ] = False,
        restarts: Annotated[
            int,
            typer.Option(
                min=0,
                help="How many times a supervisor (lightctl up) has started this node "
                "again; shown in node lists and as lightpd_node_restarts_total.",
            ),
        ] = 0,
        enable_prefix_caching: Annotated[
            bool,
            typer.Option(
                help="Keep prompts' and finished requests' KV in a radix cache, so that "
                "requests that share leading tokens reuse it (computed and sent once)."
            ),
        ] = True,
    ) -> None:
        def start() -> None:
            if not cluster_token:
                raise ValueError(
                    "--cluster-token (or LIGHTPD_CLUSTER_TOKEN) is needed: it keys the node plane"
                )
            if kv_port and role != "decode":
                raise ValueError(f"--kv-port is for decode nodes; a {role} node receives no KV")
            engine = engine_config(
                model,
                device,
                dtype,
                num_kv_slots,
                max_num_reqs,
                max_prefill_tokens,
                max_model_len,
                gpu_memory_fraction,
            )
            engine = replace(engine, enable_prefix_cache=enable_prefix_caching)
            if role == "prefill":  # it never decodes: no CUDA graphs to capture
                engine = replace(engine, cuda_graph_max_batch=0)
            if ep_size > 1 or ep_rank or ep_init:
                group = expert_parallel_config(
                    role, ep_size, ep_rank, ep_init, cluster_token, host, ep_timeout_s,
                    ep_cuda_graphs,
                )  # fmt: skip
                engine = replace(engine, expert_parallel=group)
            config = NodeConfig(
                engine=engine,
                node_id=node_id or default_node_id(role),
                cluster_token=cluster_token,
                host=host,
                control_port=port,
                kv_port=kv_port,
                kv_transport=kv_transport,
                lease_s=lease_s,
                restarts=restarts,
            )
            serve(make_server(config), role, control_plane, cluster_token)

        run_node(start)

    return app


def serve(server: NodeServer, role: str, control_plane: str | None, cluster_token: str) -> None:
    """Print one JSON line saying where the node listens, register with the control
    plane if one is given, then serve until SIGTERM/SIGINT or removal."""
    exit_code = 0

    def stop(code: int = 0, reason: str = "") -> None:
        nonlocal exit_code
        exit_code = code
        if reason:
            print(("error: " if code else "") + reason, file=sys.stderr, flush=True)
        server.stop()
        # Whatever the loop is doing, the process ends within the grace period; a
        # daemon, so a node that stops cleanly exits at once rather than waiting it out.
        deadline = threading.Timer(STOP_GRACE_S, lambda: os._exit(exit_code or 0))
        deadline.daemon = True
        deadline.start()

    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())
    registrar = None
    if control_plane:
        registrar = Registrar(
            control_plane, cluster_token, _registration(server), lambda: _stats(server), stop
        )
    print(
        json.dumps(
            {
                "event": "ready",
                "role": role,
                "node_id": server.config.node_id,
                "control": server.control_endpoint,
                "kv": getattr(server, "kv_endpoint", None),
            }
        ),
        flush=True,
    )
    if registrar is not None:
        registrar.start()
    server.serve_forever()
    if registrar is not None:
        registrar.stop()
    code = exit_code or server.exit_code
    if code == EXIT_GROUP_FAILED:
        # A torn-down expert-parallel group (its communicators, and any CUDA graph that
        # captured them) can abort the interpreter's own exit on GPUs: leave at once,
        # with the code that says why.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _registration(server: NodeServer) -> dict:
    return server.current.registration()


def _stats(server: NodeServer) -> dict:
    current = server.current
    # The loop's age is read now: a stuck loop shows even while this thread beats.
    stats = msgspec.structs.replace(current.stats, loop_age_s=server.clock.age_s)
    return msgspec.structs.asdict(stats)


def run_node(start: Callable[[], None]) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    try:
        start()
    except (ValueError, FileNotFoundError, ExpertParallelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
