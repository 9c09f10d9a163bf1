"""A fleet under hostile input, strangers, overload and disconnects (issue 11's probes,
bounded so that they run in `make test`)."""

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter

import httpx
import pytest
import zmq

from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import (
    HealthCheck,
    KVLayer,
    PrefillDone,
    Reserve,
    encode,
)
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.node_client import NodeClient
from tests.e2e import node_calls
from tests.e2e.fleet import API_KEY, CLUSTER_TOKEN, LocalFleet, raw_call, wait_healthy

# A pool of 1,200 slots: 20 requests of 20 prompt + 40 output tokens at a time.
SLOTS = 1200
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from lightpd.common.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "llama")
    running = LocalFleet(
        str(model),
        node_args=("--num-kv-slots", str(SLOTS), "--max-prefill-tokens", "512"),
        settings={"LIGHTPD_QUEUE_TIMEOUT_S": "120"},
    ).start(prefill=1, decode=2)
    yield running
    running.stop()


def completion(fleet: LocalFleet, client: httpx.Client | None = None, **fields) -> httpx.Response:
    body = {"model": "tiny", "prompt": list(range(3, 23)), "max_tokens": 40, **fields}
    post = (client or httpx).post
    return post(f"{fleet.url}/v1/completions", json=body, headers=HEADERS, timeout=180)


def pools_idle(fleet: LocalFleet) -> bool:
    nodes = fleet.admin("GET", "/admin/nodes").json()
    return all(
        n["stats"]["num_free_slots"] == n["num_slots"] and n["stats"]["num_queued"] == 0
        for n in nodes
    )


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def all_alive(fleet: LocalFleet) -> bool:
    return all(n.process.poll() is None for n in fleet.nodes)


# ---- the request of death ----


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.0},
        {"repetition_penalty": 1.3},
    ],
)
def test_penalties_over_histories_longer_than_the_vocabulary_kill_no_node(fleet, penalty):
    # The tiny model's vocabulary has 400 tokens: a 450-token prompt is longer than it
    # (the prefill node's sampler), and 500 new tokens outgrow it on the decode node.
    prompt = [3 + (i * 7) % 390 for i in range(450)]
    reply = completion(fleet, prompt=prompt, max_tokens=500, ignore_eos=True, **penalty)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 500
    assert all_alive(fleet)
    [record] = fleet.admin("GET", "/admin/requests?limit=1").json()
    assert record["state"] == "finished" and record["attempts"] == 1


# ---- strangers on the node plane ----


def probe(endpoint: str, frames: list[bytes], keys: FleetKeys | None):
    return raw_call(endpoint, frames, keys, timeout_ms=1500)


def test_strangers_get_nothing_from_any_node_socket(fleet):
    endpoints = [n.control for n in fleet.nodes] + [n.kv for n in fleet.nodes if n.kv]
    health = encode(HealthCheck(call_id=1))
    params = SamplingParams(temperature=0, max_new_tokens=4, seed=1)
    reserve = encode(
        Reserve(
            call_id=2, request_id="stranger", secret="s" * 32, prompt_token_ids=[5], params=params
        )
    )
    other_fleet = FleetKeys.from_token("not-the-cluster-token")
    for endpoint in endpoints:
        for keys in (None, other_fleet):  # no CURVE at all; keys of another token
            assert probe(endpoint, [health], keys) is None
            assert probe(endpoint, [reserve], keys) is None
    # The fleet's own traffic is unaffected, and a member gets answers.
    assert probe(fleet.nodes[0].control, [health], FleetKeys.from_token(CLUSTER_TOKEN))
    assert completion(fleet).status_code == 200


def test_a_member_without_the_secret_cannot_inject_into_or_abort_a_request(fleet):
    prefill = next(n for n in fleet.nodes if n.role == "prefill")
    decode_node = next(n for n in fleet.nodes if n.role == "decode")
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, seed=7)

    async def main():
        async with NodeClient(CLUSTER_TOKEN) as victim, NodeClient(CLUSTER_TOKEN) as intruder:
            expected = await node_calls.generate(
                victim, prefill.control, decode_node.control, "v0", prompt, params
            )
            victim.open_stream("v1")
            reserved = await victim.reserve(decode_node.control, "v1", prompt, params)
            layout = reserved.layout
            wrong = "w" * 32
            # KV and a first token under a guessed secret, from a member socket.
            kv_bytes = b"\0" * (len(prompt) * layout.num_kv_heads * layout.head_dim * 4)
            header = KVLayer(
                request_id="v1", secret=wrong, layout=layout, layer=0, start=0, num_tokens=37
            )
            member = FleetKeys.from_token(CLUSTER_TOKEN)
            ack = probe(reserved.kv_endpoint, [encode(header), kv_bytes, kv_bytes], member)
            done = PrefillDone(
                request_id="v1", secret=wrong, layout=layout, num_prompt_tokens=37, first_token=9
            )
            ack_done = probe(reserved.kv_endpoint, [encode(done)], member)
            # An abort by id from another member, whose secret for "v1" is its own.
            intruder.open_stream("v1")
            for node in (decode_node, prefill):
                await intruder.abort(node.control, "v1")
            await victim.prefill(prefill.control, "v1", prompt, params, reserved.target())
            events = [e async for e in node_calls.events(victim, "v1", timeout=30)]
            return expected, ack, ack_done, events

    expected, ack, ack_done, events = asyncio.run(main())
    assert "secret does not match" in ack.error and "secret does not match" in ack_done.error
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == expected.token_ids  # no injected first token, not aborted
    assert events[-1].finish_reason == "length"
    wait_until(lambda: pools_idle(fleet))


def test_many_member_connections_leave_the_node_open_files_bounded(fleet):
    node = next(n for n in fleet.nodes if n.role == "decode")
    fds = f"/proc/{node.process.pid}/fd"
    member = FleetKeys.from_token(CLUSTER_TOKEN)
    before = len(os.listdir(fds))
    ctx = zmq.Context.instance()
    for i in range(1000):
        sock = ctx.socket(zmq.DEALER)
        member.connect_as_member(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(node.control)
        sock.send(encode(HealthCheck(call_id=i)))
        assert sock.poll(5000)
        sock.close()
    wait_until(lambda: len(os.listdir(fds)) < before + 50, timeout=20)
    assert completion(fleet).status_code == 200


# ---- a control plane that stops reading, and SIGTERM ----


def test_a_destination_that_never_reads_cannot_freeze_a_node(fleet, tmp_path):
    from lightpd.controlplane.lightctl.node_process import start_node

    node = start_node(
        "decode", fleet.model, "--num-kv-slots", str(SLOTS), cluster_token=CLUSTER_TOKEN
    )
    prefill = next(n for n in fleet.nodes if n.role == "prefill")
    try:
        stuck = zmq.Context.instance().socket(zmq.DEALER)
        FleetKeys.from_token(CLUSTER_TOKEN).connect_as_member(stuck)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.connect(node.control)
        params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True, seed=1)
        for i in range(50):  # reservations whose answers and tokens nobody reads
            stuck.send(
                encode(
                    Reserve(
                        call_id=i,
                        request_id=f"stuck-{i}",
                        secret="s" * 32,
                        prompt_token_ids=[5, 6, 7],
                        params=params,
                        kv_timeout_s=1.0,
                    )
                )
            )

        async def others():
            async with NodeClient(CLUSTER_TOKEN) as client:
                ok = SamplingParams(temperature=0, max_new_tokens=8, seed=2)
                results = await asyncio.gather(
                    *(
                        node_calls.generate(
                            client, prefill.control, node.control, f"ok{i}", [4, 5, 6], ok
                        )
                        for i in range(8)
                    )
                )
                return results, await client.health(node.control)

        results, health = asyncio.run(others())
        assert all(r.finish_reason == "length" and len(r.token_ids) == 8 for r in results)
        assert health.role == "decode"
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        node.process.wait(timeout=15)
        assert time.monotonic() - started < 10
        stuck.close()
    finally:
        node.stop()


# ---- overload queues, bursts spread ----


def test_300_concurrent_requests_on_a_pool_for_20_all_complete(fleet):
    async def main():
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            body = {
                "model": "tiny",
                "prompt": list(range(3, 23)),
                "max_tokens": 40,
                "ignore_eos": True,
            }
            replies = await asyncio.gather(
                *(
                    client.post(f"{fleet.url}/v1/completions", json=body, headers=HEADERS)
                    for _ in range(300)
                )
            )
            return replies

    replies = asyncio.run(main())
    assert Counter(r.status_code for r in replies) == {200: 300}
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in replies)
    # The 300 spread over the two decode nodes.
    records = fleet.admin("GET", "/admin/requests?limit=300").json()
    spread = Counter(r["decode_node"] for r in records)
    assert len(spread) == 2 and max(spread.values()) <= 0.6 * 300, spread
    wait_until(lambda: pools_idle(fleet))


def test_past_the_queue_bound_the_excess_gets_a_prompt_503(fleet):
    # A second control plane on the same Redis and nodes, with a low queue bound.
    env_fleet = _second_control_plane(fleet, {"LIGHTPD_MAX_QUEUED": "10"})
    try:

        async def main():
            async with httpx.AsyncClient(
                timeout=300, limits=httpx.Limits(max_connections=200)
            ) as c:
                body = {
                    "model": "tiny",
                    "prompt": list(range(3, 23)),
                    "max_tokens": 40,
                    "ignore_eos": True,
                }
                return await asyncio.gather(
                    *(
                        c.post(
                            f"{env_fleet}/v1/completions",
                            json=body | {"stream": i % 2 == 0},
                            headers=HEADERS,
                        )
                        for i in range(150)
                    )
                )

        replies = asyncio.run(main())
        codes = Counter(r.status_code for r in replies)
        assert set(codes) == {200, 503} and codes[503] > 0, codes
        for r in replies:
            if r.status_code == 503:
                assert r.headers["retry-after"].isdigit()
                assert "too many requests are waiting" in r.json()["error"]["message"]
            else:  # nothing that was admitted failed
                assert '"error"' not in r.text
    finally:
        _stop(env_fleet)
    wait_until(lambda: pools_idle(fleet))


_PROCESSES: dict[str, subprocess.Popen] = {}


def _second_control_plane(fleet: LocalFleet, settings: dict[str, str]) -> str:
    import sys

    from lightpd.controlplane.lightctl.embedded_redis import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "lightpd.controlplane"],
        env={**fleet.env, **settings, "LIGHTPD_PORT": str(port)},
    )
    _PROCESSES[url] = process
    wait_healthy(url)
    return url


def _stop(url: str) -> None:
    process = _PROCESSES.pop(url)
    process.terminate()
    process.wait(timeout=15)


# ---- an abort storm ----


def test_an_abort_storm_leaves_no_running_request_and_no_held_slot(fleet):
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "tiny",
            "prompt": list(range(3, 3 + rng.randint(5, 60))),
            "max_tokens": rng.randint(5, 80),
            "stream": i % 2 == 0,
        }
        try:
            async with asyncio.timeout(rng.uniform(0.0, 2.0)):
                async with client.stream(
                    "POST", f"{fleet.url}/v1/completions", json=body, headers=HEADERS
                ) as reply:
                    async for _ in reply.aiter_bytes():
                        pass
        except TimeoutError:
            pass  # the client walked away

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as c:
            await asyncio.gather(*(one(c, i) for i in range(150)))

    asyncio.run(main())

    def settled() -> bool:
        running = fleet.admin("GET", "/admin/requests?running=true&limit=500").json()
        return not running and pools_idle(fleet)

    wait_until(settled, timeout=60)
    assert all_alive(fleet)
