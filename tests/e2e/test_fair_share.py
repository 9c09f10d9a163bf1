"""One tenant's huge request cannot starve another's short one (issue 25): the decode
node shares its rows among tenants, pausing the big tenant's newest sequences to
make room; the big request goes on and the short one is answered at once."""

import json
import socket
import time

import httpx
import pytest

from lightpd.common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import API_KEY, LocalFleet

ROWS = 16


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "llama")
    node_args = ("--num-kv-slots", "20000", "--max-num-reqs", str(ROWS))
    fleet = LocalFleet(str(model), node_ttl_s=10.0, node_args=node_args)
    try:
        yield fleet.start(prefill=1, decode=1)
    finally:
        fleet.stop()


def running_on_nodes(fleet) -> int:
    roles = fleet.admin("GET", "/admin/stats").json()["roles"]
    return sum(role["running"] for role in roles.values())


def test_a_short_request_finishes_while_another_tenant_floods_the_node(fleet):
    other_key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]
    # 16 prompts x n=16: 256 sequences of 1,000 tokens, 16 times the node's rows.
    big = {
        "model": "tiny",
        "prompt": [[5, 6, 7]] * 16,
        "n": 16,
        "max_tokens": 1000,
        "ignore_eos": True,
    }
    body = json.dumps(big).encode()
    host, port = fleet.url.removeprefix("http://").split(":")
    flood = socket.create_connection((host, int(port)))
    try:
        flood.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while running_on_nodes(fleet) < ROWS:  # every row of the decode node taken
            assert time.monotonic() < deadline, "the flood did not start"
            time.sleep(0.2)
        started = time.monotonic()
        reply = httpx.post(
            f"{fleet.url}/v1/completions",
            json={"model": "tiny", "prompt": [9, 10, 11, 12], "max_tokens": 4},
            headers={"Authorization": f"Bearer {other_key}"},
            timeout=60,
        )
        took = time.monotonic() - started
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        assert took < 5.0, took
        assert running_on_nodes(fleet) >= ROWS - 1  # the flood goes on meanwhile
    finally:
        flood.close()  # the client leaves: its request is aborted on the nodes
    deadline = time.monotonic() + 30
    while running_on_nodes(fleet):  # nothing left behind
        assert time.monotonic() < deadline, fleet.admin("GET", "/admin/stats").json()
        time.sleep(0.5)
