"""Registration: a control plane that cannot register nodes now (its Redis is down:
a JSON 503 with Retry-After) is waited for; a refusal stops the node."""

import itertools
import threading
import time

import httpx

from lightpd.common.node.registrar import Registrar

UNAVAILABLE = {"error": {"message": "Redis is unavailable", "code": "redis_unavailable"}}


def _registrar(handler) -> tuple[Registrar, list[tuple[int, str]]]:
    stopped: list[tuple[int, str]] = []
    registrar = Registrar(
        "http://control-plane",
        "token",
        {"node_id": "n1"},
        dict,
        lambda code, reason: stopped.append((code, reason)),
        transport=httpx.MockTransport(handler),
    )
    return registrar, stopped


def test_a_503_is_retried_as_retry_after_says_and_never_stops_the_node():
    posts: list[float] = []
    heartbeats = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            heartbeats.set()
            return httpx.Response(200, json={})
        posts.append(time.monotonic())
        if len(posts) <= 2:
            return httpx.Response(503, headers={"Retry-After": "0.5"}, json=UNAVAILABLE)
        return httpx.Response(201, json={"heartbeat_s": 0.1})

    registrar, stopped = _registrar(handler)
    registrar.start()
    try:
        assert registrar.registered.wait(10)
        assert heartbeats.wait(5)  # and it goes on as a member
    finally:
        registrar.stop()
        registrar.join(5)
    assert stopped == []
    assert len(posts) == 3
    assert all(later - earlier >= 0.45 for earlier, later in itertools.pairwise(posts))


def test_a_refusal_stops_the_node_with_its_reason():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {"message": "wrong cluster token"}})

    registrar, stopped = _registrar(handler)
    registrar.start()
    registrar.join(5)
    assert not registrar.registered.is_set()
    assert stopped == [(2, "the control plane refused this node: wrong cluster token")]
