"""What the control plane costs: the same load straight to the nodes and through it.

    python3 -m bench.serving_overhead [--num-requests 200 --rate 10 --rounds 2] \
        [--saturation-requests 400 --concurrency 32] [--out overhead.json --plot overhead.png]

A fleet of CPU processes with the tiny model: Redis, the control plane, one
prefill node and one decode node. With two or more cores, the control plane
and Redis are pinned to core 0; the nodes and this client run anywhere.

1. Added latency: the same requests (token-id prompts, --ignore-eos, the same
   Poisson arrival times) sent (a) straight to the nodes with NodeClient
   (reserve on the decode node, prefill, read the token stream: what the
   control plane does inside) and (b) through the control plane's streaming
   /v1/completions. Rounds alternate a and b; each request's TTFT and E2E are
   paired with its twin, so the difference is the control plane's share.
2. Sustained rate on one core: single-token requests at max concurrency, both
   ways; the control plane's CPU seconds per request give the rate one core
   could sustain at most (1 / cpu_s), and its core's use shows which side of
   the fleet was the bottleneck.
"""

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench.serving_fleet import CLUSTER_TOKEN, BenchFleet, cpu_seconds, pin
from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.common.tokenizer import load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.bench.client import ClientConfig, StreamClient
from lightpd.controlplane.lightctl.bench.metrics import percentile, summarize
from lightpd.controlplane.lightctl.bench.plots import pyplot, save
from lightpd.controlplane.lightctl.bench.record import RequestRecord
from lightpd.controlplane.lightctl.bench.runner import LoadSpec, Runner
from lightpd.controlplane.lightctl.bench.workload import TokenPrompts, WorkloadSpec, build_workload
from lightpd.controlplane.node_client import NodeClient, NodeError
from tests.e2e.fleet import API_KEY


class DirectClient:
    """Runner-compatible client that talks to one prefill and one decode node."""

    def __init__(self, nodes: NodeClient, prefill: str, decode: str) -> None:
        self.nodes = nodes
        self.prefill, self.decode = prefill, decode
        self.config = ClientConfig("direct", "nodes", "completions", None, ignore_eos=True)

    async def send(
        self, record: RequestRecord, prompt: list[int], max_tokens: int
    ) -> RequestRecord:
        request_id = f"direct-{uuid.uuid4().hex}"
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=record.index
        )
        started = time.perf_counter()
        self.nodes.open_stream(request_id)
        try:
            reserved = await self.nodes.reserve(self.decode, request_id, prompt, params)
            target = reserved.target()
            await self.nodes.prefill(self.prefill, request_id, prompt, params, target)
            async for event in self.nodes.events(request_id, timeout=120):
                if event.token_ids:
                    record.chunk_times_s.append(time.perf_counter() - started)
                    record.output_tokens += len(event.token_ids)
                record.error = record.error or event.error
            record.e2e_s = time.perf_counter() - started
        except NodeError as exc:
            self.nodes.close_stream(request_id)
            record.error = f"{type(exc).__name__}: {exc}"
        record.prompt_tokens, record.usage_reported = len(prompt), True
        return record


async def run_load(client, workload, load: LoadSpec) -> list[RequestRecord]:
    return await Runner(client, load, lambda record: None).run(workload)


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
    }


def added_latency(direct: list[RequestRecord], cp: list[RequestRecord]) -> dict:
    pairs = [(d, c) for d, c in zip(direct, cp, strict=True) if d.ok and c.ok]
    return {
        "num_pairs": len(pairs),
        "ttft": stats_ms([c.ttft_s - d.ttft_s for d, c in pairs]),
        "e2e": stats_ms([c.e2e_s - d.e2e_s for d, c in pairs]),
        "direct_ttft": stats_ms([d.ttft_s for d, _ in pairs]),
        "cp_ttft": stats_ms([c.ttft_s for _, c in pairs]),
        "direct_e2e": stats_ms([d.e2e_s for d, _ in pairs]),
        "cp_e2e": stats_ms([c.e2e_s for _, c in pairs]),
    }


async def measure(args: argparse.Namespace, fleet: BenchFleet, tokenizer) -> dict:
    pids = {**fleet.pids(), "client": os.getpid()}
    source = TokenPrompts(tokenizer)
    spec = WorkloadSpec(args.num_requests, args.input_len, output_len=args.output_len, seed=1)
    workload = build_workload(spec, source)
    warmup = build_workload(spec, source, warmup=True, count=8)
    load = LoadSpec(args.rate, seed=1)
    prefill = next(n.control for n in fleet.nodes if n.role == "prefill")
    decode = next(n.control for n in fleet.nodes if n.role == "decode")
    name = Path(fleet.model).name  # the control plane serves the folder's name
    config = ClientConfig(fleet.url, name, "completions", API_KEY, ignore_eos=True)
    result: dict = {"rounds": []}
    async with NodeClient(CLUSTER_TOKEN) as nodes:
        direct = DirectClient(nodes, prefill, decode)
        http = StreamClient(config)
        try:
            await run_load(direct, warmup, LoadSpec())
            await run_load(http, warmup, LoadSpec())
            all_direct, all_cp, cp_cpu = [], [], 0.0
            for round_index in range(args.rounds):
                d = await run_load(direct, workload, load)
                cpu_before = cpu_seconds(pids["controlplane"])
                c = await run_load(http, workload, load)
                cp_cpu += cpu_seconds(pids["controlplane"]) - cpu_before
                all_direct += d
                all_cp += c
                print(f"round {round_index + 1}: {json.dumps(added_latency(d, c))}", flush=True)
                result["rounds"].append(added_latency(d, c))
            result["latency"] = added_latency(all_direct, all_cp)
            result["latency"]["cp_cpu_ms_per_request"] = 1000 * cp_cpu / len(all_cp)
            result["records"] = {
                "direct": [r.to_json() for r in all_direct],
                "cp": [r.to_json() for r in all_cp],
            }
            result["errors"] = {
                "direct": sum(not r.ok for r in all_direct),
                "cp": sum(not r.ok for r in all_cp),
                "first": next((r.error for r in all_direct + all_cp if r.error), None),
            }
            result["saturation"] = await saturation(args, direct, http, source, pids)
        finally:
            await http.aclose()
    return result


async def saturation(args, direct, http, source, pids: dict[str, int]) -> dict:
    spec = WorkloadSpec(args.saturation_requests, args.input_len, output_len=1, seed=2)
    workload = build_workload(spec, source)
    load = LoadSpec(math.inf, max_concurrency=args.concurrency)
    out = {}
    for name, client in (("direct", direct), ("cp", http)):
        cpu_before = {part: cpu_seconds(pid) for part, pid in pids.items()}
        records = await run_load(client, workload, load)
        summary = summarize(records)
        used = {part: cpu_seconds(pid) - cpu_before[part] for part, pid in pids.items()}
        out[name] = {
            "requests_per_s": summary.request_throughput,
            "errors": summary.num_errors,
            "first_error": next((r.error for r in records if r.error), None),
            "duration_s": summary.duration_s,
            "ttft_p50_ms": summary.ttft_ms.p50,
            "cpu_s": used,
            "core_use": {part: s / summary.duration_s for part, s in used.items()},
        }
        print(f"saturation {name}: {json.dumps(out[name])}", flush=True)
    cp_cpu_s = out["cp"]["cpu_s"]["controlplane"] / args.saturation_requests
    out["cp_cpu_ms_per_request"] = 1000 * cp_cpu_s
    out["cp_one_core_ceiling_per_s"] = 1 / cp_cpu_s
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    records = {k: [RequestRecord.from_json(r) for r in v] for k, v in result["records"].items()}
    for ax, (title, get) in zip(
        axes, (("TTFT", lambda r: r.ttft_s), ("E2E", lambda r: r.e2e_s)), strict=True
    ):
        for name, label in (("direct", "straight to the nodes"), ("cp", "through control plane")):
            values = sorted(get(r) * 1000 for r in records[name] if r.ok)
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory; default: a tiny random llama")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--saturation-requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    model = args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(), "llama"))
    # One intra-op thread a node: the tiny model gains nothing from more, and idle
    # OpenMP threads spinning on a shared core would slow the other processes.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    slots = ("--num-kv-slots", "16384")
    fleet = BenchFleet(model, prefill_args=slots, decode_args=slots)
    fleet.start()
    try:
        cores = sorted(os.sched_getaffinity(0))
        pinned = not args.no_pin and len(cores) >= 2
        if pinned:
            pids = fleet.pids()
            for part in ("controlplane", "redis"):
                pin(pids[part], {cores[0]})
        result = asyncio.run(measure(args, fleet, load_tokenizer(model)))
    finally:
        fleet.stop()
    result["setup"] = {**vars(args), "out": str(args.out), "plot": str(args.plot), "cores": cores}
    result["setup"]["pinned"] = pinned
    lat, sat = result["latency"], result["saturation"]
    print(f"\nadded by the control plane, {lat['num_pairs']} request pairs (ms):")
    for name in ("ttft", "e2e"):
        s = lat[name]
        print(f"  {name}: mean {s['mean']:.2f}, p50 {s['p50']:.2f}, p99 {s['p99']:.2f}")
    print(f"  control plane CPU per request: {lat['cp_cpu_ms_per_request']:.2f} ms")
    print(
        f"single-token requests at concurrency {args.concurrency}: direct "
        f"{sat['direct']['requests_per_s']:.1f}/s, through the control plane "
        f"{sat['cp']['requests_per_s']:.1f}/s (its core {sat['cp']['core_use']['controlplane']:.0%}"
        f" busy); CPU {sat['cp_cpu_ms_per_request']:.2f} ms/request, so one core sustains at "
        f"most {sat['cp_one_core_ceiling_per_s']:.0f} requests/s"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
