"""`lightctl bench` against a small OpenAI-compatible server, started here, that fails
some requests: failures are counted, shown, plotted and timed."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

LIGHTCTL = os.path.join(os.path.dirname(sys.executable), "lightctl")
SLOW_FAILURE_S = 1.5
TOKEN_GAP_S = 0.005


class FlakyServer(BaseHTTPRequestHandler):
    """Streams ``max_tokens`` tokens, except: every 4th request is refused with 503,
    the 6th fails in its stream after one token, and the 2nd hangs for
    ``SLOW_FAILURE_S`` then answers 500 (so a failure is the last request to end)."""

    counter = iter(range(1, 10**6))
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def event(self, body: dict | str) -> None:
        self.wfile.write(
            f"data: {json.dumps(body) if isinstance(body, dict) else body}\n\n".encode()
        )

    def do_GET(self) -> None:
        self.reply(200, {"object": "list", "data": [{"id": "flaky", "object": "model"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            n = next(self.counter)
        if n % 4 == 0:
            return self.reply(503, {"error": {"message": "no ready decode node"}})
        if n == 2:
            time.sleep(SLOW_FAILURE_S)
            return self.reply(500, {"error": {"message": "the node died"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        max_tokens = request["max_tokens"]
        for i in range(max_tokens):
            time.sleep(TOKEN_GAP_S)
            if n == 6 and i == 1:
                self.event({"error": {"message": "generation failed"}})
                return
            finish = "length" if i == max_tokens - 1 else None
            self.event({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]})
        usage = {"prompt_tokens": 7, "completion_tokens": max_tokens}
        self.event({"choices": [], "usage": usage})
        self.event("[DONE]")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # all requests connect at once


@pytest.fixture
def flaky_url():
    server = Server(("127.0.0.1", 0), FlakyServer)
    FlakyServer.counter = iter(range(1, 10**6))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_failed_requests_are_counted_plotted_and_timed(flaky_url, tmp_path):
    out = tmp_path / "flaky.json"
    command = [
        LIGHTCTL, "bench", "--base-url", f"{flaky_url}/v1", "--num-requests", "12",
        "--output-len", "6", "--input-len", "4", "--label", "flaky", "--out", str(out),
        "--plots", str(tmp_path / "plots"),
    ]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert run.returncode == 0, run.stderr  # some completed
    lines = run.stdout.splitlines()

    def row(label: str) -> str:
        return next(line for line in lines if label in line).split(label)[1].strip(" │|")

    # 12 requests: #4, #8, #12 refused, #6 broken mid-stream, #2 failed after 1.5 s.
    assert row("requests completed") == "7" and row("requests failed") == "5"
    assert "5 of 12 requests failed:" in run.stdout
    assert "3 x HTTP 503: no ready decode node" in run.stdout
    assert "1 x HTTP 500: the node died" in run.stdout
    assert "1 x error in stream: generation failed" in run.stdout

    summary = json.loads(out.read_text())["summary"]
    assert (summary["num_requests"], summary["num_completed"], summary["num_errors"]) == (12, 7, 5)
    # The slowest failure ends the run: the duration covers it (it used to stop at the
    # last completed request, about 0.05 s here), and agrees with the run's wall time.
    assert SLOW_FAILURE_S <= summary["duration_s"] <= summary["wall_s"] + 0.01
    assert summary["wall_s"] - summary["duration_s"] < 0.5
    assert summary["wall_s"] < summary["total_wall_s"] < took
    assert float(row("duration, first send to last end (s)")) == pytest.approx(
        summary["duration_s"], abs=0.01
    )
    assert float(row("wall time, measured run (s)")) == pytest.approx(summary["wall_s"], abs=0.01)
    requests = json.loads(out.read_text())["requests"]
    assert all(r["e2e_s"] is not None for r in requests)  # failed ones too
    for plot in ("latency_cdf", "throughput"):
        assert (tmp_path / "plots" / f"flaky_{plot}.png").read_bytes()[:4] == b"\x89PNG"
