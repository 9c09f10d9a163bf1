"""Prefill attention over packed variable-length sequences, reading K/V from the token pool.

The new tokens' K/V are stored into the pool before this runs, so one kernel
covers a fresh prompt, a later chunk of a chunked prefill, and a prompt whose
prefix is already cached: each sequence attends causally to every KV position
``[0, seq_len)`` that its ``req_to_token`` row maps.
"""

import torch
import torch.nn.functional as F

from kernels import use_triton


def prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """Causal attention for packed queries.

    q:            [T, Hq, D], the new tokens of B sequences packed back to back
    k_cache/v_cache: [S, Hk, D], one layer of the pool; Hq is a multiple of Hk
    req_to_token: [R, max_context] slot of each position of each request row
    req_indices:  [B] row of each sequence in ``req_to_token``
    cu_seqlens_q: [B+1] offsets of each sequence's queries in ``q``
    seq_lens:     [B] KV length of each sequence, prefix included
    max_seqlen_q: longest query run, for the launch grid
    Returns [T, Hq, D]. Query j of sequence b sits at position
    ``seq_lens[b] - n_b + j`` and sees KV positions up to and including it.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    bounds = cu_seqlens_q.tolist()
    for b, (row, kv_len) in enumerate(zip(req_indices.tolist(), seq_lens.tolist(), strict=True)):
        start, end = bounds[b], bounds[b + 1]
        num_q = end - start
        slots = req_to_token[row, :kv_len].long()
        k = k_cache[slots].transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, L, D)
        v = v_cache[slots].transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, L, D)
        qb = q[start:end].transpose(0, 1)  # (Hq, n, D)
        q_pos = torch.arange(kv_len - num_q, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # (n, L)
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=sm_scale)
        out[start:end] = ob.transpose(0, 1)
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    impl = prefill_attention_triton if use_triton(q) else prefill_attention_reference
    return impl(
        q, k_cache, v_cache, req_to_token, req_indices, cu_seqlens_q, seq_lens, sm_scale,
        max_seqlen_q,
    )
