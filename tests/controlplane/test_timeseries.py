"""The cluster's per-second history in Redis, as the dashboard's charts read it."""

import asyncio

import pytest
import redis.asyncio as aioredis

from lightpd.controlplane import timeseries
from lightpd.controlplane.fleet_schemas import NodePublic
from lightpd.controlplane.timeseries import Timeseries, percentile
from tests.controlplane.test_store import STATS, registration

T0 = 1_800_000_000  # a whole second


def test_percentile_interpolates_and_is_none_without_samples():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([0.2], 99) == 0.2
    assert percentile([], 50) is None


def test_control_planes_add_up_per_second_and_points_aggregate(redis_url, monkeypatch):
    clock = [T0 + 0.2]
    monkeypatch.setattr(timeseries.time, "time", lambda: clock[0])
    times = {"stats": STATS, "registered_at": T0, "last_heartbeat": T0}
    nodes = [
        NodePublic(**registration("d1").model_dump(), status="ready", **times),
        NodePublic(**registration("p1", "prefill").model_dump(), status="dead", **times),
    ]

    async def registry():
        return nodes

    async def main():
        client = aioredis.Redis.from_url(redis_url)
        one, two = Timeseries(client, registry), Timeseries(client, registry)
        one.count("started", 2)
        one.count("tokens", 30)
        one.request_ended("finished", ttft_s=0.1, tpot_s=0.02)
        two.count("tokens", 10)
        two.request_ended("finished", ttft_s=0.3, tpot_s=None)
        two.request_ended("failed", ttft_s=None, tpot_s=None)
        clock[0] = T0 + 2.5  # a second with tokens only
        one.count("tokens", 6)
        await one.flush()
        await two.flush()
        clock[0] = T0 + 9.9
        per_second = await one.read(window_s=10, step_s=1)
        per_5_s = await one.read(window_s=10, step_s=5)
        await client.aclose()
        return per_second, per_5_s

    per_second, per_5_s = asyncio.run(main())
    end = T0 + 9 - timeseries.SETTLE_S
    assert per_second["t"] == list(range(end - 9, end + 1))
    at = per_second["t"].index(T0)
    assert per_second["tokens_per_s"][at : at + 3] == [40, 0, 6]
    assert per_second["requests_per_s"][at] == 2 and per_second["failed_per_s"][at] == 1
    assert per_second["started_per_s"][at] == 2
    assert per_second["ttft_p50_s"][at] == pytest.approx(0.2)
    assert per_second["ttft_p99_s"][at] == pytest.approx(0.298)
    assert per_second["tpot_p50_s"][at] == pytest.approx(0.02)
    assert per_second["ttft_p50_s"][at + 1] is None  # no request ended then
    # KV use of the live nodes only, written at each flush: (128 - 100) / 128.
    assert per_second["kv_use"] == {"decode": [None] * (at + 2) + [28 / 128] + [None] * (7 - at)}
    assert per_5_s["t"] == [end - 5, end]
    assert per_5_s["tokens_per_s"] == [46 / 5, 0]
    assert per_5_s["requests_per_s"] == [2 / 5, 0]
    assert per_5_s["kv_use"]["decode"] == [28 / 128, None]
