"""The control plane while its Redis is down (SIGKILL) and after it comes back (issue 14).

Each test has a Redis of its own, killed and restarted on the same port and data.
"""

import asyncio
import logging
import time

import pytest
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from lightpd.controlplane.app import create_app, redis_client
from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import PENDING_RETRY_S, Store
from tests.controlplane.test_store import STATS, registration

ADMIN = "admin-token"
CLUSTER = "cluster-token"
STATIC_KEY = "sk-static"


@pytest.fixture
def server():
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def settings(server, tiny_model) -> Settings:
    return Settings(
        model=tiny_model("llama"),
        redis_url=server.url,
        admin_token=ADMIN,
        cluster_token=CLUSTER,
        api_keys=STATIC_KEY,
        node_ttl_s=0.5,
    )


def run(settings: Settings, body, **store_options):
    """``body(store)`` on a store over the app's own Redis client."""

    async def main():
        client = redis_client(settings)
        try:
            return await body(Store(client, settings.node_ttl_s, **store_options))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def test_request_states_wait_in_memory_while_redis_is_down_and_reach_it_after(server, settings):
    async def body(store: Store):
        await store.record_request("r1", "queued", prompt_tokens=7)  # Redis has it running
        server.kill()
        # Nothing raises: the states wait in memory, the latest per request.
        await store.record_request("r1", "decoding", ttft_s=0.25)
        await store.record_request("r1", "finished", output_tokens=16, error="")
        await store.record_request("r2", "queued", prompt_tokens=3)
        await store.record_request("r2", "prefilling", prefill_node="p1")
        await store.record_request("r2", "transferring")
        await store.record_request("r2", "prefilling", prefill_node="p2")  # a retry
        assert store.num_pending_requests == 2
        await asyncio.sleep(PENDING_RETRY_S + 0.5)  # tried again meanwhile, in vain
        assert store.num_pending_requests == 2

        server.start()
        await until(lambda: _no_pending(store))
        r2, r1 = await store.requests()
        assert (r1.request_id, r1.state, r1.output_tokens, r1.ttft_s) == (
            "r1",
            "finished",
            16,
            0.25,
        )
        assert [s.state for s in r1.timeline] == ["queued", "decoding", "finished"]
        assert (r2.state, r2.prefill_node, r2.prompt_tokens) == ("prefilling", "p2", 3)
        assert [s.state for s in r2.timeline] == ["queued", "prefilling"]  # transfer void
        assert [r.request_id for r in await store.requests(running_only=True)] == ["r2"]

        # Writes go straight to Redis again.
        await store.record_request("r2", "failed", output_tokens=0, error="gone")
        assert store.num_pending_requests == 0 and await store.num_running() == 0

    run(settings, body)


async def _no_pending(store: Store) -> bool:
    return store.num_pending_requests == 0


def test_the_request_buffer_is_bounded_and_says_when_it_drops(server, settings, caplog):
    async def body(store: Store):
        server.kill()
        for i in range(5):
            await store.record_request(f"r{i}", "queued", prompt_tokens=1)
        await store.record_request("r3", "finished", output_tokens=1, error="")
        assert store.num_pending_requests == 3  # r0 and r1, updated longest ago, dropped
        server.start()
        await until(lambda: _no_pending(store))
        return await store.requests()

    with caplog.at_level(logging.WARNING, logger="lightpd.controlplane.store"):
        recorded = run(settings, body, max_pending_requests=3)
    assert {r.request_id: r.state for r in recorded} == {
        "r2": "queued",
        "r3": "finished",
        "r4": "queued",
    }
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropping the oldest" in m and "r0" in m for m in messages), messages
    assert any("2 were dropped" in m for m in messages), messages


def test_api_keys_redis_confirmed_work_while_it_is_down_and_others_raise(server, settings):
    async def body(store: Store):
        await store.add_api_key("sk-confirmed")
        await store.add_api_key("sk-unseen")
        assert await store.api_key_known("sk-confirmed")
        assert not await store.api_key_known("sk-never-made")
        server.kill()
        assert await store.api_key_known("sk-confirmed")
        assert await store.has_api_keys()  # Redis's last answer
        with pytest.raises(RedisConnectionError):
            await store.api_key_known("sk-unseen")  # maybe valid: not a plain "no"
        with pytest.raises(RedisConnectionError):
            await store.api_key_known("sk-never-made")
        server.start()
        assert await store.api_key_known("sk-unseen")  # it persisted
        await store.remove_api_key("sk-confirmed")
        server.kill()
        with pytest.raises(RedisConnectionError):  # a removed key is forgotten here too
            await store.api_key_known("sk-confirmed")

    run(settings, body)


def test_the_fleet_routes_from_its_last_registry_and_keeps_nodes_through_the_lapse(
    server, settings
):
    async def body(store: Store):
        fleet = Fleet(store, "f" * 16, refresh_s=0.0)
        await store.register(registration("d1"))
        assert await store.heartbeat("d1", STATS) == "ready"
        assert (await fleet.pick("decode", set())).node_id == "d1"

        server.kill()
        await asyncio.sleep(2 * store.node_ttl_s)  # no heartbeat can reach Redis
        assert (await fleet.pick("decode", set())).node_id == "d1"
        assert await fleet.is_alive("d1") and await fleet.max_model_len() == 256

        server.start()
        # Redis reads the node dead (its heartbeats lapsed), but that was the outage:
        # the fleet keeps it for a TTL, time enough for it to register again.
        assert [n.status for n in await store.nodes()] == ["dead"]
        assert await fleet.is_alive("d1")
        await asyncio.sleep(store.node_ttl_s + 0.1)  # it did not come back: dead
        assert not await fleet.is_alive("d1")
        assert await fleet.pick("decode", set()) is None

    run(settings, body)


def test_the_api_answers_json_503s_with_retry_after_while_redis_is_down(server, settings):
    app = create_app(settings)

    @app.get("/test-boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        made = client.post("/admin/api-keys", headers=admin).json()["api_key"]
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {made}"}).is_success
        assert client.get("/health").json() == {"status": "ok"}
        server.kill()

        health = client.get("/health")  # liveness: this process still serves
        assert health.status_code == 200
        assert health.json() == {
            "status": "degraded",
            "redis": "unreachable",
            "pending_request_states": 0,
        }
        needs_redis = [
            client.get("/admin/nodes", headers=admin),
            client.post("/admin/api-keys", headers=admin),
            client.post(
                "/internal/nodes",
                headers={"Authorization": f"Bearer {CLUSTER}"},
                json={
                    **registration("d1").model_dump(),
                    "model_fingerprint": app.state.lightpd.model_fingerprint,
                    "session": "s" * 16,
                },
            ),
            client.put(
                "/internal/nodes/d1/heartbeat",
                headers={"Authorization": f"Bearer {CLUSTER}"},
                json=STATS.model_dump(),
            ),
            client.get("/v1/models", headers={"Authorization": "Bearer sk-unknown"}),
        ]
        for reply in needs_redis:
            assert reply.status_code == 503, (reply.request.url, reply.text)
            assert int(reply.headers["retry-after"]) > 0
            error = reply.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "redis_unavailable")
        for key in (STATIC_KEY, made):  # configured, and confirmed before the outage
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
        assert client.get("/v1/models").status_code == 401  # no key is still no key

        server.start()
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/admin/nodes", headers=admin).json() == []

        # Whatever else goes wrong is JSON too, never a plain-text 500.
        crash = client.get("/test-boom")
        assert crash.status_code == 500 and crash.json()["error"]["type"] == "server_error"
