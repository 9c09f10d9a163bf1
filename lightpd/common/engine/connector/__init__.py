from lightpd.common.engine.connector.base import (
    KVConnector,
    KVDone,
    KVEvent,
    KVFailed,
    KVRecvSpec,
    KVSendSpec,
    LayerChunk,
)

__all__ = [
    "KVConnector",
    "KVDone",
    "KVEvent",
    "KVFailed",
    "KVRecvSpec",
    "KVSendSpec",
    "LayerChunk",
]
