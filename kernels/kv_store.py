"""KV store: scatter the new tokens' K and V into their pool slots."""

import torch

from kernels import use_triton


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


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    impl = store_kv_triton if use_triton(k) else store_kv_reference
    impl(k, v, k_cache, v_cache, slots)
