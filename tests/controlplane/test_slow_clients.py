"""Slow and greedy clients cannot exhaust the control plane (issue 25, item 5): a
real control plane process, raw sockets that stall their bodies or headers, and
plain requests timed meanwhile."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from lightpd.controlplane.lightctl.embedded_redis import free_port

BODY_TIMEOUT_S = 3.0
HEADER_TIMEOUT_S = 2.0
STALLED = 1000


def start_control_plane(model: str, redis_url: str, **settings: str) -> tuple:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
    env |= {
        "LIGHTPD_MODEL": model,
        "LIGHTPD_REDIS_URL": redis_url,
        "LIGHTPD_ADMIN_TOKEN": "admin-token",
        "LIGHTPD_CLUSTER_TOKEN": "cluster-token",
        "LIGHTPD_PORT": str(port),
        **{f"LIGHTPD_{k.upper()}": v for k, v in settings.items()},
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "lightpd.controlplane"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, port, url
        assert process.poll() is None and time.monotonic() < deadline, "it did not start"
        time.sleep(0.2)


@pytest.fixture
def control_plane(tiny_model, redis_url) -> Iterator[tuple[int, str]]:
    process, port, url = start_control_plane(
        tiny_model("llama"),
        redis_url,
        body_timeout_s=str(BODY_TIMEOUT_S),
        header_timeout_s=str(HEADER_TIMEOUT_S),
        max_connections_per_client=str(STALLED + 100),
    )
    try:
        yield port, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def stalled_body(port: int) -> socket.socket:
    """A chunked POST whose body starts and never ends."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
    )
    return sock


def answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout)
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_stalled_bodies_are_closed_at_the_deadline_and_others_are_served(control_plane):
    port, url = control_plane
    started = time.monotonic()
    socks = [stalled_body(port) for _ in range(STALLED)]
    try:
        # Plain requests keep their latency while a thousand bodies stall.
        with httpx.Client(base_url=url, timeout=5) as client:
            took = []
            while time.monotonic() - started < BODY_TIMEOUT_S - 0.5:
                t0 = time.monotonic()
                assert client.get("/health").status_code == 200
                took.append(time.monotonic() - t0)
                time.sleep(0.1)
        assert took and max(took) < 1.0, took
        # Each stalled body is answered 408 and closed, at the deadline.
        answers = [answer(sock, BODY_TIMEOUT_S + 10) for sock in socks]
        closed_after = time.monotonic() - started
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0][:200]
        assert b"did not arrive within 3 s" in answers[0]
        assert closed_after < BODY_TIMEOUT_S + 10
    finally:
        for sock in socks:
            sock.close()


def test_trickled_headers_are_cut_off(control_plane):
    port, _ = control_plane
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        for _ in range(20):  # a byte a second resets no timer
            time.sleep(0.25)
            with contextlib.suppress(OSError):
                sock.sendall(b"X-A: b\r\n")
            if time.monotonic() - started > HEADER_TIMEOUT_S + 3:
                break
        assert answer(sock, 5) == b""  # closed, with nothing to say
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 6
    finally:
        sock.close()


def test_connections_past_the_limits_get_503_with_retry_after(tiny_model, redis_url):
    process, port, url = start_control_plane(
        tiny_model("llama"), redis_url, max_connections_per_client="20"
    )
    socks = []
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        refused = httpx.get(f"{url}/health", timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "too_many_connections"
        for sock in socks:
            sock.close()
        socks = []
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the closed connections were not counted off"
            time.sleep(0.1)
    finally:
        for sock in socks:
            sock.close()
        process.terminate()
        process.wait(timeout=20)
