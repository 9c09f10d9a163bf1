"""Prefill attention over packed variable-length sequences, reading K/V from the token pool.

The new tokens' K/V are stored into the pool before this runs, so one kernel
covers a fresh prompt, a later chunk of a chunked prefill, and a prompt whose
prefix is already cached: each sequence attends causally to every KV position
``[0, seq_len)`` that its ``req_to_token`` row maps.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightpd.kernels import use_triton

_LOG2E = 1.4426950408889634  # the kernel uses exp2: exp(x) = exp2(x * log2(e))


@dataclass(frozen=True)
class PrefillLaunch:
    """Query rows and KV positions per tile, warps and pipeline stages."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 4


def prefill_launch(dtype: torch.dtype, head_dim: int) -> PrefillLaunch:
    """Tuned on an H100 for head dim 128 (bench/attention_bench.py --sweep); fp32 tiles
    are twice the bytes, so they get half the rows."""
    if dtype == torch.float32 or head_dim > 128:
        return PrefillLaunch(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillLaunch()


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


@triton.jit
def _attend_kv_range(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_base,
    v_base,
    slot_row_ptr,
    cache_slot_stride,
    kv_len,
    qk_scale,
    lo,
    hi,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold KV positions [lo, hi) into the online softmax of one query tile.

    Without CAUSAL every position is visible to every row and lies below kv_len,
    so the tile skips masking and loads whole blocks.
    """
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        kv_pos = start_n + tl.arange(0, BLOCK_N)
        if CAUSAL:
            in_seq = kv_pos < kv_len
            slots = tl.load(slot_row_ptr + kv_pos, mask=in_seq, other=0).to(tl.int64)
            # (D, BLOCK_N); masked so that stale slots past kv_len are never read
            k = tl.load(
                k_base + slots[None, :] * cache_slot_stride + dims[:, None],
                mask=in_seq[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + slots[:, None] * cache_slot_stride + dims[None, :],
                mask=in_seq[:, None],
                other=0.0,
            )  # (BLOCK_N, D)
        else:
            slots = tl.load(slot_row_ptr + kv_pos).to(tl.int64)
            k = tl.load(k_base + slots[None, :] * cache_slot_stride + dims[:, None])
            v = tl.load(v_base + slots[:, None] * cache_slot_stride + dims[None, :])
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if CAUSAL:
            visible = (kv_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    req_to_token_ptr,
    req_indices_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_slot_stride,
    cache_head_stride,
    req_to_token_stride,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The last query tiles see the most KV: start them first so that the short
    # tiles fill in behind them instead of leaving a tail.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    num_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if block_m * BLOCK_M >= num_q:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    prefix = kv_len - num_q

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_seq = rows < num_q
    dims = tl.arange(0, HEAD_DIM)
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * q_token_stride + head * q_head_stride + dims[None, :],
        mask=in_seq[:, None],
        other=0.0,
    )  # (BLOCK_M, D)
    q_pos = prefix + rows

    slot_row_ptr = (
        req_to_token_ptr + tl.load(req_indices_ptr + seq).to(tl.int64) * req_to_token_stride
    )
    kv_head_offset = (head // GROUP) * cache_head_stride
    k_base = k_cache_ptr + kv_head_offset
    v_base = v_cache_ptr + kv_head_offset
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Every row of the tile sees all positions before its first row's position;
    # whole KV blocks below that need no mask. The rest (the diagonal) does.
    unmasked_end = (prefix + block_m * BLOCK_M) // BLOCK_N * BLOCK_N
    causal_end = tl.minimum(kv_len, prefix + (block_m + 1) * BLOCK_M)
    acc, l_i, m_i = _attend_kv_range(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_base,
        v_base,
        slot_row_ptr,
        cache_slot_stride,
        kv_len,
        qk_scale,
        lo=0,
        hi=unmasked_end,
        CAUSAL=False,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        DOT_PRECISION=DOT_PRECISION,
    )
    acc, l_i, m_i = _attend_kv_range(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_base,
        v_base,
        slot_row_ptr,
        cache_slot_stride,
        kv_len,
        qk_scale,
        lo=unmasked_end,
        hi=causal_end,
        CAUSAL=True,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        DOT_PRECISION=DOT_PRECISION,
    )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + tokens[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=in_seq[:, None],
    )


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seqlen_q: int,
    launch: PrefillLaunch | None = None,
) -> torch.Tensor:
    """``launch`` overrides the tuned launch (for benchmarks and tests)."""
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_seqs = req_indices.shape[0]
    assert num_q_heads % num_kv_heads == 0
    assert k_cache.shape[2] == head_dim and v_cache.shape == k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert triton.next_power_of_2(head_dim) == head_dim and head_dim >= 16
    assert cu_seqlens_q.shape == (num_seqs + 1,) and seq_lens.shape == (num_seqs,)
    assert q.stride(2) == 1 and req_to_token.stride(1) == 1
    # One set of offsets addresses both caches.
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or max_seqlen_q == 0:
        return out
    launch = launch or prefill_launch(q.dtype, head_dim)
    grid = (triton.cdiv(max_seqlen_q, launch.block_m), num_seqs, num_q_heads)
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        req_to_token,
        req_indices,
        cu_seqlens_q,
        seq_lens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        req_to_token.stride(0),
        sm_scale * _LOG2E,
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        # fp32 inputs get exact products (no TF32) so that they match the reference.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
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
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_indices,
        cu_seqlens_q,
        seq_lens,
        sm_scale,
        max_seqlen_q,
    )
