"""KV store: scatter the new tokens' K and V into their pool slots."""

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton


def store_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write ``k``, ``v`` [T, Hk, D] into ``k_cache``, ``v_cache`` [S, Hk, D] at ``slots`` [T]."""
    k_cache[slots] = k
    v_cache[slots] = v


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cache_slot_stride,
    cache_head_stride,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_kv_heads
    cache_offsets = slot * cache_slot_stride + heads * cache_head_stride + dims  # (BLOCK_H, D)
    k = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slots.shape == (num_tokens,)
    assert k_cache.shape[1:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert k.stride(2) == 1 and v.stride(2) == 1
    # One set of offsets addresses both caches.
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1
    assert triton.next_power_of_2(head_dim) == head_dim
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    impl = store_kv_triton if use_triton(k) else store_kv_reference
    impl(k, v, k_cache, v_cache, slots)
