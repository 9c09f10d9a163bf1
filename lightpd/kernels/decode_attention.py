"""Decode token attention: one query token per request over its slots in the pool."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton

_LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e))


@dataclass(frozen=True)
class DecodeLaunch:
    """How the split kernel is launched: tile size, warps, pipeline stages, and the
    number of splits each request's context is cut into."""

    num_splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Programs to aim for: about two per SM of an H100 (132 SMs). More splits than
# that only add partial results to merge (bench/attention_bench.py --sweep).
_TARGET_PROGRAMS = 256
_MAX_SPLITS = 32


def decode_launch(num_reqs: int, num_kv_heads: int, max_seq_len: int) -> DecodeLaunch:
    """Splits per request: more when the batch alone would leave SMs idle, never more
    than the longest context has tiles; long splits take wider tiles. The grid
    depends on ``max_seq_len`` only through these bounds, so a CUDA graph captured
    with the longest allowed context serves every shorter one (the extra splits
    return at once)."""
    programs = max(num_reqs * num_kv_heads, 1)
    wanted = triton.cdiv(_TARGET_PROGRAMS, programs)
    num_splits = max(1, min(wanted, _MAX_SPLITS, triton.cdiv(max(max_seq_len, 1), 64)))
    num_splits = triton.next_power_of_2(num_splits)
    block_n = 128 if num_splits > 1 and max_seq_len // num_splits >= 1024 else 64
    return DecodeLaunch(num_splits=num_splits, block_n=block_n)


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
    valid = torch.arange(max_seq_len, device=q.device)[None, :] < seq_lens[:, None]  # (B, L)
    # Positions past a request's length map to stale slots that may hold anything (NaN
    # included, and 0 * NaN is NaN): read slot 0 there and zero what was read.
    slots = req_to_token[req_indices, :max_seq_len].long().masked_fill(~valid, 0)  # (B, L)
    k = k_cache[slots].float()  # (B, L, Hk, D)
    v = v_cache[slots].float().masked_fill(~valid[:, :, None, None], 0.0)  # (B, L, Hk, D)
    qg = q.float().view(num_reqs, num_kv_heads, group, head_dim)  # (B, Hk, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * sm_scale  # (B, Hk, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)  # (B, Hk, G, D)
    return out.reshape(num_reqs, num_q_heads, head_dim).to(q.dtype)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    req_to_token_ptr,
    req_indices_ptr,
    seq_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    q_req_stride,
    q_head_stride,
    cache_slot_stride,
    cache_head_stride,
    req_to_token_stride,
    num_splits,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Stage 1: attention of one KV head's query group over one split of the context.

    Writes the split's normalized output and its log2-sum-exp2 per query head.
    Each request cuts its own context into ``num_splits`` whole tiles; splits past
    its length write nothing, and stage 2 never reads them.
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    split_size = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, seq_len)
    if split_start >= split_end:
        return

    groups = tl.arange(0, BLOCK_G)
    in_group = groups < GROUP
    heads = kv_head * GROUP + groups
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + req.to(tl.int64) * q_req_stride + heads[:, None] * q_head_stride + dims[None, :],
        mask=in_group[:, None],
        other=0.0,
    )  # (BLOCK_G, D); the padding rows are zero and never stored

    slot_row_ptr = (
        req_to_token_ptr + tl.load(req_indices_ptr + req).to(tl.int64) * req_to_token_stride
    )
    k_base = k_cache_ptr + kv_head * cache_head_stride
    v_base = v_cache_ptr + kv_head * cache_head_stride
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(split_start, split_end, BLOCK_N):
        kv_pos = start_n + tl.arange(0, BLOCK_N)
        in_split = kv_pos < split_end
        slots = tl.load(slot_row_ptr + kv_pos, mask=in_split, other=0).to(tl.int64)
        k = tl.load(
            k_base + slots[None, :] * cache_slot_stride + dims[:, None],
            mask=in_split[None, :],
            other=0.0,
        )  # (D, BLOCK_N)
        v = tl.load(
            v_base + slots[:, None] * cache_slot_stride + dims[None, :],
            mask=in_split[:, None],
            other=0.0,
        )  # (BLOCK_N, D)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        qk = tl.where(in_split[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # partial_out: (B, Hq, num_splits, D), partial_lse: (B, Hq, num_splits), both fp32
    num_q_heads = GROUP * tl.num_programs(1)
    rows = (req * num_q_heads + heads).to(tl.int64) * num_splits + split
    tl.store(
        partial_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
        acc / l_i[:, None],
        mask=in_group[:, None],
    )
    tl.store(partial_lse_ptr + rows, m_i + tl.math.log2(l_i), mask=in_group)


@triton.jit
def _decode_merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Stage 2: merge one query head's splits, weighting each by its share of the sum."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    num_splits = NUM_SPLITS
    seq_len = tl.load(seq_lens_ptr + req)
    split_size = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    num_valid = tl.cdiv(seq_len, split_size)
    splits = tl.arange(0, NUM_SPLITS)
    valid = splits < num_valid
    dims = tl.arange(0, HEAD_DIM)
    row = (req * tl.num_programs(1) + head).to(tl.int64)
    lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=valid, other=float("-inf"))
    partial = tl.load(
        partial_out_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :],
        mask=valid[:, None],
        other=0.0,
    )  # (BLOCK_S, D)
    weights = tl.math.exp2(lse - tl.max(lse, 0))  # (BLOCK_S,)
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
    launch: DecodeLaunch | None = None,
) -> torch.Tensor:
    """``launch`` overrides the tuned launch (for benchmarks and tests)."""
    num_reqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_q_heads % num_kv_heads == 0
    assert k_cache.shape[2] == head_dim and v_cache.shape == k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert triton.next_power_of_2(head_dim) == head_dim and head_dim >= 16
    assert req_indices.shape == (num_reqs,) and seq_lens.shape == (num_reqs,)
    assert q.stride(2) == 1 and req_to_token.stride(1) == 1
    # One set of offsets addresses both caches.
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_reqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    launch = launch or decode_launch(num_reqs, num_kv_heads, max_seq_len)
    num_splits = launch.num_splits
    assert triton.next_power_of_2(num_splits) == num_splits
    partial_out = torch.empty(
        (num_reqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    partial_lse = torch.empty(
        (num_reqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device
    )
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_indices,
        seq_lens,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        req_to_token.stride(0),
        num_splits,
        sm_scale * _LOG2E,
        GROUP=group,
        HEAD_DIM=head_dim,
        # tl.dot needs at least 16 rows; the padding rows cost nothing in memory traffic.
        BLOCK_G=max(triton.next_power_of_2(group), 16),
        BLOCK_N=launch.block_n,
        # fp32 inputs get exact products (no TF32) so that they match the reference.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    _decode_merge_kernel[(num_reqs, num_q_heads)](
        partial_out,
        partial_lse,
        seq_lens,
        out,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_N=launch.block_n,
        num_warps=4,
    )
    return out


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
