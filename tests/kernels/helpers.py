"""Inputs shared by the kernel tests: the device, the dtypes, a fused projection, a pool."""

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter has no bf16 arithmetic; on a GPU every serving dtype is checked.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# (atol, rtol) for Triton against the reference, per dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def fused_qkv(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one qkv projection output, as the model produces them."""
    widths = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(widths), dtype=dtype, device=DEVICE)
    q, k, v = qkv.split(widths, dim=-1)
    return (
        q.view(num_tokens, num_q_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


@dataclass
class TokenPool:
    k_cache: torch.Tensor  # (S, Hk, D)
    v_cache: torch.Tensor  # (S, Hk, D)
    req_to_token: torch.Tensor  # (R, max_context) int32
    req_indices: torch.Tensor  # (B,) int64


def make_pool(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> TokenPool:
    """A pool with more slots than the sequences use, handed out in shuffled order.

    Each sequence gets a scattered row of ``req_to_token`` (not 0..B-1). The slots no
    sequence owns hold NaN, and every row's entries past its length point at them, so
    a kernel that reads one position too many fails loudly.
    """
    num_used = sum(seq_lens)
    num_slots = 2 * num_used + 16
    max_context = max(seq_lens) + 128
    num_rows = 2 * len(seq_lens) + 1
    shape = (num_slots, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    order = torch.randperm(num_slots, device=DEVICE)
    used, unused = order[:num_used], order[num_used:]
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")

    req_indices = torch.randperm(num_rows, device=DEVICE)[: len(seq_lens)]
    stale = unused[torch.randint(len(unused), (num_rows, max_context), device=DEVICE)]
    req_to_token = stale.to(torch.int32)
    for row, slots in zip(req_indices.tolist(), used.split(seq_lens), strict=True):
        req_to_token[row, : len(slots)] = slots.to(torch.int32)
    return TokenPool(k_cache, v_cache, req_to_token, req_indices)
