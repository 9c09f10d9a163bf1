"""Growing, draining and losing nodes while traffic runs; membership checks."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lightpd.common.tiny import write_tiny_checkpoint
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


MIGRATION_TOKENS = 120
MIGRATION_STREAMS = 16


class Stream(threading.Thread):
    """One greedy chat stream, its SSE data lines kept as they arrive."""

    def __init__(self, fleet: LocalFleet) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.lines: list[str] = []

    def run(self) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": MIGRATION_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = f"{self.fleet.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    self.lines.append(line)

    def chunks(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line != "data: [DONE]"]

    def text(self) -> str:
        deltas = [c["choices"][0]["delta"] for c in self.chunks() if c["choices"]]
        return "".join(delta.get("content") or "" for delta in deltas)

    def usage(self) -> dict | None:
        return next((c["usage"] for c in self.chunks() if c.get("usage")), None)


def migrate_mid_stream(fleet: LocalFleet, move) -> tuple[str, list[Stream]]:
    """The text of an uninterrupted run, then MIGRATION_STREAMS streams during which
    ``move(victim)`` takes one decode node away once every stream has started."""
    reference = Stream(fleet)
    reference.run()
    assert reference.lines[-1] == "data: [DONE]"
    streams = [Stream(fleet) for _ in range(MIGRATION_STREAMS)]
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + 60
    while not all(len(s.lines) >= 3 for s in streams):  # each is decoding somewhere
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.02)
    nodes = fleet.admin("GET", "/admin/nodes").json()
    decoders = [n for n in nodes if n["role"] == "decode"]
    # The busiest decode node (one that has not reported yet counts as idle).
    victim_id = max(decoders, key=lambda n: (n["stats"] or {}).get("num_running", 0))["node_id"]
    move(next(n for n in fleet.nodes if n.node_id == victim_id))
    for stream in streams:
        stream.join(timeout=120)
    assert not any(s.is_alive() for s in streams), "a stream hung"
    return reference.text(), streams


def assert_all_continued(reference: str, streams: list[Stream]) -> None:
    for stream in streams:
        assert stream.lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in stream.lines), stream.lines[-3:]
        assert stream.text() == reference  # no token lost or repeated across the move
        assert stream.usage()["completion_tokens"] == MIGRATION_TOKENS


@pytest.mark.parametrize("transport", ["zmq", "nccl"])
def test_streams_on_a_killed_decode_node_continue_on_the_other(model, transport):
    node_args = ("--num-kv-slots", "4096", "--kv-transport", transport)
    fleet = LocalFleet(model, node_ttl_s=2.0, node_args=node_args).start(decode=2)
    try:
        killed = []

        def kill(node) -> None:
            node.kill()
            killed.append(node)

        reference, streams = migrate_mid_stream(fleet, kill)
        assert_all_continued(reference, streams)
        metrics = httpx.get(f"{fleet.url}/metrics", timeout=10).text
        moved = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("lightpd_request_migrations_total")
        )
        assert moved >= 1
        # The dead node stays listed as dead (and gets nothing) until it is removed.
        victim = killed[0]
        fleet.wait_for(lambda ns: {n["node_id"]: n["status"] for n in ns}[victim.node_id] == "dead")
        assert chat(fleet, 5).status_code == 200  # new requests go to the survivor
        assert fleet.admin("DELETE", f"/admin/nodes/{victim.node_id}").status_code == 200
        fleet.wait_for(lambda ns: victim.node_id not in {n["node_id"] for n in ns})
        fleet.wait_for(lambda ns: all(idle(n) for n in ns))  # nothing leaked on survivors
    finally:
        fleet.stop()


def idle(node: dict) -> bool:
    stats = node["stats"]
    return stats["num_free_slots"] == node["num_slots"] and stats["num_running"] == 0


def test_drain_migrate_empties_a_decode_node_at_once(model):
    fleet = LocalFleet(model, node_args=("--num-kv-slots", "4096")).start(decode=2)
    try:
        drained = []

        def drain(node) -> None:
            done = run_lightctl(fleet, "node", "drain", "--migrate", node.node_id)
            assert done.returncode == 0, done.stderr
            assert "migrating" in done.stdout
            drained.append(node)

        reference, streams = migrate_mid_stream(fleet, drain)
        assert_all_continued(reference, streams)
        node_id = drained[0].node_id
        # The node is alive and empty, and gets no new request.
        fleet.wait_for(lambda ns: idle(next(n for n in ns if n["node_id"] == node_id)))
        assert chat(fleet, 5).status_code == 200
        nodes = {n["node_id"]: n for n in fleet.admin("GET", "/admin/nodes").json()}
        assert nodes[node_id]["status"] == "migrating"
        assert nodes[node_id]["stats"]["num_running"] == 0
    finally:
        fleet.stop()


def test_ready_and_models_only_once_a_decode_node_serves(model):
    fleet = LocalFleet(model).start(prefill=0, decode=0)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        not_ready = httpx.get(f"{fleet.url}/ready", timeout=10)
        assert not_ready.status_code == 503 and not_ready.headers["Retry-After"]
        assert not_ready.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{fleet.url}/health", timeout=10).status_code == 200  # alive
        models = httpx.get(f"{fleet.url}/v1/models", headers=headers, timeout=10).json()
        assert models["data"] == []
        fleet.add_node("decode")
        assert httpx.get(f"{fleet.url}/ready", timeout=10).status_code == 200
        models = httpx.get(f"{fleet.url}/v1/models", headers=headers, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert chat(fleet, 3).status_code == 200  # and it serves (prefilling locally)
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
