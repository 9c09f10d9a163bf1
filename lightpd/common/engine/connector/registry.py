"""Connectors built by transport name (the names: ``lightpd.common.kv_transports``)."""

import importlib

import zmq

from lightpd.common.engine.connector.base import KVConnector
from lightpd.common.engine.connector.channel import ChannelConnector
from lightpd.common.engine.connector.transport import Transport
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.kv_transports import TRANSPORTS, resolve_transport
from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import KVLayout


def transport_class(name: str) -> type[Transport]:
    """The class of the transport ``name`` ("auto" is not one: resolve it first)."""
    module, _, attribute = TRANSPORTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def make_connector(
    name: str,
    layout: KVLayout,
    pool: TokenKVPool,
    keys: FleetKeys,
    ctx: zmq.Context,
    bind_host: str | None = None,
    bind_port: int = 0,
    max_tokens: int = 1 << 20,
) -> KVConnector:
    """A connector whose tensors travel over the transport ``name`` (or "auto"): it
    receives on ``bind_host`` (None: it only sends), into frames of at most
    ``max_tokens`` tokens; raises ValueError for a name that is no transport."""
    transport = transport_class(resolve_transport(name, pool.device.type))
    return ChannelConnector(layout, pool, keys, ctx, transport, bind_host, bind_port, max_tokens)
