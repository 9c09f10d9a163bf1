"""Redis killed (SIGKILL) and restarted on its port and data under load (issue 14).

The acceptance: no plain-text 500 (every error is JSON, a 503 with Retry-After
where Redis is needed), no stream ends without an error event or [DONE], an API
key made before the outage works after it (Redis persists to its append-only
file), the fleet serves requests that need Redis again within seconds, and
afterwards Redis holds no running request and knows how every request ended.
"""

import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from lightpd.common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import LocalFleet

OUTAGE_S = 3.0
SERVES_AGAIN_WITHIN_S = 5.0
MAX_TOKENS = 48


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: str  # the whole body; for a stream, its data lines joined by newlines
    started: float
    ended: float

    @property
    def lines(self) -> list[str]:
        return self.body.splitlines()


def chat(url: str, key: str, stream: bool) -> Reply:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as reply:
        if stream and reply.status_code == 200:
            text = "\n".join(line for line in reply.iter_lines() if line.startswith("data: "))
        else:
            text = reply.read().decode()
    return Reply(reply.status_code, reply.headers, text, started, time.monotonic())


class Load:
    """Workers sending chat requests (streams, and every third one whole) until stopped."""

    def __init__(self, url: str, key: str, num_workers: int = 6) -> None:
        self.url = url
        self.key = key
        self.replies: list[Reply] = []
        self.errors: list[BaseException] = []  # transport errors: a cut connection
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(num_workers)
        ]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _work(self, worker: int) -> None:
        num_sent = 0
        while not self._done.is_set():
            num_sent += 1
            try:
                self.replies.append(chat(self.url, self.key, stream=(worker + num_sent) % 3 != 0))
            except httpx.HTTPError as exc:
                self.errors.append(exc)


def assert_json_error(reply: httpx.Response | Reply) -> dict:
    """The error in the API's JSON shape, never plain text."""
    assert reply.headers["content-type"].startswith("application/json"), reply
    error = json.loads(reply.body if isinstance(reply, Reply) else reply.text)["error"]
    assert error["message"] and error["type"], error
    return error


def request_id(reply: Reply) -> str:
    """The id under which the control plane records the reply's request (choice 0)."""
    first = reply.lines[0] if reply.lines and reply.lines[0].startswith("data: ") else None
    response = json.loads(first.removeprefix("data: ") if first else reply.body)
    return f"{response['id']}-0"


@pytest.fixture
def fleet(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny", "llama")
    fleet = LocalFleet(str(model), node_args=("--num-kv-slots", "4096"))
    try:
        yield fleet.start()
    finally:
        fleet.stop()


def test_a_redis_restart_under_load_cuts_nothing_and_loses_nothing(fleet):
    # Two keys made before the outage: one in use (the control plane has checked it
    # lately), one never shown to the control plane before Redis goes.
    used_key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]
    fresh_key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]
    assert chat(fleet.url, used_key, stream=False).status == 200
    history = {r["request_id"] for r in fleet.admin("GET", "/admin/requests").json()}
    assert history

    with Load(fleet.url, used_key) as load:
        time.sleep(1.5)  # streams under way
        killed_at = time.monotonic()
        fleet.redis.kill()
        time.sleep(0.5)

        health = httpx.get(f"{fleet.url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        nodes = fleet.admin("GET", "/admin/nodes")
        assert nodes.status_code == 503 and int(nodes.headers["retry-after"]) > 0
        assert assert_json_error(nodes)["code"] == "redis_unavailable"
        # A key the control plane has not seen cannot be checked: 503, not 401.
        unchecked = chat(fleet.url, fresh_key, stream=False)
        assert unchecked.status == 503 and int(unchecked.headers["retry-after"]) > 0
        assert_json_error(unchecked)

        time.sleep(max(0.0, killed_at + OUTAGE_S - time.monotonic()))
        fleet.redis.start()  # same port, same data folder
        restarted_at = time.monotonic()
        # Served again: the key that needs Redis to be checked works.
        while (again := chat(fleet.url, fresh_key, stream=True)).status != 200:
            assert_json_error(again)
            assert time.monotonic() - restarted_at < SERVES_AGAIN_WITHIN_S, again.body
            time.sleep(0.2)
        assert again.lines[-1] == "data: [DONE]"
        time.sleep(1.5)  # more load after the outage

    assert not load.errors, load.errors
    during = [r for r in load.replies if killed_at < r.started and r.ended < restarted_at]
    straddling = [r for r in load.replies if r.started < killed_at < r.ended]
    assert during and straddling, "the load did not cover the outage"
    for reply in load.replies:
        assert reply.status != 500
        if reply.status != 200:
            assert_json_error(reply)
            assert reply.status == 503 and "retry-after" in reply.headers, reply.body
        elif reply.headers["content-type"].startswith("text/event-stream"):
            events = reply.lines
            assert events[-1] == "data: [DONE]", events[-3:]
            ended = [e for e in events[:-1] if '"finish_reason": "length"' in e or "error" in e]
            assert ended, f"a stream ended without a finish or an error: {events[-3:]}"
    # Nothing needed Redis but the key check, and that key was known: all served.
    assert {r.status for r in load.replies} == {200}
    assert not [r.body for r in load.replies if '"error"' in r.body]

    # Redis learns how every request ended, those of the outage included, and
    # holds none as running; what it held before the outage is still there.
    served = {request_id(r) for r in load.replies} | {request_id(again)}
    deadline = time.monotonic() + 10
    while True:
        running = fleet.admin("GET", "/admin/requests?running=true").json()
        recorded = {
            r["request_id"]: r["state"]
            for r in fleet.admin("GET", "/admin/requests?limit=1000").json()
        }
        if not running and served <= recorded.keys():
            break
        assert time.monotonic() < deadline, (running, served - recorded.keys())
        time.sleep(0.3)
    assert {recorded[rid] for rid in served} == {"finished"}
    assert history <= recorded.keys()
