"""A KV transport within one process: a transport is one file (and one registry
line, which the conformance suite adds).

The sender parks each chunk's K/V under a fresh tag and sends the tagged header
over the channel; the receiver takes the tensors parked under that tag.
"""

import itertools

import msgspec
import torch
import zmq

from lightpd.common.engine.connector.transport import Transport
from lightpd.common.wire.messages import KVLayer, ProtocolError

_tags = itertools.count()
_parked: dict[int, torch.Tensor] = {}  # tag -> (2, n, Hk, D), until a receiver takes it


class LoopbackTransport(Transport):
    name = "loopback"

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self._sent: dict[str, list[int]] = {}  # request id -> its tags, on the sender

    def send_layer(self, endpoint: str, header: KVLayer, slots: torch.Tensor) -> None:
        pool, index, tag = self.channel.pool, slots.long(), next(_tags)
        _parked[tag] = torch.stack(
            (pool.k_cache(header.layer)[index], pool.v_cache(header.layer)[index])
        )
        self._sent.setdefault(header.request_id, []).append(tag)
        self.channel.send(msgspec.structs.replace(header, group_tag=tag))

    def receive_layer(
        self, peer: bytes, header: KVLayer, frames: list[zmq.Frame], slots: torch.Tensor
    ) -> None:
        kv = _parked.pop(header.group_tag, None)
        if frames or kv is None:
            raise ProtocolError(f"no K/V parked under tag {header.group_tag}")
        index = slots.long()
        self.channel.pool.k_cache(header.layer)[index] = kv[0]
        self.channel.pool.v_cache(header.layer)[index] = kv[1]

    def drop_layer(self, peer: bytes, header: KVLayer) -> None:
        _parked.pop(header.group_tag, None)

    def end(self, request_id: str, stuck: bool = False) -> None:
        tags = self._sent.pop(request_id, [])
        if stuck:  # headers that may never arrive: nobody takes their K/V
            for tag in tags:
                _parked.pop(tag, None)
