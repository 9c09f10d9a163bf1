"""The KV hand-off between two engines, behind one small interface.

A prefill engine owns a connector on the sending side: the model runner calls
``save_layer`` right after each layer's K/V of a batch are written to the pool,
then the engine calls ``finish_send`` with the first token once the prompt is
complete, and keeps the KV until ``poll`` reports the send done (acknowledged)
or failed. A decode engine owns one on the receiving side: once a reservation
holds slots, the engine calls ``start_recv``; ``poll`` later reports the KV
complete (with the first token) or failed. Every transfer has a deadline, so
``poll`` always reports an end. ``cancel`` drops a transfer on either side at
once, whatever it was doing.

Every connector is the same channel (channel.py) with one transport moving the
tensors (ZeroMQ frames, NCCL, ...: one class in one file, transport.py), made by
the transport's name (``make_connector``); the engine and the node servers use
only this interface.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightpd.common.engine.request import TokenLogprob
from lightpd.common.wire.messages import KVLayout


@dataclass(frozen=True)
class KVSendSpec:
    """Where one request's KV goes: the receiver's endpoint, the secret its
    reservation was made under, and how long the receiver may take to confirm."""

    endpoint: str
    secret: str
    timeout_s: float
    transport: str = "zmq"  # what the receiver takes tensors over (its ``transport``)
    # Leading prompt tokens whose KV the receiver holds already (its prefix cache):
    # only positions from there on are sent, and the transfer counts them from 0.
    skip_tokens: int = 0


@dataclass(frozen=True)
class KVRecvSpec:
    """What one reservation accepts: KV under ``secret``, complete within ``timeout_s``."""

    secret: str
    timeout_s: float


@dataclass(frozen=True)
class LayerChunk:
    """Positions [start, start + len(slots)) of one request's transfer, just written
    to a layer; the transfer's position 0 is the first prompt position sent
    (``KVSendSpec.skip_tokens``)."""

    request_id: str
    start: int
    slots: torch.Tensor  # int32 [num_tokens]


@dataclass(frozen=True)
class KVDone:
    """A send acknowledged by its receiver, or a receive complete (with the first
    token the sender sampled after the prompt)."""

    request_id: str
    first_token: int | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # of the prompt, in the sender's prefix cache


@dataclass(frozen=True)
class KVFailed:
    """A transfer that cannot complete; the request's KV is of no use any more."""

    request_id: str
    reason: str


KVEvent = KVDone | KVFailed


class KVConnector(ABC):
    layout: KVLayout
    transport: str  # what this connector's receiving side takes tensors over

    @property
    def endpoint(self) -> str | None:
        """Where senders reach this connector's receiving side (None: sends only)."""
        return None

    def pollables(self) -> list:
        """Sockets or file descriptors whose activity ``poll`` should be called for."""
        return []

    def busy(self) -> bool:
        """Whether a transfer may progress with no activity on ``pollables`` (a copy or
        a collective operation in flight): the caller should poll again soon."""
        return False

    # ---- sending ----

    @abstractmethod
    def start_send(self, request_id: str, spec: KVSendSpec) -> None:
        """Prepare to send ``request_id``'s KV; raises ValueError if it cannot be sent."""

    @abstractmethod
    def save_layer(self, layer: int, chunks: Sequence[LayerChunk]) -> None:
        """``layer``'s K/V of ``chunks`` are in the pool: send them (never blocking)."""

    @abstractmethod
    def finish_send(
        self,
        request_id: str,
        num_prompt_tokens: int,
        first_token: int,
        logprobs: list[TokenLogprob] | None,
        num_cached_tokens: int = 0,
    ) -> None:
        """Every layer of the prompt is sent: send the first token (and how many
        prompt tokens the sender's prefix cache held); the KV must stay in the pool
        until ``poll`` reports this send done or failed."""

    # ---- receiving ----

    @abstractmethod
    def start_recv(
        self, request_id: str, slots: torch.Tensor, num_prompt_tokens: int, spec: KVRecvSpec
    ) -> None:
        """Accept ``request_id``'s KV into ``slots`` (one per prompt position)."""

    # ---- both ----

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget a transfer at once; its slots may be reused right after."""

    @abstractmethod
    def poll(self) -> list[KVEvent]:
        """Transfers that ended since the last call (never blocks)."""

    def close(self) -> None:  # noqa: B027 (transports without resources need nothing)
        """Release sockets and communicators."""
