"""K/V over ZeroMQ: each layer chunk's K and V as two raw frames beside its header.

The frames go over the channel's own sockets, so every receiver takes them (a
sender of another transport falls back to them). Layer L always takes lane
L % lanes: the chunks of one layer stay in order, while CURVE's encryption,
which bounds one connection near 1.5 GB/s, runs on several of ZeroMQ's I/O
threads at once. On a GPU the channel copies K and V off the device first
(staging.py).
"""

import torch
import zmq

from lightpd.common.engine.connector.transport import Transport
from lightpd.common.engine.kv_transfer import scatter_layer
from lightpd.common.wire.messages import KVLayer, ProtocolError


class ZmqTransport(Transport):
    name = "zmq"

    def send_layer(self, endpoint: str, header: KVLayer, slots: torch.Tensor) -> None:
        pool, index = self.channel.pool, slots.long()
        k = pool.k_cache(header.layer)[index]  # (n, Hk, D) where the pool is
        v = pool.v_cache(header.layer)[index]
        self.channel.send(header, (k, v), lane=header.layer % self.channel.lanes)

    def receive_layer(
        self, peer: bytes, header: KVLayer, frames: list[zmq.Frame], slots: torch.Tensor
    ) -> None:
        if header.group_tag is not None:
            raise ProtocolError("this node receives KV over ZeroMQ only")
        if len(frames) != 2:
            raise ProtocolError(f"a KV layer needs 2 data frames, got {len(frames)}")
        scatter_layer(self.channel.pool, header.layer, slots, frames[0].buffer, frames[1].buffer)
