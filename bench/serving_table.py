"""Fleet against in-process engine, per request rate, from `serving_gpu.sh`'s result files.

    python3 -m bench.serving_table DIR [--plot DIR/disagg.png]

Reads ``fleet_rate{R}.json`` (lightctl bench through the control plane, prefill
node and decode node) and ``engine_rate{R}.json`` (bench.serving_engine, the
same requests into the in-process engine) and prints one markdown table, with
the fleet's figure over the engine's for each latency and throughput.
"""

import argparse
import json
import math
from pathlib import Path

from controlplane.bench.metrics import Summary
from controlplane.bench.plots import pyplot, save
from controlplane.bench.report import load_result

COLUMNS = (
    ("TTFT p50", lambda s: s.ttft_ms.p50, "ms"),
    ("TTFT p99", lambda s: s.ttft_ms.p99, "ms"),
    ("TPOT p50", lambda s: s.tpot_ms.p50, "ms"),
    ("TPOT p99", lambda s: s.tpot_ms.p99, "ms"),
    ("ITL p99", lambda s: s.itl_ms.p99, "ms"),
    ("E2E p50", lambda s: s.e2e_ms.p50, "ms"),
    ("output tok/s", lambda s: s.output_throughput, ""),
    ("req/s", lambda s: s.request_throughput, ""),
)


def _rate_key(name: str) -> float:
    return float(name)  # "inf" sorts last


def load_runs(folder: Path) -> dict[str, dict[str, tuple[Summary, dict]]]:
    """{rate: {"fleet" | "engine": (summary, config)}}"""
    runs: dict[str, dict[str, tuple[Summary, dict]]] = {}
    for path in sorted([*folder.glob("fleet_rate*.json"), *folder.glob("engine_rate*.json")]):
        kind, rate = path.stem.split("_rate", 1)
        result = load_result(path)
        runs.setdefault(rate, {})[kind] = (Summary.from_json(result["summary"]), result["config"])
    return dict(sorted(runs.items(), key=lambda item: _rate_key(item[0])))


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def markdown(runs: dict[str, dict[str, tuple[Summary, dict]]]) -> str:
    header = ["rate (req/s)", "requests", "path", *(f"{n} {u}".strip() for n, _, u in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for rate, kinds in runs.items():
        for kind in ("fleet", "engine"):
            if kind not in kinds:
                continue
            summary, _ = kinds[kind]
            count = f"{summary.num_completed}/{summary.num_requests}"
            cells = [_fmt(get(summary)) for _, get, _ in COLUMNS]
            path = "prefill + decode nodes" if kind == "fleet" else "in-process engine"
            lines.append("| " + " | ".join([rate, count, path, *cells]) + " |")
        if {"fleet", "engine"} <= kinds.keys():
            fleet, engine = kinds["fleet"][0], kinds["engine"][0]
            ratios = []
            for _, get, _ in COLUMNS:
                a, b = get(fleet), get(engine)
                ok = a is not None and b and not (math.isnan(a) or math.isnan(b))
                ratios.append(f"{a / b:.2f}x" if ok else "-")
            lines.append("| " + " | ".join([rate, "", "fleet / engine", *ratios]) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, tuple[Summary, dict]]], path: Path) -> None:
    plt = pyplot()
    rates = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
    panels = (
        ("TTFT p50 / p99 (ms)", lambda s: (s.ttft_ms.p50, s.ttft_ms.p99)),
        ("TPOT p50 / p99 (ms)", lambda s: (s.tpot_ms.p50, s.tpot_ms.p99)),
        ("output tok/s", lambda s: (s.output_throughput, None)),
    )
    for ax, (title, get) in zip(axes, panels, strict=True):
        for kind, color in (("fleet", "tab:blue"), ("engine", "tab:orange")):
            xs = [i for i, r in enumerate(rates) if kind in runs[r]]
            values = [get(runs[rates[i]][kind][0]) for i in xs]
            ax.plot(xs, [v[0] for v in values], "o-", color=color, label=f"{kind} p50")
            if values and values[0][1] is not None:
                ax.plot(xs, [v[1] for v in values], "s--", color=color, label=f"{kind} p99")
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, path)


def cpu_lines(folder: Path, runs: dict) -> list[str]:
    """Which fleet process each run kept busy (``cpu_rate{R}.json`` from serving_gpu.sh):
    CPU seconds over the run (warm-up and the client's start included), and per request."""
    lines = []
    for rate in runs:
        path = folder / f"cpu_rate{rate}.json"
        if not path.is_file() or "fleet" not in runs[rate]:
            continue
        cpu = json.loads(path.read_text())
        wall = cpu["after"]["time"] - cpu["before"]["time"]
        used = {k: v - cpu["before"]["cpu_s"][k] for k, v in cpu["after"]["cpu_s"].items()}
        summary, config = runs[rate]["fleet"]
        num = summary.num_requests + int(config.get("warmup") or 0)
        parts = ", ".join(
            f"{part} {s:.1f} s ({s / wall:.0%} of a core, {1000 * s / num:.1f} ms/request)"
            for part, s in used.items()
        )
        lines.append(f"- rate {rate}, {wall:.0f} s: {parts}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plot", type=Path, help="also a PNG of latency and throughput by rate")
    args = parser.parse_args()
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"no fleet_rate*.json or engine_rate*.json in {args.folder}")
    print(markdown(runs))
    cpu = cpu_lines(args.folder, runs)
    if cpu:
        print("\nCPU of the fleet's processes during each fleet run:\n" + "\n".join(cpu))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
