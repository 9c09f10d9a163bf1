"""The benchmark's arithmetic against cases computed by hand."""

import math

import pytest

from lightpd.controlplane.lightctl.bench.metrics import (
    Summary,
    error_counts,
    inter_token_latencies,
    meets_slo,
    parse_slo,
    percentile,
    summarize,
    timeline,
    tpot,
)
from lightpd.controlplane.lightctl.bench.record import RequestRecord


def records() -> list[RequestRecord]:
    """Four requests: A and B stream, C failed after 0.1 s, D has a single output token."""
    a = RequestRecord(
        0, sent_s=0.0, chunk_times_s=[0.1, 0.15, 0.25, 0.3], e2e_s=0.3, prompt_tokens=10,
        output_tokens=4,
    )  # fmt: skip
    # B's second chunk carries two tokens.
    b = RequestRecord(
        1, sent_s=0.5, chunk_times_s=[0.2, 0.4], e2e_s=0.5, prompt_tokens=20, output_tokens=3
    )
    c = RequestRecord(2, sent_s=0.2, e2e_s=0.1, prompt_tokens=7, error="HTTP 503: no capacity")
    d = RequestRecord(
        3, sent_s=1.0, chunk_times_s=[0.05], e2e_s=0.05, prompt_tokens=5, output_tokens=1
    )
    return [a, b, c, d]


def test_percentile_interpolates_like_numpy():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.5], 99) == 7.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile([1], 101)


def test_tpot_and_itl_of_one_request():
    assert tpot(0.1, 0.3, 4) == pytest.approx(0.2 / 3)
    assert tpot(0.2, 0.5, 3) == pytest.approx(0.15)
    assert tpot(0.05, 0.05, 1) is None
    assert inter_token_latencies([0.1, 0.15, 0.25, 0.3]) == pytest.approx([0.05, 0.1, 0.05])
    assert inter_token_latencies([0.1]) == []


def test_summary_of_hand_computed_run():
    s = summarize(records())
    assert (s.num_requests, s.num_completed, s.num_errors) == (4, 3, 1)
    assert s.duration_s == pytest.approx(1.05)  # D ends at 1.0 + 0.05
    assert (s.total_input_tokens, s.total_output_tokens) == (35, 8)  # C's prompt not counted
    assert s.request_throughput == pytest.approx(3 / 1.05)
    assert s.input_throughput == pytest.approx(35 / 1.05)
    assert s.output_throughput == pytest.approx(8 / 1.05)
    assert s.total_token_throughput == pytest.approx(43 / 1.05)
    # TTFT 100, 200, 50 ms
    assert s.ttft_ms.count == 3
    assert s.ttft_ms.mean == pytest.approx(350 / 3)
    assert (s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99) == pytest.approx((100, 180, 198))
    assert s.ttft_ms.max == pytest.approx(200)
    # TPOT 66.67 (A) and 150 (B) ms; D has one token, so none
    assert s.tpot_ms.count == 2
    assert s.tpot_ms.mean == pytest.approx((200 / 3 + 150) / 2)
    assert s.tpot_ms.p90 == pytest.approx(200 / 3 + 0.9 * (150 - 200 / 3))
    # ITL: A's 50, 100, 50 and B's 200 ms, pooled
    assert s.itl_ms.count == 4
    assert s.itl_ms.mean == pytest.approx(100)
    assert (s.itl_ms.p50, s.itl_ms.p90, s.itl_ms.p99) == pytest.approx((75, 170, 197))
    # E2E 300, 500, 50 ms
    assert (s.e2e_ms.mean, s.e2e_ms.p50) == pytest.approx((850 / 3, 300))
    assert s.goodput is None and s.num_good is None
    assert s.errors == {"HTTP 503: no capacity": 1}


def test_duration_runs_from_the_first_send_to_the_last_end_failures_included():
    # E timed out after 2 s and ended last; F was never sent (an earlier turn failed).
    e = RequestRecord(4, sent_s=0.1, e2e_s=2.0, error="ReadTimeout: timed out")
    f = RequestRecord(5, sent_s=3.0, error="not sent: an earlier turn of its conversation failed")
    s = summarize([*records(), e, f], wall_s=2.2, total_wall_s=5.0)
    assert (s.num_requests, s.num_completed, s.num_errors) == (6, 3, 3)
    assert s.duration_s == pytest.approx(2.1)  # not 1.05, the end of the last completed one
    assert s.request_throughput == pytest.approx(3 / 2.1)
    assert (s.wall_s, s.total_wall_s) == (2.2, 5.0)
    assert s.errors == {
        "HTTP 503: no capacity": 1,
        "ReadTimeout: timed out": 1,
        "not sent: an earlier turn of its conversation failed": 1,
    }
    # The duration starts at the first send, wherever the run's clock started.
    late = [RequestRecord(0, sent_s=5.0, chunk_times_s=[0.1], e2e_s=0.5, output_tokens=1)]
    assert summarize(late).duration_s == pytest.approx(0.5)


def test_error_counts_keep_the_most_frequent_messages():
    rs = [RequestRecord(i, error=f"HTTP 500: {i % 7}") for i in range(40)]
    rs += [RequestRecord(99, error="x" * 500)]
    counts = error_counts(rs)
    assert len(counts) == 5 and all(n in (5, 6) for n in counts.values())
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert max(len(m) for m in error_counts([rs[-1]])) == 160


def test_goodput_counts_requests_within_every_slo():
    rs = records()
    # TTFT <= 150 ms: A (100) and D (50); B (200) misses; C failed.
    assert [meets_slo(r, {"ttft": 150}) for r in rs] == [True, False, False, True]
    # TPOT <= 60 ms: A (66.7) misses; D has no TPOT, so meets it.
    assert [meets_slo(r, {"ttft": 150, "tpot": 60}) for r in rs] == [False, False, False, True]
    s = summarize(rs, slo={"ttft": 150, "tpot": 100})
    assert s.num_good == 2
    assert s.goodput == pytest.approx(2 / 1.05)
    assert summarize(rs, slo={"e2e": 400}).num_good == 2  # A (300) and D (50)


def test_summary_with_nothing_completed_has_no_latencies():
    s = summarize([RequestRecord(0, error="HTTP 500: boom")])
    assert (s.num_completed, s.num_errors, s.duration_s) == (0, 1, 0.0)
    assert math.isnan(s.request_throughput) and math.isnan(s.ttft_ms.p50)
    s = summarize([RequestRecord(0, sent_s=1.0, e2e_s=0.5, error="HTTP 500: boom")])
    assert (s.num_completed, s.num_errors, s.duration_s) == (0, 1, 0.5)


def test_summary_round_trips_through_json():
    s = summarize(records(), slo={"ttft": 150}, wall_s=1.1, total_wall_s=3.0)
    assert Summary.from_json(s.to_json()) == s
    # A result written before wall times and error counts still loads.
    old = {k: v for k, v in s.to_json().items() if k not in ("wall_s", "total_wall_s", "errors")}
    assert Summary.from_json(old).wall_s is None and Summary.from_json(old).errors == {}


def test_parse_slo():
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo(" TTFT = 1.5 , e2e=2000") == {"ttft": 1.5, "e2e": 2000.0}
    for bad, message in [
        ("ttft=abc", "is not a number"),
        ("latency=5", "NAME in ttft, tpot, e2e"),
        ("ttft", "NAME in"),
        ("tpot=0", "must be positive"),
        ("", "empty SLO"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_slo(bad)


def test_timeline_buckets_tokens_completions_failures_and_in_flight():
    series = timeline(records(), bucket_s=0.5)
    assert series["start_s"] == [0.0, 0.5, 1.0] and series["bucket_s"] == 0.5
    # A's 4 tokens land in [0, 0.5); B's 3 (two chunks of 1.5) at 0.7 and 0.9; D's at 1.05.
    assert series["output_tokens_per_s"] == pytest.approx([8.0, 6.0, 2.0])
    # A ends at 0.3; B at 1.0 and D at 1.05 both in the last bucket.
    assert series["completed_per_s"] == pytest.approx([2.0, 0.0, 4.0])
    # C failed at 0.3.
    assert series["failed_per_s"] == pytest.approx([2.0, 0.0, 0.0])
    # At 0.0: A; at 0.5: B (sent at 0.5); at 1.0: D (B ended at 1.0).
    assert series["in_flight"] == [1, 1, 1]
    # A failure in flight is counted until it failed, and its end extends the timeline.
    slow = RequestRecord(4, sent_s=0.1, e2e_s=1.4, error="ReadTimeout")
    series = timeline([*records(), slow], bucket_s=0.5)
    assert series["in_flight"] == [1, 2, 2]
    assert series["failed_per_s"] == pytest.approx([2.0, 0.0, 2.0])
