"""PNG plots of a run: latency CDFs, and throughput over time.

Failed requests are drawn, never dropped: the TTFT and E2E curves are fractions
of all requests, so they stop short of 1 by the share that failed (a dashed line
marks where), E2E has a second curve of the failures' time to error, and the
throughput plot has failed requests per second beside completed ones. Every axis
has a label and tick labels (a log axis over less than a decade has no decade
ticks, which left E2E and TPOT without numbers: such ranges get a linear axis).
"""

from pathlib import Path

from lightpd.controlplane.lightctl.bench.metrics import inter_token_latencies, timeline, tpot
from lightpd.controlplane.lightctl.bench.record import RequestRecord

COMPLETED_COLOR = "#2563eb"
FAILED_COLOR = "#dc2626"
LOG_SCALE_MIN_RATIO = 20  # max / min of a latency axis from which it is logarithmic


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


def _latency_axis(ax, values: list[float]) -> None:
    """A log axis with numbered 1-2-5 ticks for wide ranges, else a linear one."""
    from matplotlib import ticker

    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= LOG_SCALE_MIN_RATIO:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("ms (log scale)")
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
        ax.set_xlabel("ms")


def _cdf(ax, values: list[float], total: int, marker: str | None = None, **style) -> None:
    """A step CDF of ``values`` whose fractions are out of ``total``; with ``marker``,
    one at each value too."""
    ordered = sorted(values)
    if ordered:
        fractions = [(i + 1) / total for i in range(len(ordered))]
        ax.step([ordered[0], *ordered], [0.0, *fractions], where="post", **style)
        if marker:
            ax.plot(ordered, fractions, marker, color=style.get("color"), label="_markers")


def plot_latency_cdfs(records: list[RequestRecord], path: Path, title: str) -> Path:
    return save(latency_figure(records, title), path)


def latency_figure(records: list[RequestRecord], title: str):
    """TTFT and E2E as fractions of all requests (failed ones never reach theirs),
    E2E with the failures' time to error; TPOT and ITL over completed requests."""
    plt = pyplot()
    samples = latency_samples(records)
    num_requests = len(records)
    num_completed = sum(r.ok for r in records)
    failed = [r for r in records if not r.ok]
    failed_after = [r.e2e_s * 1000 for r in failed if r.e2e_s is not None]
    num_not_sent = len(failed) - len(failed_after)

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), dpi=80)
    # name: (axes, out of all requests, or else of its own samples)
    panels = {
        "TTFT": (axes[0][0], True),
        "TPOT": (axes[0][1], False),
        "ITL": (axes[1][0], False),
        "E2E": (axes[1][1], True),
    }
    for name, (ax, of_all) in panels.items():
        values = samples[name]
        total = num_requests if of_all else len(values)
        if of_all:
            ylabel = "fraction of all requests"
        else:
            ylabel = "fraction of token gaps" if name == "ITL" else "fraction of completed requests"
        wide = values + (failed_after if name == "E2E" else [])
        _latency_axis(ax, wide)
        _cdf(ax, values, total, color=COMPLETED_COLOR, label=f"completed ({len(values)})")
        if name == "E2E" and failed_after:
            label = f"failed: time to error ({len(failed_after)})"
            _cdf(ax, failed_after, total, color=FAILED_COLOR, marker="x", label=label)
        if of_all and failed:
            reached = num_completed / num_requests
            label = f"{len(failed)} failed: completed reach {reached:.0%}"
            ax.axhline(reached, color=FAILED_COLOR, linestyle="--", linewidth=1, label=label)
        if not wide:
            ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center", color="gray")
        elif ax.get_xscale() == "linear":
            ax.set_xlim(left=0)  # after the data, so autoscaling has set the right end
        ax.set_title(f"{name} ({len(values)} samples)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (failed or name == "E2E"):
            ax.legend(loc="upper left", fontsize="small")
    not_sent = f", {num_not_sent} not sent" if num_not_sent else ""
    fig.suptitle(
        f"{title}: {num_completed} of {num_requests} requests completed, "
        f"{len(failed)} failed{not_sent}"
    )
    fig.tight_layout()
    return fig


def plot_throughput(records: list[RequestRecord], path: Path, title: str) -> Path:
    return save(throughput_figure(records, title), path)


def throughput_figure(records: list[RequestRecord], title: str):
    """Output tokens/s, completed and failed requests/s, and requests in flight."""
    plt = pyplot()
    series = timeline(records)
    rows = (
        ("output tok/s", [("output_tokens_per_s", "completed requests", COMPLETED_COLOR)]),
        (
            "requests ended / s",
            [
                ("completed_per_s", "completed", COMPLETED_COLOR),
                ("failed_per_s", "failed", FAILED_COLOR),
            ],
        ),
        ("requests in flight", [("in_flight", "failed ones until they failed", "#6b7280")]),
    )
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 7.5), dpi=80, sharex=True)
    bucket = series["bucket_s"]
    edges = [*series["start_s"], series["start_s"][-1] + bucket]  # the last bucket's end too
    for ax, (ylabel, lines) in zip(axes, rows, strict=True):
        for key, label, color in lines:
            values = series[key]
            ax.step(edges, [*values, values[-1]], where="post", color=color, label=label)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
        ax.tick_params(labelbottom=True)  # numbers under every plot, not only the last
        ax.set_xlabel(f"time since the run's start (s), buckets of {bucket:g} s")
    num_failed = sum(not r.ok for r in records)
    fig.suptitle(f"{title}: {len(records)} requests, {num_failed} failed")
    fig.tight_layout()
    return fig


def write_plots(records: list[RequestRecord], directory: Path, name: str) -> list[Path]:
    """``{name}_latency_cdf.png`` and ``{name}_throughput.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(records, directory / f"{name}_latency_cdf.png", f"{name}: latency CDFs"),
        plot_throughput(records, directory / f"{name}_throughput.png", f"{name}: over time"),
    ]
