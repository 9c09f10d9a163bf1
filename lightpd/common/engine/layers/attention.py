"""Token attention over the KV pool: store the new K/V, then attend through req_to_token."""

import torch
from torch import nn

from lightpd.common.engine.context import get_context
from lightpd.kernels.decode_attention import decode_attention
from lightpd.kernels.kv_store import store_kv
from lightpd.kernels.prefill_attention import prefill_attention


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hk, D] -> [T, Hq, D]."""
        ctx = get_context()
        pool = ctx.kv_pool
        k_cache, v_cache = pool.k_cache(self.layer_id), pool.v_cache(self.layer_id)
        store_kv(k, v, k_cache, v_cache, ctx.out_slots)
        if ctx.kv_saved is not None:
            ctx.kv_saved(self.layer_id)
        if ctx.is_prefill:
            return prefill_attention(
                q,
                k_cache,
                v_cache,
                ctx.req_to_token,
                ctx.req_indices,
                ctx.cu_seqlens_q,
                ctx.seq_lens,
                self.scale,
                ctx.max_seqlen_q,
            )
        return decode_attention(
            q,
            k_cache,
            v_cache,
            ctx.req_to_token,
            ctx.req_indices,
            ctx.seq_lens,
            self.scale,
            ctx.max_seq_len,
        )
