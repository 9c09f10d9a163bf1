"""Rotary position embedding, neox style (rotate halves), applied in place."""

import torch

from kernels import use_triton


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


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    impl = apply_rotary_triton if use_triton(q) else apply_rotary_reference
    impl(q, k, positions, cos_sin_cache)
