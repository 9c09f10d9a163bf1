"""Moving one layer's K and V for a run of positions between a pool and the wire.

On the sender, ``gather_layer`` copies the slots' K and V out of the pool into
host memory (pinned when the pool is on a GPU) as raw bytes that ZeroMQ sends
without another copy. On the receiver, ``scatter_layer`` checks the bytes against
the agreed layout and writes them into the reserved slots.
"""

import warnings
from pathlib import Path

import torch

from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.wire.identity import model_fingerprint
from lightpd.common.wire.messages import KVLayout, ProtocolError

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kv_layout(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype) -> KVLayout:
    return KVLayout(
        model_fingerprint=model_fingerprint(model_dir),
        dtype=_DTYPE_NAMES[dtype],
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )


def gather_layer(
    pool: TokenKVPool, layer: int, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``slots`` in ``layer`` as contiguous host uint8 tensors [n * Hk * D * size]."""
    index = slots.long()
    k, v = pool.k_cache(layer)[index], pool.v_cache(layer)[index]  # (n, Hk, D) each
    if pool.device.type == "cuda":
        k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        k_host.copy_(k, non_blocking=True)
        v_host.copy_(v, non_blocking=True)
        torch.cuda.current_stream(pool.device).synchronize()
        k, v = k_host, v_host
    return k.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)


def scatter_layer(
    pool: TokenKVPool, layer: int, slots: torch.Tensor, k_bytes: memoryview, v_bytes: memoryview
) -> None:
    """Write received K and V bytes for ``slots`` into ``layer``; raises ProtocolError
    when their size does not match what the layout says."""
    k_cache = pool.k_cache(layer)
    token_shape = k_cache.shape[1:]  # (Hk, D)
    expected = slots.numel() * token_shape.numel() * k_cache.element_size()
    for name, frame in (("K", k_bytes), ("V", v_bytes)):
        if frame.nbytes != expected:
            raise ProtocolError(
                f"layer {layer} {name} frame has {frame.nbytes} bytes, expected {expected} "
                f"for {slots.numel()} tokens"
            )
    index = slots.long()
    for cache, frame in ((k_cache, k_bytes), (pool.v_cache(layer), v_bytes)):
        with warnings.catch_warnings():
            # ZeroMQ frames are read-only; we only read from them.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(frame, dtype=torch.uint8)
        values = raw.view(cache.dtype).view(slots.numel(), *token_shape)
        if cache.is_cuda:
            # A plain copy from the frame: pinning a buffer per layer costs more than
            # the copy it would speed up.
            values = values.to(cache.device)
        cache[index] = values
