"""A control plane's requests live on a node only while it renews its lease: alive
and busy, it keeps them; killed or silent, the nodes free their KV within seconds."""

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from lightpd.common.tiny import write_tiny_checkpoint
from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import Health, HealthCheck, NodeStatus, TokenEvent, encode
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.node_process import NodeProcess, start_node
from lightpd.controlplane.node_client import NodeClient
from tests.e2e import node_calls
from tests.e2e.fleet import API_KEY, CLUSTER_TOKEN, LocalFleet, raw_call

KEYS = FleetKeys.from_token(CLUSTER_TOKEN)
SLOTS = 2048
LONG = 1000  # output tokens: more than a stream makes before the fleet test ends it
LEASE_S = 2.0  # the node's of the first test (the fleet's nodes keep the default, 5 s)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", "llama"))


def status(endpoint: str) -> NodeStatus:
    """A node's stats, asked over a connection of its own (it renews no one's lease)."""
    reply = raw_call(endpoint, [encode(HealthCheck(call_id=1))], KEYS)
    assert isinstance(reply, Health), reply
    return reply.status


def is_idle(node: NodeStatus) -> bool:
    stats = node.stats
    return stats.num_free_slots == node.num_slots and stats.num_running + stats.num_queued == 0


def wait_idle(endpoints: list[str], timeout: float) -> float:
    """Seconds until every node's pool is back to all its slots; fails past ``timeout``."""
    started = time.monotonic()
    while True:
        nodes = [status(e) for e in endpoints]
        if all(is_idle(n) for n in nodes):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, [(n.node_id, n.stats) for n in nodes]
        time.sleep(0.1)


@pytest.fixture
def decode_node(model, tmp_path):
    # Room for a request of the model's whole context (2048) beside a reservation.
    node = start_node(
        "decode",
        model,
        *("--num-kv-slots", "4096", "--lease-s", str(LEASE_S), "--kv-transport", "zmq"),
        cluster_token=CLUSTER_TOKEN,
        log=tmp_path / "decode.log",
    )
    yield node
    node.stop()


def test_renewals_keep_a_busy_control_planes_requests_and_silence_frees_them(
    decode_node: NodeProcess, tmp_path: Path
):
    endpoint = decode_node.control
    waiting_prompt, decoding_prompt = list(range(3, 103)), [5] * 8
    # As long as the model allows; a fast CPU may still finish it within the test.
    params = SamplingParams(temperature=0, max_new_tokens=2040, ignore_eos=True, seed=2)

    async def main() -> tuple[float, list[TokenEvent], TokenEvent | None]:
        async with NodeClient(CLUSTER_TOKEN) as client:
            # One reservation waits for KV that never comes (nothing flows either
            # way for it) and one request decodes (tokens flow to us only).
            client.open_stream("waiting")
            await client.reserve(
                endpoint, "waiting", waiting_prompt, SamplingParams(seed=1), kv_timeout_s=60
            )
            client.open_stream("decoding")
            await client.reserve(endpoint, "decoding", decoding_prompt, params, prefill_here=True)
            events: list[TokenEvent] = []

            async def collect() -> None:
                async for event in node_calls.events(client, "decoding", timeout=60):
                    events.append(event)

            collecting = asyncio.create_task(collect())
            # Busy: work holds the event loop 0.3 s at a time, well past the lease,
            # and nothing but the leases goes to the node.
            busy_until = time.monotonic() + LEASE_S + 1.5
            while time.monotonic() < busy_until:
                time.sleep(0.3)  # the point: work that holds the event loop
                await asyncio.sleep(0)
            node = status(endpoint)
            assert node.stats.num_reserved_slots == len(waiting_prompt)  # still waiting
            assert events and all(e.finish_reason in (None, "length") for e in events)
            # Silent (the connection stays up, tokens are still read): what is left goes.
            client._renewing.cancel()  # what a hung control plane would not send
            freed_after = wait_idle([endpoint], timeout=LEASE_S + 3)
            await asyncio.wait_for(collecting, 5)
            return freed_after, events, await client.next_event("waiting", 5)

    freed_after, events, waiting = asyncio.run(main())
    # The last renewal went out about a second before the silence began (later on a
    # loaded machine, where this test's own busy loop delays the renewal task).
    assert LEASE_S - 1.8 <= freed_after <= LEASE_S + 1.5
    # Were the control plane alive after all, it would learn why.
    why = "aborted by the node: this control plane sent nothing for 2 s (its lease)"
    assert (waiting.finish_reason, waiting.error) == ("error", why)
    decoded = sum(len(e.token_ids) for e in events)
    if events[-1].finish_reason == "length":  # it finished before the lease ran out
        assert decoded == params.max_new_tokens
        lost = 1
    else:
        assert (events[-1].finish_reason, events[-1].error) == ("error", why)
        lost = 2
    log = (tmp_path / "decode.log").read_text()
    assert f"sent nothing for 2 s (its lease); aborting its {lost} requests" in log


def stream(url: str, replies: list[list[str]]) -> None:
    """One long streaming chat; keeps the lines it got, until the stream ends."""
    lines: list[str] = []
    replies.append(lines)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": LONG,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as reply:
            for line in reply.iter_lines():
                lines.append(line)
    except httpx.HTTPError:
        pass  # its control plane was killed under it


@pytest.fixture(scope="module")
def fleet(model):
    """Nodes with the default lease; they heartbeat to the fleet's control plane, and
    each test sends its streams through another one, which it then takes away."""
    fleet = LocalFleet(model, node_args=("--num-kv-slots", str(SLOTS), "--kv-transport", "zmq"))
    try:
        yield fleet.start()
    finally:
        fleet.stop()


@pytest.mark.parametrize(
    "vanish",
    [
        signal.SIGKILL,  # its connections close: the nodes' next sends to it fail
        signal.SIGSTOP,  # its connections stay up, as when its host is lost: the lease ends
    ],
    ids=["killed", "frozen"],
)
def test_a_vanished_control_planes_requests_free_their_kv_within_seconds(fleet, vanish):
    endpoints = [node.control for node in fleet.nodes]
    [decode] = [node for node in fleet.nodes if node.role == "decode"]
    control_plane = fleet.add_control_plane()
    replies: list[list[str]] = []
    # The decode pool holds two of these requests at once; the others queue there.
    streams = [
        threading.Thread(target=stream, args=(control_plane.url, replies), daemon=True)
        for _ in range(6)
    ]
    try:
        for thread in streams:
            thread.start()
        deadline = time.monotonic() + 30
        while sum(len(lines) > 2 for lines in replies) < 2:  # two are decoding
            assert time.monotonic() < deadline, f"no stream started: {replies}"
            time.sleep(0.1)
        held = status(decode.control).stats
        assert held.num_free_slots < SLOTS and held.num_queued > 0
        os.kill(control_plane.process.pid, vanish)
        wait_idle(endpoints, timeout=10)
    finally:
        control_plane.process.kill()  # also ends a stopped process
        control_plane.process.wait(timeout=10)
        for thread in streams:
            thread.join(timeout=10)
