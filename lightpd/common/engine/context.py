"""The batch description of one forward pass, filled by the runner, read by attention.

Model code keeps the signature ``forward(input_ids, positions)``; everything the
attention layers need about the batch lives here for the duration of the pass.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lightpd.common.engine.kv_pool import TokenKVPool


@dataclass
class ForwardContext:
    """Packed prefill (``is_prefill``) or one token per request (decode)."""

    is_prefill: bool
    kv_pool: TokenKVPool
    req_to_token: torch.Tensor  # (R, max_context) slot of each position of each row
    req_indices: torch.Tensor  # (B,) rows of kv_pool.req_to_token
    seq_lens: torch.Tensor  # (B,) KV length of each request after this pass
    out_slots: torch.Tensor  # (T,) slot that each new token's K/V goes to
    max_seq_len: int
    cu_seqlens_q: torch.Tensor | None = None  # (B+1,) prefill only
    max_seqlen_q: int = 1
    # Called with a layer's index right after its K/V are in the pool (the KV
    # connector streams them from there while the next layers compute).
    kv_saved: Callable[[int], None] | None = None


_current: ForwardContext | None = None


def get_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention ran outside of a forward context")
    return _current


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    _current = ctx
    try:
        yield ctx
    finally:
        _current = None
