"""The dashboard's routes and the admin API it reads: sign-in, sessions, 401s, overview."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from lightpd.common.wire.identity import model_fingerprint
from lightpd.controlplane import session
from lightpd.controlplane.app import create_app
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import Store
from tests.controlplane.test_store import registration

ADMIN = "admin-secret-token"
CLUSTER = "cluster-token"
DATA_ENDPOINTS = ["/admin/overview", "/admin/timeseries", "/admin/nodes", "/admin/requests"]


@pytest.fixture
def client(redis_url, tiny_model):
    settings = Settings(
        model=tiny_model("llama"),
        redis_url=redis_url,
        admin_token=ADMIN,
        cluster_token=CLUSTER,
        node_ttl_s=1.0,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        client.fingerprint = model_fingerprint(settings.model)
        yield client


def register(client: TestClient, node_id: str, role: str = "decode") -> None:
    body = registration(node_id, role).model_dump()
    body["model_fingerprint"] = client.fingerprint
    body["session"] = f"session-of-{node_id}".ljust(16, "0")
    reply = client.post(
        "/internal/nodes", json=body, headers={"Authorization": f"Bearer {CLUSTER}"}
    )
    assert reply.status_code == 201, reply.text


def sign_in(client: TestClient, token: str = ADMIN):
    return client.post("/dashboard/session", json={"token": token})


def test_without_the_admin_token_the_page_and_its_data_answer_401(client):
    page = client.get("/dashboard")
    assert page.status_code == 401
    assert 'id="signin"' in page.text and 'method="post"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for path in DATA_ENDPOINTS:
        assert client.get(path).status_code == 401, path
        wrong = client.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401, path
    client.cookies.set(session.COOKIE, f"{int(time.time()) + 60}.forged")
    assert client.get("/dashboard").status_code == 401
    assert client.get("/admin/overview").status_code == 401
    # The scripts and the vendored chart library hold no data: served to all.
    assert client.get("/dashboard/static/app.js").status_code == 200
    assert "uPlot" in client.get("/dashboard/static/vendor/uPlot.iife.min.js").text
    assert "MIT License" in client.get("/dashboard/static/vendor/LICENSE.uPlot").text


def test_sign_in_gives_an_httponly_session_and_sign_out_ends_it(client):
    wrong = sign_in(client, "guess")
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong admin token"
    assert session.COOKIE not in client.cookies
    # The token is taken from a JSON body only, never from a URL or a form.
    assert client.post(f"/dashboard/session?token={ADMIN}").status_code == 400
    form = client.post("/dashboard/session", data={"token": ADMIN})
    assert form.status_code == 415 and session.COOKIE not in client.cookies

    reply = sign_in(client)
    assert reply.status_code == 204
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert ADMIN not in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200 and 'id="nodes"' in page.text
    overview = client.get("/admin/overview").json()
    assert {"now", "nodes", "stats", "requests", "timeseries"} <= overview.keys()

    assert client.delete("/dashboard/session").status_code == 204
    assert client.get("/dashboard").status_code == 401
    assert client.get("/admin/overview").status_code == 401


def test_changes_by_cookie_need_the_dashboard_header(client):
    register(client, "d1")
    sign_in(client)
    refused = client.post("/admin/nodes/d1/drain")
    assert refused.status_code == 403 and "x-lightpd-dashboard" in refused.text
    headers = {session.CSRF_HEADER: "1"}
    assert client.post("/admin/nodes/d1/drain", headers=headers).json()["status"] == "draining"
    [node] = client.get("/admin/overview").json()["nodes"]
    assert node["status"] == "draining"
    assert client.delete("/admin/nodes/d1", headers=headers).json()["status"] == "removed"
    assert client.get("/admin/overview").json()["nodes"] == []
    # The bearer token needs no such header (lightctl, scripts).
    register(client, "d2")
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    client.cookies.clear()
    assert client.post("/admin/nodes/d2/drain", headers=bearer).status_code == 200


def test_overview_shows_dead_nodes_and_failed_requests_with_their_error(client, redis_url):
    register(client, "d1")
    register(client, "p1", "prefill")

    async def requests():
        redis = aioredis.Redis.from_url(redis_url)
        store = Store(redis, node_ttl_s=1.0)
        await store.record_request("ok", "queued", prompt_tokens=5)
        await store.record_request("bad", "queued", prompt_tokens=5)
        await store.record_request("bad", "failed", output_tokens=0, error="node d9 left")
        await redis.aclose()

    asyncio.run(requests())
    time.sleep(1.3)  # the nodes' TTL passes without a heartbeat
    headers = {"Authorization": f"Bearer {ADMIN}"}
    overview = client.get("/admin/overview?window=30&requests=10", headers=headers).json()
    assert [(n["node_id"], n["status"]) for n in overview["nodes"]] == [
        ("d1", "dead"),
        ("p1", "dead"),
    ]
    decode = overview["stats"]["roles"]["decode"]
    assert (decode["nodes"], decode["dead"], decode["ready"], decode["slots"]) == (1, 1, 0, 0)
    by_id = {r["request_id"]: r for r in overview["requests"]}
    assert by_id["ok"]["state"] == "queued" and by_id["bad"]["error"] == "node d9 left"
    assert overview["requests"][0]["request_id"] == "ok"  # running ones first
    assert len(overview["timeseries"]["t"]) == 30
    series = client.get("/admin/timeseries?window=60&step=5", headers=headers).json()
    assert len(series["t"]) == 12 and series["step_s"] == 5
    assert client.get("/admin/timeseries?window=100000", headers=headers).status_code == 400


def heartbeat(client: TestClient, node_id: str) -> None:
    """Keep a node alive (the TTL here is 1 s) just before a step that needs it so."""
    stats = dict(
        num_free_slots=100, num_reserved_slots=0, num_running=0, num_queued=0,
        num_queued_tokens=0, tokens_per_s=0.0,
    )  # fmt: skip
    reply = client.put(
        f"/internal/nodes/{node_id}/heartbeat",
        json=stats,
        headers={
            "Authorization": f"Bearer {CLUSTER}",
            "X-Lightpd-Node-Session": f"session-of-{node_id}".ljust(16, "0"),
        },
    )
    assert reply.status_code == 200, reply.text


def test_undrain_puts_a_draining_or_migrating_node_back_to_ready(client):
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    register(client, "d1")
    register(client, "d2")
    assert client.post("/admin/nodes/d1/drain", headers=bearer).json()["status"] == "draining"
    migrating = client.post("/admin/nodes/d2/drain?migrate=true", headers=bearer).json()
    assert migrating["status"] == "migrating"
    heartbeat(client, "d1")
    heartbeat(client, "d2")
    decode = client.get("/admin/overview", headers=bearer).json()["stats"]["roles"]["decode"]
    assert (decode["ready"], decode["draining"], decode["migrating"]) == (0, 1, 1)

    for node_id in ("d1", "d2"):
        heartbeat(client, node_id)
        reply = client.post(f"/admin/nodes/{node_id}/undrain", headers=bearer)
        assert reply.status_code == 200 and reply.json() == {"node_id": node_id, "status": "ready"}
    heartbeat(client, "d1")
    heartbeat(client, "d2")
    assert [n["status"] for n in client.get("/admin/nodes", headers=bearer).json()] == [
        "ready",
        "ready",
    ]
    heartbeat(client, "d1")
    assert client.post("/admin/nodes/d1/undrain", headers=bearer).json()["status"] == "ready"

    missing = client.post("/admin/nodes/nope/undrain", headers=bearer)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no node nope"
    assert client.post("/admin/nodes/d1/undrain").status_code == 401
    # From the dashboard: the session cookie and the dashboard's header.
    sign_in(client)
    assert client.post("/admin/nodes/d1/undrain").status_code == 403
    heartbeat(client, "d1")
    undrained = client.post("/admin/nodes/d1/undrain", headers={session.CSRF_HEADER: "1"})
    assert undrained.json()["status"] == "ready"
    # A dead node becomes ready by registering again, not by undrain.
    time.sleep(1.3)
    dead = client.post("/admin/nodes/d2/undrain", headers=bearer)
    assert dead.status_code == 409 and "is dead" in dead.json()["error"]["message"]
