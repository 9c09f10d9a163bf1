"""How a connector's K/V tensors travel; everything else is the channel's.

A connector is a channel (channel.py: the ZeroMQ sockets and lanes, the headers,
secrets, acknowledgements and deadlines every transport shares) and one transport,
which moves the K and V of each layer chunk whose header the channel carries.
Every receiver also takes K/V as raw frames beside the header (``ZmqTransport``),
so a sender falls back to those for a receiver of another transport.

A transport that moves tensors outside the channel tags each header it sends
(``KVLayer.group_tag``) and, on the receiving side, finds the tensors by that tag.
Transports are named in ``lightpd.common.kv_transports``.
"""

from abc import ABC, abstractmethod
from typing import Protocol

import torch
import zmq

from lightpd.common.engine.connector.base import KVFailed
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.wire.messages import KVLayer, KVLayout, Message


class Channel(Protocol):
    """What a transport may use of the channel it runs under."""

    layout: KVLayout
    pool: TokenKVPool
    host: str | None  # where this side receives (None: it only sends)
    lanes: int  # connections to each receiver; each keeps its messages in order

    def send(
        self, header: KVLayer, kv: tuple[torch.Tensor, torch.Tensor] | None = None, lane: int = 0
    ) -> None:
        """Send ``header`` to its request's receiver on ``lane``, behind what went
        there before; with ``kv`` (K and V gathered from the pool) as raw frames."""

    def send_to(self, endpoint: str, message: Message) -> None:
        """Send a message of the transport's own to the receiver at ``endpoint``."""

    def reply(self, peer: bytes, message: Message) -> None:
        """Answer the sender whose messages come over the connection ``peer``."""


class Transport(ABC):
    """Moves layer chunks' K/V from one pool to another, beside the channel.

    Only ``send_layer`` and ``receive_layer`` are required; the rest is for
    transports that move tensors outside the channel, at their own pace.
    """

    name: str  # what a receiver of this transport tells senders (KVSendSpec.transport)

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    # ---- sending ----

    @abstractmethod
    def send_layer(self, endpoint: str, header: KVLayer, slots: torch.Tensor) -> None:
        """Send the K/V of ``slots`` in ``header.layer`` to the receiver at
        ``endpoint``, and ``header`` through ``channel.send``; never blocks."""

    def on_receiver_message(self, endpoint: str, message: Message) -> bool:
        """A message the channel does not know from the receiver at ``endpoint``;
        True if it is this transport's."""
        return False

    # ---- receiving ----

    @abstractmethod
    def receive_layer(
        self, peer: bytes, header: KVLayer, frames: list[zmq.Frame], slots: torch.Tensor
    ) -> None:
        """Land the K/V of a chunk the channel accepted into ``slots``; ``frames``
        came beside ``header``. Raises ProtocolError if they cannot be taken."""

    def drop_layer(self, peer: bytes, header: KVLayer) -> None:  # noqa: B027 (most have none)
        """The channel refused this chunk: take whatever of it travels outside the
        channel off the wire all the same, and drop it."""

    def landed(self, request_id: str) -> bool:
        """Whether every chunk of ``request_id`` taken so far is in the pool."""
        return True

    def on_sender_message(self, peer: bytes, message: Message) -> bool:
        """A message the channel does not know from the sender at ``peer``; True if
        it is this transport's."""
        return False

    # ---- upkeep ----

    def poll(self) -> list[KVFailed]:
        """Move transfers on (never blocks); those that can no longer complete."""
        return []

    def busy(self) -> bool:
        """Whether a transfer moves with no socket activity (see ``KVConnector.busy``)."""
        return False

    def end(self, request_id: str, stuck: bool = False) -> None:  # noqa: B027
        """``request_id``'s transfer is over (done, failed or cancelled): forget it.
        ``stuck``: it ran past a deadline (or its send failed), so whatever it
        travels on may be stuck too."""

    def close(self) -> None:  # noqa: B027
        """Release threads and communicators."""
