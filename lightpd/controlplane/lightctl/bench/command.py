"""lightctl bench: drive an OpenAI-compatible endpoint and report serving figures."""

import asyncio
import math
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from lightpd.controlplane.lightctl.bench import report
from lightpd.controlplane.lightctl.bench.client import ClientConfig, StreamClient, headers, root_url
from lightpd.controlplane.lightctl.bench.metrics import Summary, parse_slo, summarize
from lightpd.controlplane.lightctl.bench.record import RequestRecord
from lightpd.controlplane.lightctl.bench.runner import BenchError, LoadSpec, Runner
from lightpd.controlplane.lightctl.bench.workload import (
    TokenPrompts,
    WordPrompts,
    Workload,
    WorkloadSpec,
    build_workload,
)
from lightpd.controlplane.lightctl.common import control_plane_url, fail


def _opt(help: str, **kwargs) -> typer.models.OptionInfo:
    return typer.Option(help=help, **kwargs)


def bench(
    base_url: Annotated[
        str | None, _opt("Server root or its /v1; default: this machine's fleet.")
    ] = None,
    model: Annotated[str | None, _opt("Model name to ask for; default: the first served.")] = None,
    api_key: Annotated[str | None, _opt("Bearer key of the API.", envvar="OPENAI_API_KEY")] = None,
    endpoint: Annotated[str, _opt("completions or chat.")] = "completions",
    num_requests: Annotated[int, _opt("Requests to send (all turns counted).")] = 100,
    request_rate: Annotated[
        float, _opt("Conversations started per second; inf sends all at once.")
    ] = math.inf,
    burstiness: Annotated[float, _opt("Gamma shape of the gaps; 1 is Poisson.")] = 1.0,
    max_concurrency: Annotated[int | None, _opt("Requests in flight at most.")] = None,
    warmup: Annotated[int, _opt("Warm-up requests sent first and not counted.")] = 0,
    input_len: Annotated[
        int, _opt("Mean new prompt length per turn (tokens; words without --tokenizer).")
    ] = 256,
    input_range: Annotated[
        float, _opt("Lengths uniform in mean*(1 +- range), range in [0, 1).")
    ] = 0.0,
    output_len: Annotated[int, _opt("Mean max_tokens per request.")] = 128,
    output_range: Annotated[float, _opt("Like --input-range, for output lengths.")] = 0.0,
    shared_prefix_len: Annotated[
        int, _opt("A prefix every prompt starts with (chat: system).")
    ] = 0,
    turns: Annotated[int, _opt("Turns per conversation (chat); each includes the replies.")] = 1,
    ignore_eos: Annotated[
        bool, _opt("Ask the server to ignore EOS, so lengths are exact.")
    ] = False,
    temperature: Annotated[float, _opt("Sampling temperature.")] = 0.0,
    tokenizer: Annotated[
        Path | None, _opt("Model directory whose tokenizer makes the prompts (exact lengths).")
    ] = None,
    slo: Annotated[str | None, _opt("Goodput SLO in ms, e.g. ttft=500,tpot=50(,e2e=MS).")] = None,
    seed: Annotated[int, _opt("Seed of prompts, lengths and arrivals.")] = 0,
    out: Annotated[Path | None, _opt("Write the result JSON here.")] = None,
    plots: Annotated[Path | None, _opt("Write PNG plots into this directory.")] = None,
    label: Annotated[str, _opt("Name of this run in plots and tables.")] = "run",
    timeout: Annotated[float, _opt("Seconds one request may take.")] = 600.0,
    compare: Annotated[
        tuple[Path, Path] | None, _opt("Print two result files side by side and exit.")
    ] = None,
) -> None:
    """Benchmark serving: load from a workload and arrival schedule, streamed requests,
    TTFT/TPOT/ITL/E2E percentiles, throughput and goodput (vLLM's definitions)."""
    command_started = time.perf_counter()
    console = Console()
    if compare is not None:
        _compare(console, *compare)
        return
    try:
        spec = WorkloadSpec(
            num_requests, input_len, input_range, output_len, output_range,
            shared_prefix_len, turns, seed,
        )  # fmt: skip
        load = LoadSpec(request_rate, burstiness, max_concurrency, seed)
        slo_ms = parse_slo(slo) if slo else None
        if warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {warmup}")
        if turns > 1 and endpoint != "chat":
            raise ValueError("--turns above 1 replays conversations: use --endpoint chat")
        url = root_url(base_url or control_plane_url(None))
        name = model or _served_model(url, api_key)
        client_config = ClientConfig(url, name, endpoint, api_key, ignore_eos, temperature, timeout)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    source = _prompt_source(tokenizer) if tokenizer else WordPrompts()
    workload = build_workload(spec, source)
    warmup_workload = build_workload(spec, source, warmup=True, count=warmup)
    console.print(
        f"lightctl bench: {num_requests} requests ({spec.num_conversations} conversations x "
        f"{turns} turns) to {client_config.url}, model {name}, rate {request_rate:g}/s, "
        f"burstiness {burstiness:g}, max concurrency {max_concurrency or 'none'}, "
        f"warm-up {warmup}"
    )
    progress = report.ProgressView(console, workload.num_requests, label)
    records, wall_s, server = _measure(client_config, load, warmup_workload, workload, progress)
    total_wall_s = time.perf_counter() - command_started
    summary = summarize(
        records, slo=slo_ms, wall_s=wall_s, total_wall_s=total_wall_s, server=server
    )
    console.print(f"{label}: {name} at {client_config.url}", highlight=False)
    console.print(report.summary_table(summary))
    for line in report.error_lines(summary):
        console.print(line, style="red", highlight=False, markup=False)
    if out is not None:
        config = _result_config(label, client_config, load, warmup, tokenizer, spec)
        report.write_result(out, report.result_json(config, records, slo_ms, summary))
        console.print(f"wrote {out}")
    if plots is not None:
        from lightpd.controlplane.lightctl.bench.plots import write_plots

        for path in write_plots(records, plots, label):
            console.print(f"wrote {path}")
    if summary.num_completed == 0:
        raise typer.Exit(1)


def _measure(
    client_config: ClientConfig,
    load: LoadSpec,
    warmup_workload: Workload,
    workload: Workload,
    progress: report.ProgressView,
) -> tuple[list[RequestRecord], float, dict[str, float] | None]:
    """Warm up, then run ``workload``: its records, the run's wall time, and what the
    server's counters grew by during the run (None where it has no such counters)."""
    url = client_config.base_url
    runner: Runner | None = None
    before: dict[str, float] | None = None  # the server's counters when the run starts

    async def go() -> list[RequestRecord]:
        nonlocal runner, before
        client = StreamClient(client_config)
        try:
            runner = Runner(client, load, progress.update)
            await runner.warm_up(warmup_workload)
            before = await asyncio.to_thread(_server_counters, url)  # the run's alone
            progress.restart()
            return await runner.run(workload)
        finally:
            await client.aclose()

    try:
        records = asyncio.run(go())
    except BenchError as exc:
        raise fail(str(exc)) from exc
    finally:
        progress.stop()
    after = _server_counters(url)
    server = None
    if before is not None and after is not None:
        server = {name: after[name] - before.get(name, 0.0) for name in after}
    return records, runner.wall_s, server


def _result_config(
    label: str,
    client_config: ClientConfig,
    load: LoadSpec,
    warmup: int,
    tokenizer: Path | None,
    spec: WorkloadSpec,
) -> dict:
    """The run's settings, as its result file records them."""
    return {
        "label": label,
        "base_url": client_config.base_url,
        "endpoint": client_config.endpoint,
        "model": client_config.model,
        "request_rate": "inf" if math.isinf(load.request_rate) else load.request_rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "warmup": warmup,
        "ignore_eos": client_config.ignore_eos,
        "temperature": client_config.temperature,
        "tokenizer": str(tokenizer) if tokenizer else None,
        **{k: getattr(spec, k) for k in spec.__dataclass_fields__},
    }


SERVER_COUNTERS = ("lightpd_kv_transfer_tokens_total", "lightpd_kv_transfer_bytes_total")


def _server_counters(url: str) -> dict[str, float] | None:
    """The counters of a lightpd server's /metrics that the report shows (summed over
    their labels); None when the server has no such page (another server)."""
    try:
        reply = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.TransportError:
        return None
    if reply.status_code != 200:
        return None
    counters: dict[str, float] = {}
    for line in reply.text.splitlines():
        name, _, value = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in SERVER_COUNTERS:
            counters[name] = counters.get(name, 0.0) + float(value)
    return counters or None


def _served_model(url: str, api_key: str | None) -> str:
    try:
        reply = httpx.get(f"{url}/v1/models", headers=headers(api_key), timeout=10)
    except httpx.TransportError as exc:
        raise ValueError(f"cannot reach {url}: {exc}") from exc
    if reply.status_code != 200:
        raise ValueError(f"GET {url}/v1/models: HTTP {reply.status_code}: {reply.text[:200]}")
    models = reply.json().get("data") or []
    if not models:
        raise ValueError(f"{url} serves no model")
    return models[0]["id"]


def _prompt_source(tokenizer_dir: Path) -> TokenPrompts:
    from lightpd.common.tokenizer import load_tokenizer

    try:
        return TokenPrompts(load_tokenizer(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc


def _compare(console: Console, path_a: Path, path_b: Path) -> None:
    try:
        a, b = report.load_result(path_a), report.load_result(path_b)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    name_a = f"A: {a['config'].get('label', path_a.stem)}"
    name_b = f"B: {b['config'].get('label', path_b.stem)}"
    console.print(f"A = {path_a}\nB = {path_b}")
    summary_a, summary_b = Summary.from_json(a["summary"]), Summary.from_json(b["summary"])
    console.print(report.compare_table(summary_a, summary_b, name_a, name_b))
