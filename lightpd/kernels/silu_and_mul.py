"""SiLU-and-mul: the gated activation of the Llama MLP."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightpd.kernels import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [N, 2I] (gate and up fused)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_row_stride,
    inner,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < inner
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + inner + cols, mask=in_row, other=0.0)
    # silu in fp32, rounded to x's dtype before the multiply, as the two torch ops do.
    g = gate.to(tl.float32)
    out = (g * tl.sigmoid(g)).to(gate.dtype) * up
    tl.store(out_ptr + row * inner + cols, out, mask=in_row)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    num_rows, width = x.shape
    assert width % 2 == 0 and x.stride(1) == 1
    inner = width // 2
    out = torch.empty((num_rows, inner), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inner), 1024)
    grid = (num_rows, triton.cdiv(inner, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), inner, BLOCK=block, num_warps=4)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    impl = silu_and_mul_triton if use_triton(x) else silu_and_mul_reference
    return impl(x)
