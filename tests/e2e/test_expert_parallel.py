"""Two decode nodes forming one expert-parallel group (Gloo) behind a control plane:
the tokens of one engine holding every expert, the group in the registry, a
member killed mid-stream ending every affected request, with nothing hanging,
and the group started again serving the same tokens.

The fleet tests share one fleet and run in file order: the last two kill a member
and start the group again."""

import contextlib
import functools
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.common.tokenizer import load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.embedded_redis import free_port
from lightpd.controlplane.lightctl.node_process import NodeProcess, start_node
from tests.controlplane.lightctl.test_cli_up import LIGHTCTL, Up, lightctl, processes_of
from tests.e2e.fleet import ADMIN_TOKEN, API_KEY, CLUSTER_TOKEN, LocalFleet

EP_TIMEOUT_S = 3.0
PROMPTS = ["Hello world", "The quick brown fox", "Tell me about GPUs", "Token attention", "1 2 3"]


# ---- lightctl starts groups ----


@pytest.fixture
def home(tmp_path):
    """A LIGHTPD_HOME for the test; what still runs with it at the end is killed."""
    home = tmp_path / "home"
    yield home
    for pid in processes_of(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_lightctl_up_starts_its_decode_nodes_as_one_group(home, tiny_model):
    refused = lightctl(home, "up", "--port", free_port(), "--expert-parallel", timeout=60)
    assert refused.returncode == 2 and "--decode-nodes of 2 or more" in refused.stderr

    port = free_port()
    args = ["--port", port, "--prefill-nodes", "0", "--decode-nodes", "2", "--expert-parallel"]
    with Up(home, tiny_model("qwen3_moe"), *args) as up:
        output = up.wait_ready()
        assert "starting an expert-parallel group of decode nodes on cpu, cpu ... ok" in output
        assert re.search(r"Example answer \(\d+ tokens\)", output), output
        listing = lightctl(home, "node", "list").stdout
        assert re.search(r"decode .* 0/2@127\.0\.0\.1:\d+$", listing, re.M), listing
        assert re.search(r"decode .* 1/2@127\.0\.0\.1:\d+$", listing, re.M), listing
        assert up.stop() == 0, up.output
    assert processes_of(home) == []


def test_lightctl_node_add_starts_a_group_that_serves_and_stops_on_ctrl_c(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny", "qwen3_moe")
    fleet = LocalFleet(str(model)).start(prefill=0, decode=0)
    command = [LIGHTCTL, "node", "add", "--role", "decode", "--expert-parallel", "2"]
    command += ["--model", fleet.model, "--device", "cpu", "--num-kv-slots", "2048"]
    adding = subprocess.Popen(command, env={**fleet.env, "LIGHTPD_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        nodes = fleet.wait_for(lambda nodes: len(nodes) == 2, timeout=50)
        assert sorted((n["ep_rank"], n["ep_size"]) for n in nodes) == [(0, 2), (1, 2)]
        assert complete(fleet, "Hello world", 8).status_code == 200
        adding.send_signal(signal.SIGINT)
        assert adding.wait(timeout=30) == 0
    finally:
        if adding.poll() is None:
            adding.kill()
        fleet.stop()


# ---- a fleet whose two decode nodes are one group ----


def start_group(fleet: LocalFleet, init: str) -> list[NodeProcess]:
    """Two decode nodes of one group meeting at ``init``, registered with ``fleet``."""

    def member(rank: int) -> NodeProcess:
        args = ["--ep-size", "2", "--ep-rank", str(rank), "--ep-init", init]
        args += ["--ep-timeout-s", str(EP_TIMEOUT_S)]
        return start_node(
            "decode",
            fleet.model,
            "--control-plane",
            fleet.url,
            *fleet.node_args,
            *args,
            cluster_token=CLUSTER_TOKEN,
        )

    # Each waits in its engine for the other: they start together.
    with ThreadPoolExecutor(2) as pool:
        members = list(pool.map(member, range(2)))
    fleet.nodes += members
    ids = {m.node_id for m in members}
    fleet.wait_for(lambda nodes: ids <= {n["node_id"] for n in nodes})
    return members


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A control plane, a prefill node and two decode nodes of one group: (fleet, members)."""
    model = str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "qwen3_moe"))
    fleet = LocalFleet(model).start(prefill=1, decode=0)
    try:
        yield fleet, start_group(fleet, f"127.0.0.1:{free_port()}")
    finally:
        fleet.stop()


def complete(fleet: LocalFleet, prompt: str, max_tokens: int) -> httpx.Response:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{fleet.url}/v1/completions", json=body, headers=headers, timeout=60)


@functools.cache
def one_engine_texts(model: str) -> tuple[str, ...]:
    """The 16 greedy tokens of each of PROMPTS from one engine holding every expert."""
    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_kv_slots=1024))
    tokenizer = load_tokenizer(model)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    outputs = engine.generate([tokenizer.encode(p) for p in PROMPTS], params)
    return tuple(tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs)


def assert_the_group_serves_one_engines_tokens(fleet: LocalFleet, members: list[NodeProcess]):
    started = time.time()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: complete(fleet, p, 16), PROMPTS))

    for prompt, reply, want in zip(PROMPTS, replies, one_engine_texts(fleet.model), strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want, prompt
    # Both members served some of them (the other joined those steps all the same).
    requests = fleet.admin("GET", "/admin/requests?limit=100").json()
    served = {r["decode_node"] for r in requests if r["timeline"][0]["at"] >= started}
    assert served == {m.node_id for m in members}


def test_the_group_gives_the_tokens_of_one_engine_holding_every_expert(group):
    fleet, members = group
    assert_the_group_serves_one_engines_tokens(fleet, members)


def test_the_registry_and_lightctl_show_the_group(group):
    fleet, members = group
    nodes = {n["node_id"]: n for n in fleet.admin("GET", "/admin/nodes").json()}
    init = nodes[members[0].node_id]["ep_group"]
    assert init.startswith("127.0.0.1:")
    for rank, member in enumerate(members):
        node = nodes[member.node_id]
        assert (node["ep_group"], node["ep_rank"], node["ep_size"]) == (init, rank, 2)
    prefill = next(n for n in nodes.values() if n["role"] == "prefill")
    assert (prefill["ep_group"], prefill["ep_size"]) == (None, 1)

    listing = subprocess.run(
        [LIGHTCTL, "node", "list"],
        env={**fleet.env, "LIGHTPD_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for rank, member in enumerate(members):
        line = next(line for line in listing.splitlines() if line.startswith(member.node_id))
        assert line.endswith(f"{rank}/2@{init}")


class Stream(threading.Thread):
    """One long greedy stream; keeps its SSE lines."""

    def __init__(self, fleet: LocalFleet, prompt: str) -> None:
        super().__init__(daemon=True)
        self.fleet, self.prompt = fleet, prompt
        self.lines: list[str] = []

    def run(self) -> None:
        body = {
            "model": "tiny",
            "prompt": self.prompt,
            "max_tokens": 1200,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = f"{self.fleet.url}/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    self.lines.append(line)


def test_a_member_killed_mid_stream_ends_every_request_and_nothing_hangs(group):
    fleet, members = group
    # As many as one member admits at once (their peak fits its pool), so none waits.
    streams = [Stream(fleet, prompt) for prompt in [*PROMPTS, "Kernels"]]
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + 30
    while not all(len(s.lines) >= 2 for s in streams):  # every one is decoding
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.05)
    survivor, victim = members
    victim.kill()  # SIGKILL, mid-stream
    killed_at = time.monotonic()

    for stream in streams:
        stream.join(timeout=max(0.0, killed_at + 40 - time.monotonic()))
    assert not any(s.is_alive() for s in streams), "a stream hangs"
    # Each one ended with an error event (the group failed on both members: the
    # victim's requests could not move to a node of the broken group), never cut.
    for stream in streams:
        assert stream.lines[-1] == "data: [DONE]", stream.lines[-3:]
        assert '"error"' in stream.lines[-2], stream.lines[-3:]
    # The survivor ended its requests and left with its own exit code.
    assert survivor.process.wait(timeout=20) == 3


def test_the_group_started_again_at_the_same_address_serves_the_same_tokens(group):
    """After a member died and the group with it, its members restarted as they were
    first started (the same --ep-init) form a new group on the same fleet."""
    fleet, members = group
    assert all(m.process.poll() is not None for m in members), "the last test ended the group"
    nodes = {n["node_id"]: n for n in fleet.admin("GET", "/admin/nodes").json()}
    init = nodes[members[0].node_id]["ep_group"]

    again = start_group(fleet, init)

    assert_the_group_serves_one_engines_tokens(fleet, again)
