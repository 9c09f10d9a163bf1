"""Command-line start of a node process (``python -m prefill_node`` / ``decode_node``)."""

import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from common.engine import EngineConfig

Model = Annotated[str, typer.Option(help="Local Hugging Face model directory.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")]
Host = Annotated[str, typer.Option(help="Address to bind and advertise.")]
Port = Annotated[int, typer.Option(help="Control port; 0 picks a free one.")]
Slots = Annotated[int | None, typer.Option(help="KV pool size in tokens.")]
MaxReqs = Annotated[int, typer.Option(help="Requests held at once.")]
PrefillTokens = Annotated[int, typer.Option(help="Prefill token budget per step.")]
ModelLen = Annotated[int | None, typer.Option(help="Context length cap.")]
NodeId = Annotated[str | None, typer.Option(help="Node id; default role-host-pid.")]


def engine_config(
    model: str,
    device: str,
    dtype: str,
    num_kv_slots: int | None,
    max_num_reqs: int,
    max_prefill_tokens: int,
    max_model_len: int | None,
) -> EngineConfig:
    return EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        num_kv_slots=num_kv_slots,
        max_num_reqs=max_num_reqs,
        max_prefill_tokens=max_prefill_tokens,
        max_model_len=max_model_len,
    )


def serve(server: Any, announce: dict[str, str]) -> None:
    """Print one JSON line saying where the node listens, then serve until SIGTERM/SIGINT."""

    def stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"event": "ready", **announce}), flush=True)
    server.serve_forever()


def run_node(start: Callable[[], None]) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        start()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
