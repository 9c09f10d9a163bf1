"""`lightctl up` supervises its fleet: nodes SIGKILLed under load are started again
with their ids and ports while the streams move and finish with transformers' text;
a node that keeps dying is given up alone and the fleet serves without it.

The model is a qwen2 checkpoint, whose tokenizer transformers rebuilds (Qwen2Tokenizer
splits every digit), so the streams also show that the fleet's token ids and text
are transformers' own."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightpd.controlplane.lightctl.embedded_redis import free_port

LIGHTCTL = os.path.join(os.path.dirname(sys.executable), "lightctl")
STREAMS = 16
MAX_TOKENS = 64
PROMPTS = [
    f"Request {i}: count 0 1 2 3 4 5 then 12345 and 3.14, 中文 🙂  done" for i in range(STREAMS)
]


def _processes_with(marker: bytes) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes():
                found.append(int(environ.parent.name))
    return found


def _node_pid(node_id: str) -> int:
    """The live process serving ``node_id`` (its --node-id, or its id's pid)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if b"lightpd.prefill_node" not in args and b"lightpd.decode_node" not in args:
                continue
            pid = int(cmdline.parent.name)
            given = args[args.index(b"--node-id") + 1].decode() if b"--node-id" in args else None
            if given == node_id or (given is None and node_id.endswith(f"-{pid}")):
                return pid
    raise AssertionError(f"no process serves {node_id}")


class Fleet:
    """`lightctl up --prefill-nodes 1 --decode-nodes 2` in the background."""

    def __init__(self, home: Path, model: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
        env |= {"LIGHTPD_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        command = [LIGHTCTL, "up", model, "--port", str(self.port), "--no-example"]
        command += ["--prefill-nodes", "1", "--decode-nodes", "2", "--restart-window", "600"]
        command += ["--restart-backoff", "0.1"]  # 0.1 s doubling: six kills in seconds
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=home.parent,  # away from the repository, as a user runs it
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(4096):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.1)

    @property
    def admin(self) -> dict[str, str]:
        state = json.loads((self.home / "fleets" / str(self.port) / "fleet.json").read_text())
        return {"Authorization": f"Bearer {state['admin_token']}"}

    def nodes(self) -> list[dict]:
        return httpx.get(f"{self.url}/admin/nodes", headers=self.admin, timeout=10).json()

    def ready(self) -> dict[str, int]:
        counts = {"prefill": 0, "decode": 0}
        for node in self.nodes():
            counts[node["role"]] += node["status"] == "ready"
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.reader.join(timeout=10)
        for pid in _processes_with(f"LIGHTPD_HOME={self.home}\0".encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def fleet(model, tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("supervised") / "home", model)
    try:
        fleet.wait_for("Press Ctrl-C")
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def reference(model) -> list[str]:
    """transformers' greedy text for each prompt: its tokenizer, generate, decode."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = hf.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


async def _stream(client: httpx.AsyncClient, name: str, prompt: str, started: list) -> str:
    body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    body["temperature"] = 0
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            started.append(1)
    return text


def test_killed_nodes_are_started_again_and_every_stream_finishes(fleet, model, reference):
    before = fleet.ready()
    assert before == {"prefill": 1, "decode": 2}
    nodes = {n["role"] + str(i): n for i, n in enumerate(fleet.nodes())}
    prefill = next(n for n in nodes.values() if n["role"] == "prefill")
    decode = next(n for n in nodes.values() if n["role"] == "decode")
    name = Path(model).name

    async def run() -> list[str]:
        started: list = []
        async with httpx.AsyncClient(base_url=fleet.url, timeout=120) as client:
            tasks = [asyncio.create_task(_stream(client, name, p, started)) for p in PROMPTS]
            while len(started) < STREAMS and not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)  # streams under way: strike now
            for node in (decode, prefill):
                os.kill(_node_pid(node["node_id"]), signal.SIGKILL)
            return await asyncio.gather(*tasks)

    killed_at = time.monotonic()
    texts = asyncio.run(run())
    assert texts == reference
    # Within 60 s as many nodes of each role are ready as before: the same ids, each
    # counting its restart.
    while fleet.ready() != before:
        assert time.monotonic() - killed_at < 60, fleet.nodes()
        time.sleep(0.5)
    restarts = {n["node_id"]: n["restarts"] for n in fleet.nodes()}
    assert restarts[decode["node_id"]] == restarts[prefill["node_id"]] == 1
    assert sorted(restarts.values()) == [0, 1, 1]
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    assert f'lightpd_node_restarts_total{{node="{decode["node_id"]}",role="decode"}} 1.0' in metrics
    # Still up, and serving.
    assert fleet.process.poll() is None
    reply = httpx.post(
        f"{fleet.url}/v1/completions",
        json={"model": name, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert reply.json()["choices"][0]["text"] == reference[0]


def test_a_node_that_keeps_dying_is_given_up_alone(fleet, model, reference):
    """lightctl up starts a node again 5 times (--max-restarts); the 6th exit within
    the window gives it up, its last log lines are shown, and the fleet serves on."""
    decode = next(n for n in fleet.nodes() if n["role"] == "decode" and n["restarts"] == 0)
    node_id = decode["node_id"]
    served_again = fleet.output.count("is serving again")  # the earlier test's restarts
    for kill in range(1, 7):
        os.kill(_node_pid(node_id), signal.SIGKILL)
        if kill < 6:
            fleet.wait_for("is serving again", count=served_again + kill, timeout=120)
    fleet.wait_for("exited with code -9; given up")
    assert "(log: " in fleet.output.split("given up")[-1]  # its last lines, and where its log is
    time.sleep(1.0)
    assert fleet.process.poll() is None, fleet.output
    reply = httpx.post(
        f"{fleet.url}/v1/completions",
        json={
            "model": Path(model).name,
            "prompt": PROMPTS[1],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == reference[1]
    listed = {n["node_id"]: n for n in fleet.nodes()}
    assert listed[node_id]["restarts"] == 5
