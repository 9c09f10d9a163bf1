"""SiLU-and-mul: the gated activation of the Llama MLP."""

import torch
import torch.nn.functional as F

from kernels import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [N, 2I] (gate and up fused)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    impl = silu_and_mul_triton if use_triton(x) else silu_and_mul_reference
    return impl(x)
