"""The node's outgoing path: a peer that stops reading costs its own requests, never
a blocked loop; strangers cannot complete a handshake."""

import time

import zmq

from lightpd.common.node.runtime import Publisher
from lightpd.common.wire.auth import FleetKeys, start_authenticator
from lightpd.common.wire.messages import HealthCheck, TokenEvent, decode, encode
from lightpd.common.wire.sockets import serving_socket

KEYS = FleetKeys.from_token("unit-test-token")


def _node(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    sock = serving_socket(ctx, KEYS)
    sock.setsockopt(zmq.SNDHWM, 64)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _member(ctx: zmq.Context, endpoint: str, identity: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    KEYS.connect_as_member(sock)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 1024)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_a_peer_that_stops_reading_is_reported_lost_and_never_blocks():
    ctx = zmq.Context()
    auth = start_authenticator(ctx, KEYS)
    try:
        node, endpoint = _node(ctx)
        reader, stuck = _member(ctx, endpoint, b"reader"), _member(ctx, endpoint, b"stuck")
        for sock in (reader, stuck):  # the node learns both peers
            sock.send(encode(HealthCheck(call_id=1)))
            node.recv_multipart()
        publisher = Publisher(node, "n1")
        event = TokenEvent(request_id="r", token_ids=list(range(2000)))
        lost: set[bytes] = set()
        started = time.monotonic()
        for _ in range(5000):
            publisher.add(b"reader", event)
            publisher.add(b"stuck", event)
            lost.update(publisher.flush())
            while reader.poll(5):
                reader.recv()
            if b"stuck" in lost:
                break
        assert lost == {b"stuck"}  # the reader never counted as lost
        assert time.monotonic() - started < 30
        # A peer that is gone altogether is reported at once.
        publisher.add(b"nobody", event)
        assert publisher.flush() == [b"nobody"]
    finally:
        auth.stop()
        ctx.destroy(linger=0)


def test_only_holders_of_the_cluster_token_complete_the_handshake():
    ctx = zmq.Context()
    auth = start_authenticator(ctx, KEYS)
    try:
        node, endpoint = _node(ctx)
        member = _member(ctx, endpoint, b"m")
        strangers = []
        for keys in (None, FleetKeys.from_token("another-token")):
            sock = ctx.socket(zmq.DEALER)
            if keys is not None:
                keys.connect_as_member(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            strangers.append(sock)
        for sock in (*strangers, member):
            sock.send(encode(HealthCheck(call_id=7)))
        assert node.poll(3000)
        identity, frame = node.recv_multipart()
        assert identity == b"m" and decode(frame).call_id == 7
        assert not node.poll(500)  # nothing from the strangers ever arrives
    finally:
        auth.stop()
        ctx.destroy(linger=0)
