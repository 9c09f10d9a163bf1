"""ZeroMQ sockets of the node plane: members only, and sends that never block.

A serving socket is a ROUTER keyed as a CURVE server (only fleet members reach
it) in mandatory mode, so ``send`` to a peer that is gone or has stopped
reading (its queue is at the high-water mark) fails at once instead of hanging
the loop or dropping the message silently.
"""

import logging

import zmq

from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import Message, encode

logger = logging.getLogger(__name__)

# Messages queued to one peer before it counts as not reading (ROUTER, per peer).
SEND_HWM = 4096
# Largest control message accepted (a prompt of MAX_PROMPT_TOKENS packs in about 5 MiB).
MAX_CONTROL_MESSAGE_BYTES = 16 << 20


def serving_socket(
    ctx: zmq.Context, keys: FleetKeys, max_message_bytes: int = MAX_CONTROL_MESSAGE_BYTES
) -> zmq.Socket:
    """A ROUTER that only fleet members reach, whose sends never block."""
    sock = ctx.socket(zmq.ROUTER)
    keys.serve(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def bind(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind ``sock`` (a free port when ``port`` is 0) and return its endpoint."""
    if port == 0:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


def send(sock: zmq.Socket, identity: bytes, message: Message) -> bool:
    """Send to one peer of a mandatory ROUTER without blocking; False if the peer
    is gone or its queue is full."""
    try:
        sock.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK)
    except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
        logger.warning("cannot send %s to a peer: %s", type(message).__name__, exc)
        return False
    return True
