"""The benchmark's plots: failed requests drawn, every axis labelled and numbered."""

import pytest

from lightpd.controlplane.lightctl.bench.plots import (
    latency_figure,
    pyplot,
    throughput_figure,
    write_plots,
)
from lightpd.controlplane.lightctl.bench.record import RequestRecord


def completed(index: int, sent_s: float, e2e_s: float, tokens: int = 5) -> RequestRecord:
    gap = e2e_s / (tokens + 1)
    chunks = [gap * (i + 1) for i in range(tokens)]
    return RequestRecord(
        index, sent_s=sent_s, chunk_times_s=chunks, e2e_s=e2e_s, output_tokens=tokens
    )


def run(e2e_s: list[float]) -> list[RequestRecord]:
    """Completed requests of the given E2E, two failures and a turn never sent."""
    records = [completed(i, 0.05 * i, e) for i, e in enumerate(e2e_s)]
    n = len(records)
    return [
        *records,
        RequestRecord(n, sent_s=0.1, e2e_s=0.02, error="HTTP 503: no capacity"),
        RequestRecord(n + 1, sent_s=0.2, e2e_s=2.5, error="ReadTimeout: timed out"),
        RequestRecord(n + 2, sent_s=2.7, error="not sent: an earlier turn failed"),
    ]


def tick_labels(axis, lo: float, hi: float) -> list[str]:
    """The tick labels drawn on an axis: visible, non-empty, within its limits."""
    labels = []
    for label in axis.get_ticklabels():
        position = label.get_position()[0 if axis.axis_name == "x" else 1]
        if label.get_visible() and label.get_text() and lo <= position <= hi:
            labels.append(label.get_text())
    return labels


def assert_every_axis_labelled(fig) -> None:
    fig.canvas.draw()
    for ax in fig.axes:
        name = ax.get_title() or ax.get_ylabel()
        assert ax.get_xlabel() and ax.get_ylabel(), name
        assert len(tick_labels(ax.xaxis, *sorted(ax.get_xlim()))) >= 2, name
        assert len(tick_labels(ax.yaxis, *sorted(ax.get_ylim()))) >= 2, name


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.mark.parametrize(
    "e2e_s",
    [
        [0.30, 0.33, 0.36, 0.40, 0.45],  # within a decade: no decade tick on a log axis
        [0.02, 0.1, 0.9, 3.0, 12.0],  # three decades: a log axis
    ],
)
def test_latency_cdfs_number_every_axis_and_draw_the_failures(e2e_s):
    plt = pyplot()
    fig = latency_figure(run(e2e_s), "t")
    assert_every_axis_labelled(fig)
    axes = {ax.get_title().split()[0]: ax for ax in fig.axes}
    # TPOT spans what E2E spans; E2E also holds the failures (20 ms to 2.5 s): log.
    assert axes["TPOT"].get_xscale() == ("log" if max(e2e_s) / min(e2e_s) > 20 else "linear")
    assert axes["E2E"].get_xscale() == "log"
    assert fig._suptitle.get_text() == "t: 5 of 8 requests completed, 3 failed, 1 not sent"
    e2e = lines_by_label(axes["E2E"])
    # The failures' time to error is a curve of its own, out of all 8 requests.
    failed = e2e["failed: time to error (2)"]
    assert list(failed.get_xdata())[-2:] == pytest.approx([20, 2500])
    assert max(failed.get_ydata()) == pytest.approx(2 / 8)
    # Completed requests reach 5/8, not 1: the 3 failed ones are marked where they stop.
    assert max(e2e["completed (5)"].get_ydata()) == pytest.approx(5 / 8)
    for name in ("TTFT", "E2E"):
        marker = lines_by_label(axes[name])["3 failed: completed reach 62%"]
        assert list(marker.get_ydata()) == pytest.approx([5 / 8, 5 / 8])
        assert axes[name].get_ylabel() == "fraction of all requests"
    assert axes["TPOT"].get_ylabel() == "fraction of completed requests"
    plt.close(fig)


def test_throughput_shows_failed_requests_per_second_and_in_flight():
    plt = pyplot()
    fig = throughput_figure(run([0.3, 0.4, 0.5, 0.6, 0.7]), "t")
    assert_every_axis_labelled(fig)
    _, ended, in_flight = fig.axes
    failed = lines_by_label(ended)["failed"]
    bucket = float(fig.axes[0].get_xlabel().split("buckets of ")[1].split()[0])
    assert sum(failed.get_ydata()[:-1]) * bucket == pytest.approx(2)  # both failures
    # The timed-out request is in flight until 2.7 s, after every completed one ended.
    times, counts = in_flight.get_lines()[0].get_data()
    assert max(t for t, c in zip(times, counts, strict=True) if c > 0) >= 2.0
    assert fig._suptitle.get_text() == "t: 8 requests, 3 failed"
    plt.close(fig)


def test_plots_of_a_run_where_everything_failed(tmp_path):
    records = [RequestRecord(0, e2e_s=0.1, error="HTTP 500: x"), RequestRecord(1, error="y")]
    paths = write_plots(records, tmp_path / "plots", "broken")
    assert [p.name for p in paths] == ["broken_latency_cdf.png", "broken_throughput.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    fig = latency_figure(records, "broken")
    assert_every_axis_labelled(fig)
    assert fig._suptitle.get_text() == "broken: 0 of 2 requests completed, 2 failed, 1 not sent"
    pyplot().close(fig)
