"""PNG plots of a run: latency CDFs, and throughput over time."""

from pathlib import Path

from controlplane.bench.metrics import inter_token_latencies, timeline, tpot
from controlplane.bench.record import RequestRecord


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Milliseconds of each latency over the completed requests."""
    done = [r for r in records if r.ok]
    tpots = [tpot(r.ttft_s, r.e2e_s, r.output_tokens) for r in done]
    return {
        "TTFT": [r.ttft_s * 1000 for r in done],
        "TPOT": [t * 1000 for t in tpots if t is not None],
        "ITL": [g * 1000 for r in done for g in inter_token_latencies(r.chunk_times_s)],
        "E2E": [r.e2e_s * 1000 for r in done],
    }


def plot_latency_cdfs(records: list[RequestRecord], path: Path, title: str) -> Path:
    plt = pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(2, 2, figsize=(8, 6), dpi=80)
    for ax, (name, values) in zip(axes.flat, latency_samples(records).items(), strict=True):
        ordered = sorted(v for v in values if v > 0)  # log axis: tails stay readable
        if ordered:
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, fractions, where="post")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{name} ({len(ordered)} samples)")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    return save(fig, path, title)


def plot_throughput(records: list[RequestRecord], path: Path, title: str) -> Path:
    plt = pyplot()
    series = timeline(records)
    rows = (
        ("output_tokens_per_s", "output tok/s"),
        ("completed_per_s", "completed req/s"),
        ("in_flight", "requests in flight"),
    )
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 6), dpi=80, sharex=True)
    bucket = series["start_s"][1] if len(series["start_s"]) > 1 else 0.0
    edges = [*series["start_s"], series["start_s"][-1] + bucket]  # the last bucket's end too
    for ax, (key, label) in zip(axes, rows, strict=True):
        ax.step(edges, [*series[key], series[key][-1]], where="post")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(f"time since start (s), buckets of {bucket:g} s")
    return save(fig, path, title)


def write_plots(records: list[RequestRecord], directory: Path, name: str) -> list[Path]:
    """``{name}_latency_cdf.png`` and ``{name}_throughput.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(records, directory / f"{name}_latency_cdf.png", f"{name}: latency CDFs"),
        plot_throughput(records, directory / f"{name}_throughput.png", f"{name}: over time"),
    ]
