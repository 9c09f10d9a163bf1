"""How much one abusive request costs everyone else: /health latency on a control
plane while a client posts a huge body, and the time to refuse costly requests.

Starts an embedded Redis and a control plane (no nodes are needed: every probe is
refused before dispatch), then, for each probe, polls /health every 10 ms while
the probe runs and reports the probe's answer and the slowest /health.

    .venv/bin/python bench/abuse_probe.py [--body-mb 50]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis, free_port
from tests.e2e.fleet import wait_healthy


def poll_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)


def probe(url: str, name: str, send) -> None:
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=poll_health, args=(url, stop, latencies))
    poller.start()
    time.sleep(0.3)
    start = time.perf_counter()
    try:
        status = send().status_code
    except httpx.HTTPError as exc:  # the server may close on an oversized body
        status = type(exc).__name__
    elapsed = time.perf_counter() - start
    time.sleep(0.3)
    stop.set()
    poller.join()
    print(
        f"| {name} | {status} in {elapsed * 1e3:.0f} ms | "
        f"{statistics.median(latencies) * 1e3:.1f} ms | {max(latencies) * 1e3:.1f} ms |"
    )


class _Status:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def _post_file(url: str, path: Path) -> _Status:
    code = (
        "import httpx, sys; r = httpx.post(sys.argv[1], content=open(sys.argv[2], 'rb').read(),"
        " headers={'Content-Type': 'application/json'}, timeout=120); print(r.status_code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url, str(path)], capture_output=True, text=True
    )
    return _Status(int(done.stdout.strip() or 0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--body-mb", type=int, default=50)
    args = parser.parse_args()
    model = write_tiny_checkpoint(tempfile.mkdtemp(), "llama")
    redis = EmbeddedRedis().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LIGHTPD_REDIS_URL": redis.url,
        "LIGHTPD_MODEL": str(model),
        "LIGHTPD_ADMIN_TOKEN": "admin",
        "LIGHTPD_CLUSTER_TOKEN": "cluster",
        "LIGHTPD_PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "lightpd.controlplane"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_healthy(url)
        chat = f"{url}/v1/chat/completions"
        huge = json.dumps(
            {"model": "x", "messages": [{"role": "user", "content": "a" * (args.body_mb << 20)}]}
        ).encode()
        stops = {
            "model": model.name,
            "messages": [{"role": "user", "content": "hi"}],
            "n": 16,
            "stop": [f"s{i}" for i in range(50_000)],
        }
        print("| probe | answer | /health p50 | /health max |")
        print("| --- | --- | --- | --- |")
        probe(url, "nothing (baseline)", lambda: httpx.get(f"{url}/health"))
        # Sent from another process, so that this one's /health polling does not wait
        # for the GIL behind the upload.
        body_file = Path(tempfile.mkdtemp()) / "huge.json"
        body_file.write_bytes(huge)
        probe(
            url,
            f"{args.body_mb} MB chat body",
            lambda: _post_file(chat, body_file),
        )
        probe(url, "50,000 stop strings, n=16", lambda: httpx.post(chat, json=stops, timeout=120))
        probe(
            url,
            "seed 10**30",
            lambda: httpx.post(chat, json={**stops, "stop": None, "seed": 10**30}, timeout=30),
        )
    finally:
        server.terminate()
        server.wait(timeout=15)
        redis.stop()


if __name__ == "__main__":
    main()
