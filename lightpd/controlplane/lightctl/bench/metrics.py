"""The arithmetic of a serving benchmark, as pure functions of request records.

Definitions follow vLLM's benchmark (benchmarks/serve.py):
- TTFT: from sending the request to the first streamed chunk with output.
- TPOT of a request: (e2e - TTFT) / (output tokens - 1); requests with one
  output token have none.
- ITL: every gap between consecutive output chunks, pooled over all requests.
- E2E: from sending to the end of the response.
- Percentiles interpolate linearly between order statistics (numpy's default).
- Goodput: requests per second that finished without error and met every SLO;
  a request with one output token has no TPOT and meets a TPOT SLO.
- Throughputs: totals over the run's duration, from the first send to the end
  of the last request, completed or failed (a failure that ends last, e.g. a
  timeout, is part of the run: leaving it out once made a 60.6 s run say 39.8 s).
  The wall time of the measured run is reported beside it, from the runner's
  own clock; the two differ only by the time before the first send.
"""

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lightpd.controlplane.lightctl.bench.record import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")
MAX_ERROR_KINDS = 5  # distinct error messages kept in a summary, the most frequent
MAX_ERROR_CHARS = 160


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Distribution":
        ms = [v * 1000 for v in values]
        if not ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(len(ms), sum(ms) / len(ms), p50, p90, p99, max(ms))


def tpot(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None with fewer than 2 tokens."""
    if output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def inter_token_latencies(chunk_times_s: Sequence[float]) -> list[float]:
    """Gaps between consecutive output chunks of one request."""
    return [b - a for a, b in itertools.pairwise(chunk_times_s)]


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` (milliseconds) -> ``{"ttft": 500.0, "tpot": 50.0}``."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {part!r}: use NAME=MS with NAME in {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of ms") from None
        if not ms > 0:
            raise ValueError(f"bad SLO {part!r}: the limit must be positive")
        slo[name] = ms
    if not slo:
        raise ValueError("empty SLO: use e.g. ttft=500,tpot=50")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.ok:
        return False
    measured = {
        "ttft": record.ttft_s,
        "tpot": tpot(record.ttft_s, record.e2e_s, record.output_tokens),
        "e2e": record.e2e_s,
    }
    for name, limit_ms in slo.items():
        value = measured[name]
        if value is not None and value * 1000 > limit_ms:
            return False
    return True


def run_duration(records: Sequence[RequestRecord]) -> float:
    """From the first send to the end of the last request, completed or failed
    (requests never sent, e.g. later turns of a failed conversation, take no time)."""
    sent = [r for r in records if r.finished_s is not None]
    if not sent:
        return 0.0
    return max(r.finished_s for r in sent) - min(r.sent_s for r in sent)


def error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    """The most frequent error messages of failed requests, with how many had each."""
    counts = Counter(r.error[:MAX_ERROR_CHARS] for r in records if r.error is not None)
    return dict(counts.most_common(MAX_ERROR_KINDS))


@dataclass(frozen=True)
class Summary:
    num_requests: int
    num_completed: int
    num_errors: int  # failed, or not sent because an earlier turn failed
    duration_s: float  # first send to the end of the last request
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    input_throughput: float  # prompt tokens of completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    slo: dict[str, float] | None = None
    num_good: int | None = None
    goodput: float | None = None  # good requests / s
    wall_s: float | None = None  # the measured run by the runner's clock (after warm-up)
    total_wall_s: float | None = None  # the whole command: set-up, warm-up and the run
    errors: dict[str, int] = field(default_factory=dict)  # see ``error_counts``
    total_cached_tokens: int = 0  # prompt tokens the servers' prefix caches held
    # From the server's /metrics over the run (None when it does not say): KV sent
    # from prefill to decode nodes.
    kv_transfer_tokens: int | None = None
    kv_transfer_bytes: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Summary":
        dists = {k: Distribution(**data[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}
        return cls(**{**data, **dists})


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float | None = None,
    slo: dict[str, float] | None = None,
    wall_s: float | None = None,
    total_wall_s: float | None = None,
    server: dict[str, float] | None = None,
) -> Summary:
    """``server``: counters read from the server's /metrics over the run."""
    done = [r for r in records if r.ok]
    duration = run_duration(records) if duration_s is None else duration_s
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    tpots = [tpot(r.ttft_s, r.e2e_s, r.output_tokens) for r in done]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    num_good = sum(meets_slo(r, slo) for r in records) if slo else None
    return Summary(
        num_requests=len(records),
        num_completed=len(done),
        num_errors=len(records) - len(done),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=per_s(len(done)),
        input_throughput=per_s(input_tokens),
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        ttft_ms=Distribution.of_seconds([r.ttft_s for r in done]),
        tpot_ms=Distribution.of_seconds([t for t in tpots if t is not None]),
        itl_ms=Distribution.of_seconds(
            [gap for r in done for gap in inter_token_latencies(r.chunk_times_s)]
        ),
        e2e_ms=Distribution.of_seconds([r.e2e_s for r in done]),
        slo=slo,
        num_good=num_good,
        goodput=None if num_good is None else per_s(num_good),
        wall_s=wall_s,
        total_wall_s=total_wall_s,
        errors=error_counts(records),
        total_cached_tokens=sum(r.cached_tokens for r in done),
        kv_transfer_tokens=_counter(server, "lightpd_kv_transfer_tokens_total"),
        kv_transfer_bytes=_counter(server, "lightpd_kv_transfer_bytes_total"),
    )


def _counter(server: dict[str, float] | None, name: str) -> int | None:
    return None if server is None or name not in server else int(server[name])


_BUCKETS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def timeline(records: Sequence[RequestRecord], bucket_s: float | None = None) -> dict:
    """Per time bucket from the run's start (by default about 40 buckets): output
    tokens/s of completed requests, completed and failed requests/s (by when they
    ended), and requests in flight at the bucket's start, failed ones included
    until they failed. A chunk's tokens are its request's output tokens spread
    evenly over its chunks (exact when a chunk is a token)."""
    end_of_run = max((r.finished_s for r in records if r.finished_s is not None), default=0.0)
    if bucket_s is None:
        bucket_s = next((b for b in _BUCKETS_S if b >= end_of_run / 40), _BUCKETS_S[-1])
    num_buckets = max(1, math.ceil(end_of_run / bucket_s))
    tokens = [0.0] * num_buckets
    completed = [0.0] * num_buckets
    failed = [0.0] * num_buckets
    in_flight = [0] * num_buckets

    def bucket(t: float) -> int:
        return min(num_buckets - 1, int(t / bucket_s))

    for r in records:
        if r.finished_s is None:  # never sent
            continue
        if r.ok:
            share = r.output_tokens / len(r.chunk_times_s)
            for t in r.chunk_times_s:
                tokens[bucket(r.sent_s + t)] += share / bucket_s
            completed[bucket(r.finished_s)] += 1 / bucket_s
        else:
            failed[bucket(r.finished_s)] += 1 / bucket_s
        for b in range(num_buckets):
            if r.sent_s <= b * bucket_s < r.finished_s:
                in_flight[b] += 1
    return {
        "bucket_s": bucket_s,
        "start_s": [b * bucket_s for b in range(num_buckets)],
        "output_tokens_per_s": tokens,
        "completed_per_s": completed,
        "failed_per_s": failed,
        "in_flight": in_flight,
    }
