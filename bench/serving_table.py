"""Fleets against the in-process engine, per request rate, from `serving_gpu.sh`'s results.

    python3 -m bench.serving_table DIR [--plot DIR/disagg.png]

Reads ``{label}_rate{R}.json``: each fleet shape's `lightctl bench` runs
through the control plane (labels as serving_gpu.sh's FLEETS name them), and
``engine_rate{R}.json`` (bench.serving_engine, the same requests into the
in-process engine); prints one markdown table, a row per rate and path, with
whether each run's p99s are within the SLO the runs were given.
"""

import argparse
import json
import math
from pathlib import Path

from lightpd.controlplane.lightctl.bench.metrics import Summary
from lightpd.controlplane.lightctl.bench.plots import pyplot, save
from lightpd.controlplane.lightctl.bench.report import load_result

COLUMNS = (
    ("TTFT p50", lambda s: s.ttft_ms.p50, "ms"),
    ("TTFT p99", lambda s: s.ttft_ms.p99, "ms"),
    ("TPOT p50", lambda s: s.tpot_ms.p50, "ms"),
    ("TPOT p99", lambda s: s.tpot_ms.p99, "ms"),
    ("ITL p50", lambda s: s.itl_ms.p50, "ms"),
    ("ITL p99", lambda s: s.itl_ms.p99, "ms"),
    ("E2E p50", lambda s: s.e2e_ms.p50, "ms"),
    ("output tok/s", lambda s: s.output_throughput, ""),
    ("req/s", lambda s: s.request_throughput, ""),
    ("goodput req/s", lambda s: s.goodput, ""),
)
ENGINE = "engine"  # the in-process engine's runs (bench.serving_engine)


def _rate_key(name: str) -> float:
    return float(name)  # "inf" sorts last


def _path_order(label: str) -> tuple[bool, str]:
    return label == ENGINE, label  # fleets first, the engine last


def load_runs(folder: Path) -> dict[str, dict[str, tuple[Summary, dict]]]:
    """{rate: {path label: (summary, config)}} from ``{label}_rate{R}.json``."""
    runs: dict[str, dict[str, tuple[Summary, dict]]] = {}
    for path in sorted(folder.glob("*_rate*.json")):
        label, rate = path.stem.rsplit("_rate", 1)
        if label.startswith(("cpu_", "phases_")):
            continue
        result = load_result(path)
        runs.setdefault(rate, {})[label] = (Summary.from_json(result["summary"]), result["config"])
    return {
        rate: dict(sorted(paths.items(), key=lambda item: _path_order(item[0])))
        for rate, paths in sorted(runs.items(), key=lambda item: _rate_key(item[0]))
    }


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def meets(summary: Summary, slo: dict[str, float] | None) -> str:
    """Whether the run's p99s are within the SLO (the issue's reading of "meets")."""
    if not slo:
        return "-"
    p99 = {"ttft": summary.ttft_ms.p99, "tpot": summary.tpot_ms.p99, "e2e": summary.e2e_ms.p99}
    ok = summary.num_completed == summary.num_requests and all(
        p99[name] is not None and p99[name] <= limit for name, limit in slo.items()
    )
    return "yes" if ok else "no"


def markdown(runs: dict[str, dict[str, tuple[Summary, dict]]]) -> str:
    header = [
        "rate (req/s)", "path", "requests", *(f"{n} {u}".strip() for n, _, u in COLUMNS),
        "p99s within SLO",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for rate, paths in runs.items():
        for label, (summary, _) in paths.items():
            count = f"{summary.num_completed}/{summary.num_requests}"
            cells = [_fmt(get(summary)) for _, get, _ in COLUMNS]
            verdict = meets(summary, summary.slo)
            lines.append("| " + " | ".join([rate, label, count, *cells, verdict]) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, tuple[Summary, dict]]], path: Path) -> None:
    plt = pyplot()
    rates = list(runs)
    labels = sorted({label for paths in runs.values() for label in paths}, key=_path_order)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
    panels = (
        ("TTFT p50 / p99 (ms)", lambda s: (s.ttft_ms.p50, s.ttft_ms.p99)),
        ("TPOT p50 / p99 (ms)", lambda s: (s.tpot_ms.p50, s.tpot_ms.p99)),
        ("output tok/s", lambda s: (s.output_throughput, None)),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, get) in zip(axes, panels, strict=True):
        for label, color in zip(labels, colors, strict=False):
            xs = [i for i, r in enumerate(rates) if label in runs[r]]
            values = [get(runs[rates[i]][label][0]) for i in xs]
            ax.plot(xs, [v[0] for v in values], "o-", color=color, label=f"{label} p50")
            if values and values[0][1] is not None:
                ax.plot(xs, [v[1] for v in values], "s--", color=color, label=f"{label} p99")
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, path)


def cpu_lines(folder: Path, runs: dict) -> list[str]:
    """Which fleet process each run kept busy (``cpu_{label}_rate{R}.json`` from
    serving_gpu.sh): CPU seconds over the run (warm-up and the client's start
    included), as a share of a core and per request."""
    lines = []
    for path in sorted(folder.glob("cpu_*rate*.json")):
        label, rate = path.stem.removeprefix("cpu_").rsplit("_rate", 1)
        if rate not in runs or label not in runs[rate]:
            continue
        cpu = json.loads(path.read_text())
        wall = cpu["after"]["time"] - cpu["before"]["time"]
        used = {k: v - cpu["before"]["cpu_s"][k] for k, v in cpu["after"]["cpu_s"].items()}
        summary, config = runs[rate][label]
        num = summary.num_requests + int(config.get("warmup") or 0)
        parts = ", ".join(
            f"{part} {s:.1f} s ({s / wall:.2f} cores, {1000 * s / num:.1f} ms/request)"
            for part, s in used.items()
        )
        lines.append(f"- {label}, rate {rate}, {wall:.0f} s: {parts}")
    return lines


def phase_lines(folder: Path) -> list[str]:
    """Where TTFT went, from ``phases_{label}_rate{R}.json`` (serving_fleet --phases-of)."""
    lines = []
    for path in sorted(folder.glob("phases_*rate*.json")):
        label, rate = path.stem.removeprefix("phases_").rsplit("_rate", 1)
        steps = json.loads(path.read_text())
        parts = ", ".join(
            f"{name} p50 {s['p50']:.1f} ms (p90 {s['p90']:.1f})" for name, s in steps.items()
        )
        lines.append(f"- {label}, rate {rate}: {parts}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plot", type=Path, help="also a PNG of latency and throughput by rate")
    args = parser.parse_args()
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"no *_rate*.json results in {args.folder}")
    print(markdown(runs))
    cpu = cpu_lines(args.folder, runs)
    if cpu:
        print("\nCPU of the fleet's processes during each fleet run:\n" + "\n".join(cpu))
    phase = phase_lines(args.folder)
    if phase:
        title = "Where the time to first token went (control-plane timelines):"
        print(f"\n{title}\n" + "\n".join(phase))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
