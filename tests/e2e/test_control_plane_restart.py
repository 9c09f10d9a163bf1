"""A control plane stopped by SIGTERM under load (issue 14), with real processes.

The fleet's nodes heartbeat to its first control plane; each test starts a second
one on the same Redis with a short grace and sends it SIGTERM. The acceptance:
every stream of the stopped control plane either completes with all its tokens or
ends with an error event and [DONE], each event whole (nothing cut mid-line); a
request that comes during the grace gets a JSON 503 with Retry-After; the process
exits 0 soon after the grace; the nodes free the KV of what it ended; and the
other control plane serves on throughout.
"""

import json
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from lightpd.common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import API_KEY, LocalFleet

GRACE_S = 2.0
EXITS_WITHIN_S = GRACE_S + 5.0
# The tiny model makes from tens to a few hundred tokens a second per stream here,
# as other work loads the machine: a short stream is meant to finish within the
# grace (it may not), a long one (the model's whole context) cannot.
SHORT_TOKENS = 50
LONG_TOKENS = 2000
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "llama")
    # Heartbeats may lag on a loaded machine: no node should pass for dead meanwhile.
    fleet = LocalFleet(str(model), node_ttl_s=10.0, node_args=("--num-kv-slots", "20000"))
    try:
        yield fleet.start(prefill=1, decode=1)
    finally:
        fleet.stop()


def body(max_tokens: int, stream: bool) -> dict:
    return {
        "model": "tiny",
        "prompt": [5, 6, 7, 8],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


@dataclass
class Call:
    """One request sent from a thread: its status, headers and whole body, or the
    transport error that cut it."""

    url: str
    max_tokens: int
    stream: bool
    status: int | None = None
    headers: httpx.Headers | None = None
    raw: bytes = b""
    error: Exception | None = None
    first_bytes: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        try:
            with httpx.stream(
                "POST",
                f"{self.url}/v1/completions",
                json=body(self.max_tokens, self.stream),
                headers=HEADERS,
                timeout=60,
            ) as reply:
                self.status, self.headers = reply.status_code, reply.headers
                for chunk in reply.iter_raw():
                    self.raw += chunk
                    self.first_bytes.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first_bytes.set()

    def result(self, timeout: float = 30.0) -> "Call":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"a request to {self.url} hangs"
        assert self.error is None, f"cut: {self.error!r}; received {self.raw[-200:]!r}"
        return self

    def events(self) -> list[dict | str]:
        """The stream's events, each checked whole: ``data: `` and JSON or [DONE],
        then a blank line."""
        text = self.raw.decode()
        assert text.endswith("\n\n"), f"the stream was cut: {text[-200:]!r}"
        out: list[dict | str] = []
        for event in text.split("\n\n")[:-1]:
            assert event.startswith("data: "), f"a truncated event: {event!r}"
            data = event.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
        return out

    def outcome(self) -> str:
        """Either "completed", with every token, or "ended" by the shutdown, with its
        error (an event, or a JSON 503)."""
        if not self.stream:
            if self.status == 200:
                assert json.loads(self.raw)["usage"]["completion_tokens"] == self.max_tokens
                return "completed"
            assert_stopping_503(self)
            return "ended"
        assert self.status == 200, self.raw
        events = self.events()
        assert events[-1] == "[DONE]", events[-3:]
        errors = [e["error"] for e in events[:-1] if "error" in e]
        if errors:
            assert len(errors) == 1 and errors[0]["code"] == "shutting_down", errors
            assert errors[0]["type"] == "service_unavailable"
            return "ended"
        assert events[-2]["usage"]["completion_tokens"] == self.max_tokens, events[-2]
        assert events[-3]["choices"][0]["finish_reason"] == "length", events[-3]
        return "completed"


def assert_stopping_503(reply: httpx.Response | Call) -> None:
    """The shutdown's refusal: a JSON 503 in the API's error shape, with Retry-After."""
    if isinstance(reply, httpx.Response):
        status, raw = reply.status_code, reply.content
    else:
        status, raw = reply.status, reply.raw
    assert status == 503, raw
    assert reply.headers["content-type"].startswith("application/json")
    assert int(reply.headers["retry-after"]) > 0
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down"), error


def until_running(calls: list[Call], timeout: float = 30.0) -> None:
    """Until every stream has sent its first event (it decodes), and a little more for
    the whole requests, started first."""
    deadline = time.monotonic() + timeout
    for call in calls:
        if call.stream:
            assert call.first_bytes.wait(max(0.0, deadline - time.monotonic()))
    time.sleep(0.2)


def pools_idle(fleet: LocalFleet) -> bool:
    nodes = fleet.admin("GET", "/admin/nodes").json()
    return bool(nodes) and all(
        n["stats"]["num_free_slots"] == n["num_slots"] and n["stats"]["num_queued"] == 0
        for n in nodes
    )


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def stop_and_wait(process, started: float) -> float:
    """The seconds from ``started`` until ``process`` exited, which must be with 0."""
    process.wait(timeout=EXITS_WITHIN_S + 10)
    assert process.returncode == 0
    return time.monotonic() - started


def test_sigterm_ends_every_request_whole_and_the_nodes_free_their_kv(fleet):
    stopped = fleet.add_control_plane(LIGHTPD_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        calls = [Call(stopped.url, LONG_TOKENS, stream=False) for _ in range(2)]
        calls += [Call(stopped.url, SHORT_TOKENS, stream=True) for _ in range(4)]
        calls += [Call(stopped.url, LONG_TOKENS, stream=True) for _ in range(6)]
        until_running(calls)
        signalled = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)

        time.sleep(0.3)  # in the grace: new requests are refused, health says so
        refused = httpx.post(
            f"{stopped.url}/v1/completions", json=body(4, False), headers=HEADERS, timeout=10
        )
        assert_stopping_503(refused)
        assert httpx.get(f"{stopped.url}/health", timeout=10).json()["status"] == "stopping"

        took = stop_and_wait(stopped.process, signalled)
        assert GRACE_S <= took < EXITS_WITHIN_S, took
        outcomes = [call.result().outcome() for call in calls]
    finally:
        stopped.stop()

    # Each short one either completed or was ended; the long ones were ended.
    assert outcomes[:2] == ["ended"] * 2, outcomes  # the whole ones: a JSON 503 each
    assert outcomes[6:] == ["ended"] * 6, outcomes
    # Their nodes freed the KV of the requests it ended, and Redis holds none as running.
    wait_until(lambda: pools_idle(fleet), 10, "slots still held")
    running = fleet.admin("GET", "/admin/requests?running=true").json()
    assert not running, running


def test_the_other_control_plane_serves_on(fleet):
    key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]
    stopped = fleet.add_control_plane(LIGHTPD_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        ours = [Call(fleet.url, 600, stream=True) for _ in range(4)]
        theirs = [Call(stopped.url, LONG_TOKENS, stream=True) for _ in range(4)]
        until_running(ours + theirs)
        signalled = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)

        time.sleep(0.3)
        during = httpx.post(
            f"{fleet.url}/v1/completions", json=body(8, False), headers=HEADERS, timeout=30
        )
        assert during.status_code == 200 and during.json()["usage"]["completion_tokens"] == 8
        stop_and_wait(stopped.process, signalled)
        assert [call.result().outcome() for call in theirs] == ["ended"] * 4
    finally:
        stopped.stop()

    # The streams of the one left all complete, and it takes new requests, a key
    # made in Redis before included: the stop tore nothing shared down.
    assert [call.result(60).outcome() for call in ours] == ["completed"] * 4
    after = Call(fleet.url, 8, stream=True).result()
    assert after.outcome() == "completed"
    keyed = httpx.post(
        f"{fleet.url}/v1/completions",
        json=body(4, False),
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert keyed.status_code == 200
    nodes = fleet.admin("GET", "/admin/nodes").json()
    assert sorted(n["status"] for n in nodes) == ["ready", "ready"], nodes
    wait_until(lambda: pools_idle(fleet), 10, "slots still held")


def test_a_killed_control_planes_requests_leave_no_ghosts(fleet):
    """SIGKILL leaves a control plane no time to record how its requests ended; once
    its lease has run out another control plane fails them, so the admin figures
    agree with the nodes (issue 25: 50 ghosts stayed "running" for good)."""
    killed = fleet.add_control_plane()
    calls = [Call(killed.url, LONG_TOKENS, stream=True) for _ in range(12)]
    deadline = time.monotonic() + 30
    while fleet.admin("GET", "/admin/stats").json()["running_requests"] < len(calls):
        assert time.monotonic() < deadline, "the requests did not start"
        time.sleep(0.2)
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=10)
    killed_at = time.monotonic()
    for call in calls:
        call.thread.join(timeout=10)
    # The lease (10 s), the next look (5 s), the second look (5 s), and a margin.
    while fleet.admin("GET", "/admin/stats").json()["running_requests"] > 0:
        assert time.monotonic() - killed_at < 30, fleet.admin("GET", "/admin/stats").json()
        time.sleep(0.5)
    ended = fleet.admin("GET", "/admin/requests?limit=12").json()
    assert len(ended) == len(calls)
    assert all(r["state"] == "failed" and "stopped before it ended" in r["error"] for r in ended)
    # The nodes let the requests go too (their own lease on the control plane).
    stats = fleet.admin("GET", "/admin/stats").json()
    assert all(role["running"] == 0 for role in stats["roles"].values()), stats
