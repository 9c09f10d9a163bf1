"""The cluster's recent history, second by second, in Redis (shared by all control planes).

Each control plane counts what its requests do in memory (arrivals, endings,
generated tokens, TTFT and TPOT samples) and adds it to the bucket of each
second once a second, so Redis stays off the per-token path. The same loop
writes the KV use of each role, read from the registry. A bucket is a hash
``lightpd:ts:{second}`` with its latency samples in two lists beside it; all
expire after ``KEEP_S``. Readers aggregate buckets into points of ``step_s``
seconds and compute percentiles on the server.
"""

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as redis

from lightpd.controlplane.fleet_schemas import NodePublic

logger = logging.getLogger(__name__)
KEEP_S = 660  # ten minutes of history, and a minute of slack
FLUSH_S = 1.0
# Seconds at the end of a window that some control plane may not have flushed yet.
SETTLE_S = 2
MAX_SAMPLES_PER_S = 2000  # per control plane and second: bounds a bucket under heavy load
COUNTERS = ("started", "finished", "failed", "aborted", "tokens")
SAMPLES = ("ttft", "tpot")


def _key(second: int) -> str:
    return f"lightpd:ts:{second}"


@dataclass
class _Bucket:
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation, or None of no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Timeseries:
    def __init__(
        self, client: redis.Redis, nodes: Callable[[], Awaitable[list[NodePublic]]]
    ) -> None:
        self.redis = client
        self.nodes = nodes
        self._pending: dict[int, _Bucket] = defaultdict(_Bucket)

    # ---- recording (in memory, called by the dispatcher) ----

    def count(self, name: str, amount: int = 1) -> None:
        self._pending[int(time.time())].counts[name] += amount

    def request_ended(self, state: str, ttft_s: float | None, tpot_s: float | None) -> None:
        bucket = self._pending[int(time.time())]
        bucket.counts[state] += 1
        for name, value in (("ttft", ttft_s), ("tpot", tpot_s)):
            if value is not None and len(bucket.samples[name]) < MAX_SAMPLES_PER_S:
                bucket.samples[name].append(value)

    # ---- writing to Redis ----

    async def run(self) -> None:
        """Flush once a second until cancelled, and once more then."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self._flush_logged()
        finally:
            await self._flush_logged()

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except (redis.RedisError, OSError) as exc:  # Redis hiccups cost a second, no more
            logger.warning("time series flush failed: %s", exc)

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(_Bucket)
        now = int(time.time())
        kv_use = _kv_use(await self.nodes())
        async with self.redis.pipeline(transaction=False) as pipe:
            for second, bucket in pending.items():
                key = _key(second)
                for name, amount in bucket.counts.items():
                    pipe.hincrby(key, name, amount)
                for name, values in bucket.samples.items():
                    if values:
                        pipe.rpush(f"{key}:{name}", *values)
                        pipe.expire(f"{key}:{name}", KEEP_S)
                pipe.expire(key, KEEP_S)
            if kv_use:
                pipe.hset(_key(now), mapping=kv_use)
                pipe.expire(_key(now), KEEP_S)
            await pipe.execute()

    # ---- reading ----

    async def read(self, window_s: int, step_s: int = 1) -> dict:
        """Columns of ``window_s // step_s`` points ending a moment ago: rates per second,
        latency percentiles in seconds (None where no request ended), KV use per role
        as a fraction of its slots (None where no node of the role reported)."""
        end = int(time.time()) - SETTLE_S
        num_points = max(1, window_s // step_s)
        start = end - num_points * step_s + 1
        seconds = list(range(start, end + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for second in seconds:
                pipe.hgetall(_key(second))
            buckets = [{k.decode(): v.decode() for k, v in b.items()} for b in await pipe.execute()]
        wanted = [s for s, b in zip(seconds, buckets, strict=True) if int(b.get("finished", 0))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for second in wanted:
                for name in SAMPLES:
                    pipe.lrange(f"{_key(second)}:{name}", 0, -1)
            replies = iter(await pipe.execute())
        samples = {s: {name: [float(v) for v in next(replies)] for name in SAMPLES} for s in wanted}
        roles = sorted({k.split(":", 1)[1] for b in buckets for k in b if k.startswith("kv_used:")})
        columns: dict = {"t": [], "kv_use": {role: [] for role in roles}}
        for name in ("requests_per_s", "failed_per_s", "started_per_s", "tokens_per_s"):
            columns[name] = []
        for name in SAMPLES:
            columns[f"{name}_p50_s"], columns[f"{name}_p99_s"] = [], []
        for i in range(num_points):
            group = range(i * step_s, (i + 1) * step_s)
            columns["t"].append(seconds[group[-1]])
            totals = {c: sum(int(buckets[j].get(c, 0)) for j in group) for c in COUNTERS}
            columns["requests_per_s"].append(totals["finished"] / step_s)
            columns["failed_per_s"].append(totals["failed"] / step_s)
            columns["started_per_s"].append(totals["started"] / step_s)
            columns["tokens_per_s"].append(totals["tokens"] / step_s)
            for name in SAMPLES:
                values = [v for j in group for v in samples.get(seconds[j], {}).get(name, [])]
                columns[f"{name}_p50_s"].append(percentile(values, 50))
                columns[f"{name}_p99_s"].append(percentile(values, 99))
            for role in roles:
                used = [buckets[j].get(f"kv_used:{role}") for j in group]
                slots = [buckets[j].get(f"kv_slots:{role}") for j in group]
                pairs = [(int(u), int(s)) for u, s in zip(used, slots, strict=True) if u and s]
                columns["kv_use"][role].append(
                    sum(u for u, _ in pairs) / sum(s for _, s in pairs) if pairs else None
                )
        return {"step_s": step_s, **columns}


def _kv_use(nodes: list[NodePublic]) -> dict[str, int]:
    """Used and total KV slots per role over the live nodes that reported stats."""
    use: dict[str, int] = defaultdict(int)
    for node in nodes:
        if node.status == "dead" or node.stats is None:
            continue
        use[f"kv_used:{node.role}"] += node.num_slots - node.stats.num_free_slots
        use[f"kv_slots:{node.role}"] += node.num_slots
    return dict(use)
