"""Decode token attention: one query token per request over its slots in the pool."""

import torch

from kernels import use_triton


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """Attention of q [B, Hq, D] over KV positions ``[0, seq_lens[b])`` of each request.

    k_cache/v_cache: [S, Hk, D]; req_to_token: [R, max_context]; req_indices,
    seq_lens: [B]; max_seq_len >= max(seq_lens). Returns [B, Hq, D].
    """
    num_reqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    slots = req_to_token[req_indices, :max_seq_len].long()  # (B, L)
    k = k_cache[slots].float()  # (B, L, Hk, D)
    v = v_cache[slots].float()  # (B, L, Hk, D)
    qg = q.float().view(num_reqs, num_kv_heads, group, head_dim)  # (B, Hk, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * sm_scale  # (B, Hk, G, L)
    valid = torch.arange(max_seq_len, device=q.device)[None, :] < seq_lens[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)  # (B, Hk, G, D)
    return out.reshape(num_reqs, num_q_heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    impl = decode_attention_triton if use_triton(q) else decode_attention_reference
    return impl(q, k_cache, v_cache, req_to_token, req_indices, seq_lens, sm_scale, max_seq_len)
