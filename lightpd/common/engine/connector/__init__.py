from lightpd.common.engine.connector.base import (
    KVConnector,
    KVDone,
    KVEvent,
    KVFailed,
    KVRecvSpec,
    KVSendSpec,
    LayerChunk,
)
from lightpd.common.engine.connector.channel import LANES
from lightpd.common.engine.connector.registry import make_connector

__all__ = [
    "LANES",
    "KVConnector",
    "KVDone",
    "KVEvent",
    "KVFailed",
    "KVRecvSpec",
    "KVSendSpec",
    "LayerChunk",
    "make_connector",
]
