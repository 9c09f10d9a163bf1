"""Growing, draining and losing nodes while traffic runs; membership checks."""

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import ADMIN_TOKEN, API_KEY, CLUSTER_TOKEN, LocalFleet


@pytest.fixture
def model(tmp_path):
    return str(write_tiny_checkpoint(tmp_path / "tiny", "llama"))


def chat(fleet: LocalFleet, max_tokens: int, stream: bool = False, timeout: float = 120):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if not stream:
        return httpx.post(
            f"{fleet.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout
        )
    with httpx.stream(
        "POST", f"{fleet.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout
    ) as reply:
        return [line for line in reply.iter_lines() if line.startswith("data: ")]


def lightctl(fleet: LocalFleet, *args: str, **popen) -> subprocess.Popen:
    env = {**fleet.env, "LIGHTPD_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [os.path.join(os.path.dirname(sys.executable), "lightctl"), *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def run_lightctl(fleet: LocalFleet, *args: str) -> subprocess.CompletedProcess:
    process = lightctl(fleet, *args)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


class Traffic(threading.Thread):
    """Requests one after another (a few at a time) until stopped; keeps every reply."""

    def __init__(self, fleet: LocalFleet, workers: int = 3) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.workers = workers
        self.replies: list[httpx.Response] = []
        self.done = threading.Event()

    def run(self) -> None:
        def loop() -> None:
            while not self.done.is_set():
                self.replies.append(chat(self.fleet, 24))

        threads = [threading.Thread(target=loop) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def decode_nodes_of_requests(fleet: LocalFleet, since: float) -> list[str]:
    requests = fleet.admin("GET", "/admin/requests?limit=1000").json()
    return [r.get("decode_node") for r in requests if r["timeline"][0]["at"] > since]


def test_node_add_and_drain_while_traffic_runs(model):
    fleet = LocalFleet(model, node_args=("--num-kv-slots", "4096")).start()
    new_node = None
    try:
        old_decode = next(n for n in fleet.nodes if n.role == "decode")
        traffic = Traffic(fleet)
        traffic.start()
        new_node = lightctl(
            fleet,
            "node",
            "add",
            "--role",
            "decode",
            "--model",
            model,
            "--device",
            "cpu",
            "--control-plane",
            fleet.url,
            "--cluster-token",
            CLUSTER_TOKEN,
            "--num-kv-slots",
            "4096",
        )
        nodes = fleet.wait_for(lambda ns: sum(n["role"] == "decode" for n in ns) == 2, 60)
        new_id = next(
            n["node_id"]
            for n in nodes
            if n["node_id"] != old_decode.node_id and n["role"] == "decode"
        )
        started = time.time()
        deadline = time.monotonic() + 60
        while new_id not in decode_nodes_of_requests(fleet, started - 5):
            assert time.monotonic() < deadline, "the new node got no request"
            time.sleep(0.3)

        drained = run_lightctl(
            fleet, "node", "drain", old_decode.node_id, "--control-plane", fleet.url
        )
        assert drained.returncode == 0, drained.stderr
        drained_at = time.time()
        listing = run_lightctl(fleet, "node", "list", "--control-plane", fleet.url).stdout
        line = next(row for row in listing.splitlines() if row.startswith(old_decode.node_id))
        assert "draining" in line
        time.sleep(3)
        traffic.done.set()
        traffic.join(timeout=120)
        assert traffic.replies and all(r.status_code == 200 for r in traffic.replies)
        assert all(r.json()["usage"]["completion_tokens"] == 24 for r in traffic.replies)
        # After the drain (and the routing cache's refresh) nothing new went to the old node.
        late = decode_nodes_of_requests(fleet, drained_at + 1)
        assert late and old_decode.node_id not in late

        status = run_lightctl(fleet, "status", "--control-plane", fleet.url)
        assert status.returncode == 0, status.stderr
        assert old_decode.node_id in status.stdout and new_id in status.stdout
        assert "decode: 1/2 ready" in status.stdout
        removed = run_lightctl(
            fleet, "node", "remove", old_decode.node_id, "--control-plane", fleet.url
        )
        assert removed.returncode == 0, removed.stderr
        assert old_decode.process.wait(timeout=15) == 0  # told at its heartbeat, it stops
        listing = run_lightctl(fleet, "node", "list", "--control-plane", fleet.url).stdout
        assert old_decode.node_id not in listing and new_id in listing
    finally:
        if new_node is not None:
            new_node.terminate()
            new_node.wait(timeout=15)
        fleet.stop()


def test_killing_a_decode_node_retries_or_fails_cleanly(model):
    fleet = LocalFleet(model, node_ttl_s=2.0, node_args=("--num-kv-slots", "4096")).start(decode=2)
    try:
        victim = next(n for n in fleet.nodes if n.role == "decode")
        results: list = []

        def one() -> None:
            results.append(chat(fleet, 60, stream=True))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        victim.kill()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert len(results) == 12
        finished = [
            r
            for r in results
            if r[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(r)
        ]
        failed = [r for r in results if any('"error"' in line for line in r)]
        assert len(finished) + len(failed) == 12
        assert all("the request was interrupted" in "".join(r) for r in failed)
        # The dead node stays listed as dead (and gets nothing) until it is removed.
        fleet.wait_for(lambda ns: {n["node_id"]: n["status"] for n in ns}[victim.node_id] == "dead")
        assert chat(fleet, 5).status_code == 200  # new requests go to the survivor
        assert fleet.admin("DELETE", f"/admin/nodes/{victim.node_id}").status_code == 200
        fleet.wait_for(lambda ns: victim.node_id not in {n["node_id"] for n in ns})
    finally:
        fleet.stop()


def test_refused_nodes_say_why(model, tmp_path):
    fleet = LocalFleet(model).start(prefill=0, decode=0)
    try:
        wrong_token = run_lightctl(
            fleet,
            "node",
            "add",
            "--role",
            "decode",
            "--model",
            model,
            "--device",
            "cpu",
            "--control-plane",
            fleet.url,
            "--cluster-token",
            "nope",
        )
        assert wrong_token.returncode == 2
        assert "the control plane refused this node: a valid bearer token is required" in (
            wrong_token.stderr
        )
        other = str(write_tiny_checkpoint(tmp_path / "other", "qwen3"))
        wrong_model = run_lightctl(
            fleet,
            "node",
            "add",
            "--role",
            "prefill",
            "--model",
            other,
            "--device",
            "cpu",
            "--control-plane",
            fleet.url,
            "--cluster-token",
            CLUSTER_TOKEN,
        )
        assert wrong_model.returncode == 2
        assert "model mismatch" in wrong_model.stderr
        unreachable = run_lightctl(fleet, "node", "list", "--control-plane", "http://127.0.0.1:9")
        assert unreachable.returncode == 2
        assert "cannot reach the control plane at http://127.0.0.1:9" in unreachable.stderr
        missing = run_lightctl(
            fleet,
            "node",
            "add",
            "--role",
            "decode",
            "--model",
            str(tmp_path / "nowhere"),
            "--cluster-token",
            CLUSTER_TOKEN,
        )
        assert "model directory" in missing.stderr and missing.returncode == 2
        no_gpu = run_lightctl(
            fleet,
            "node",
            "add",
            "--role",
            "decode",
            "--model",
            model,
            "--device",
            "cuda:3",
            "--cluster-token",
            CLUSTER_TOKEN,
        )
        assert "device cuda:3 absent" in no_gpu.stderr
        # With no nodes, the API answers 503 in OpenAI's format.
        reply = chat(fleet, 4)
        assert reply.status_code == 503 and reply.json()["error"]["message"]
    finally:
        fleet.stop()
