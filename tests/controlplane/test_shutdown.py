"""A control plane's stop, and the ends of streams that go wrong (issue 14), in process:
the dispatcher is replaced by a fake that yields one token every few milliseconds
until its max_tokens, so nothing here needs a node. tests/e2e/test_control_plane_restart.py
runs the same with real processes and signals."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from lightpd.common.wire.messages import TokenEvent
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane import store as store_module
from lightpd.controlplane.app import _exit_within, create_app
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis
from lightpd.controlplane.settings import Settings

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOKEN_S = 0.005
GRACE_S = 0.5


class FakeDispatch:
    """Stands in for Dispatcher.generate; remembers which requests were aborted.
    ``swallow_cancel``: a cancel is taken for an event, as Python 3.11's wait_for
    does when the two come at once (the node client's next_event uses it)."""

    def __init__(self, fail_after: int | None = None, swallow_cancel: bool = False) -> None:
        self.fail_after = fail_after
        self.swallow_cancel = swallow_cancel
        self.num_started = 0
        self.aborted: list[str] = []

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        admitted: asyncio.Event | None = None,
        stopped_here: asyncio.Event | None = None,
    ) -> AsyncIterator[TokenEvent]:
        assert admitted is not None
        admitted.set()
        self.num_started += 1
        try:
            for i in range(params.max_new_tokens):
                try:
                    await asyncio.sleep(TOKEN_S)
                except asyncio.CancelledError:
                    if not self.swallow_cancel:
                        raise
                if i == self.fail_after:
                    raise RuntimeError("a bug in the dispatcher")
                last = i == params.max_new_tokens - 1
                yield TokenEvent(
                    request_id=request_id, token_ids=[65], finish_reason="length" if last else None
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise


@pytest.fixture
def client(redis_url, tiny_model):
    settings = Settings(
        model=tiny_model("llama"),
        served_model_name="tiny",
        redis_url=redis_url,
        admin_token="admin-token",
        cluster_token="cluster-token",
        api_keys=API_KEY,
        shutdown_grace_s=GRACE_S,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


def serve_with(client: TestClient, dispatch: FakeDispatch, monkeypatch) -> None:
    """Route the app's requests to ``dispatch``, as if a node were ready."""
    state = client.app.state.lightpd

    async def max_model_len() -> int:
        return 2048

    monkeypatch.setattr(state.fleet, "max_model_len", max_model_len)
    monkeypatch.setattr(state.dispatcher, "generate", dispatch.generate)


def body(max_tokens: int, stream: bool) -> dict:
    return {
        "model": "tiny",
        "prompt": [5, 6, 7],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def events(reply: httpx.Response) -> list[dict | str]:
    """A stream's events, each checked whole: ``data: `` and JSON or [DONE], then a
    blank line."""
    assert reply.text.endswith("\n\n"), reply.text[-200:]
    out: list[dict | str] = []
    for event in reply.text.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        data = event.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_json_503(reply: httpx.Response) -> dict:
    assert reply.status_code == 503, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert int(reply.headers["retry-after"]) > 0
    return reply.json()["error"]


def test_no_ready_node_is_a_503_with_retry_after(client):
    reply = client.post("/v1/completions", json=body(4, stream=False), headers=AUTH)
    assert "no node is ready" in assert_json_503(reply)["message"]


def test_an_unexpected_exception_ends_a_stream_with_an_error_event_and_done(
    client, monkeypatch, caplog
):
    serve_with(client, FakeDispatch(fail_after=3), monkeypatch)
    with caplog.at_level(logging.ERROR):
        reply = client.post("/v1/completions", json=body(10, stream=True), headers=AUTH)
    assert reply.status_code == 200
    sent = events(reply)
    assert sent[-1] == "[DONE]"
    assert sent[-3]["error"] == {
        "message": "internal error in the control plane",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert sent[-2]["usage"]["completion_tokens"] == 3  # the tokens before the bug
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "a bug in the dispatcher" in str(logged[0].exc_info[1])


def test_a_shutdown_lets_requests_finish_within_its_grace_and_ends_the_rest(client, monkeypatch):
    dispatch = FakeDispatch()
    serve_with(client, dispatch, monkeypatch)
    shutdown = client.app.state.shutdown
    short_tokens = int(GRACE_S / 4 / TOKEN_S)  # finishes well within the grace
    long_tokens = int(GRACE_S * 20 / TOKEN_S)  # does not

    async def scenario() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:

            def post(max_tokens: int, stream: bool):
                return asyncio.create_task(
                    c.post("/v1/completions", json=body(max_tokens, stream), headers=AUTH)
                )

            running = {
                "short stream": post(short_tokens, stream=True),
                "long stream": post(long_tokens, stream=True),
                "short whole": post(short_tokens, stream=False),
                "long whole": post(long_tokens, stream=False),
            }
            while dispatch.num_started < len(running):
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(shutdown.drain())
            await asyncio.sleep(0.01)
            replies = {
                "new": await c.post("/v1/completions", json=body(4, False), headers=AUTH),
                "health": await c.get("/health"),
            }
            await asyncio.wait_for(drain, GRACE_S + 2)
            for name, task in running.items():
                replies[name] = await task
            return replies

    replies = client.portal.call(scenario)

    assert assert_json_503(replies["new"])["code"] == "shutting_down"
    assert replies["new"].headers["connection"] == "close"
    assert replies["health"].json() == {"status": "stopping", "running_requests": 4}

    finished = events(replies["short stream"])
    assert finished[-1] == "[DONE]" and finished[-2]["usage"]["completion_tokens"] == short_tokens
    assert finished[-3]["choices"][0]["finish_reason"] == "length"
    assert replies["short whole"].json()["usage"]["completion_tokens"] == short_tokens

    ended = events(replies["long stream"])
    assert ended[-1] == "[DONE]"
    assert ended[-3]["error"]["code"] == "shutting_down"
    assert 0 < ended[-2]["usage"]["completion_tokens"] < long_tokens
    assert assert_json_503(replies["long whole"])["code"] == "shutting_down"

    assert len(dispatch.aborted) == 2  # the long ones, whose nodes free their KV
    assert shutdown.num_running == 0
    # Health and the admin API still answer; the OpenAI API refuses.
    assert client.get("/health").json()["status"] == "stopping"
    assert client.post("/v1/completions", json=body(4, False), headers=AUTH).status_code == 503


def test_a_choice_stops_though_a_cancel_is_swallowed_below(client, monkeypatch):
    dispatch = FakeDispatch(swallow_cancel=True)
    serve_with(client, dispatch, monkeypatch)
    shutdown = client.app.state.shutdown
    num_tokens = int(GRACE_S * 20 / TOKEN_S)

    async def scenario() -> tuple[httpx.Response, float]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            stream = asyncio.create_task(
                c.post("/v1/completions", json=body(num_tokens, True), headers=AUTH)
            )
            while not dispatch.num_started:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.wait_for(shutdown.drain(), GRACE_S * 10)
            return await stream, time.monotonic() - started

    reply, took = client.portal.call(scenario)
    ended = events(reply)
    assert ended[-1] == "[DONE]" and ended[-3]["error"]["code"] == "shutting_down"
    assert len(dispatch.aborted) == 1  # closed, not left to run to its end
    assert took < GRACE_S + 1


def test_the_app_writes_what_waits_for_redis_once_more_as_it_stops(tiny_model, monkeypatch):
    monkeypatch.setattr(store_module, "PENDING_RETRY_S", 60.0)  # no retry but the last
    with EmbeddedRedis() as server:
        settings = Settings(
            model=tiny_model("llama"),
            redis_url=server.url,
            admin_token="admin-token",
            cluster_token="cluster-token",
        )
        app = create_app(settings)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            store = app.state.lightpd.store
            server.kill()
            client.portal.call(partial(store.record_request, "r1", "queued", prompt_tokens=3))
            assert store.num_pending_requests == 1
            server.start()
        assert store.num_pending_requests == 0
        assert store._request_writes._retry.done()
        assert redis.Redis.from_url(server.url).hget("lightpd:request:r1", "state") == b"queued"


def test_an_exit_step_that_never_ends_is_cut_and_says_where_it_waited(caplog):
    """A stop never hangs: a step of the lifespan's end that waits past the bound is
    cancelled, and the log shows where every task still waited."""
    finished = []

    async def stuck_in_a_step() -> None:
        try:
            await asyncio.Event().wait()  # nothing ever sets it
        finally:
            finished.append("cancelled")

    async def main() -> float:
        started = time.monotonic()
        await _exit_within(0.3, stuck_in_a_step())
        return time.monotonic() - started

    with caplog.at_level(logging.ERROR, logger="lightpd.controlplane.app"):
        elapsed = asyncio.run(main())
    assert 0.3 <= elapsed < 5 and finished == ["cancelled"]
    assert "the control plane's exit took over 0.3 s; cancelled" in caplog.text
    assert "stuck_in_a_step" in caplog.text
