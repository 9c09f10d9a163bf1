"""Rotary position embedding, neox style (rotate halves), applied in place."""

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] in place.

    ``cos_sin_cache`` [max_pos, D] holds cos in its first D/2 columns and sin in
    the last D/2 (fp32); ``positions`` [T] indexes its rows. The llama3 frequency
    scaling is baked into the cache, so the kernel is the same for every model.
    """
    cos, sin = cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)  # (T, D/2) each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, D/2)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated)


@triton.jit
def _rotate_heads(
    x_ptr,
    token_stride,
    head_stride,
    num_heads,
    cos,
    sin,
    token,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate all heads of one token of ``x`` in place."""
    heads = tl.arange(0, BLOCK_H)
    offsets = token * token_stride + heads[:, None] * head_stride + tl.arange(0, HALF)[None, :]
    mask = heads[:, None] < num_heads
    x1 = tl.load(x_ptr + offsets, mask=mask)  # (BLOCK_H, HALF)
    x2 = tl.load(x_ptr + offsets + HALF, mask=mask)
    tl.store(x_ptr + offsets, x1 * cos - x2 * sin, mask=mask)
    tl.store(x_ptr + offsets + HALF, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _apply_rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cos_sin_row_stride,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cos_sin_row_stride
    # Rounded to q's dtype before the products, as the reference does.
    cos = tl.load(row + tl.arange(0, HALF)).to(q_ptr.dtype.element_ty)[None, :]  # (1, HALF)
    sin = tl.load(row + HALF + tl.arange(0, HALF)).to(q_ptr.dtype.element_ty)[None, :]
    _rotate_heads(
        q_ptr, q_token_stride, q_head_stride, num_q_heads, cos, sin, token, HALF, BLOCK_HQ
    )
    _rotate_heads(
        k_ptr, k_token_stride, k_head_stride, num_kv_heads, cos, sin, token, HALF, BLOCK_HK
    )


def apply_rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and k.dtype == q.dtype
    assert q.stride(2) == 1 and k.stride(2) == 1
    assert positions.shape == (num_tokens,)
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    assert cos_sin_cache.dtype == torch.float32
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim
    _apply_rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_kv_heads,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    impl = apply_rotary_triton if use_triton(q) else apply_rotary_reference
    impl(q, k, positions, cos_sin_cache)
