"""RMSNorm, optionally fused with the residual add that precedes it."""

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` [N, D].

    With ``residual``, normalizes ``s = x + residual`` and returns ``(norm(s), s)``
    so the caller carries ``s`` as the next residual (the Llama block layout).
    Statistics are taken in fp32 and the result is cast back before the weight
    multiply, as Hugging Face does, so fp32 outputs match it bit for bit.
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    x_row_stride,
    residual_row_stride,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < dim
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to x's dtype first: it is the residual the next layer adds to.
        x += tl.load(residual_ptr + row * residual_row_stride + cols, mask=in_row, other=0.0)
        tl.store(residual_out_ptr + row * dim + cols, x, mask=in_row)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / dim + eps)
    weight = tl.load(weight_ptr + cols, mask=in_row)
    out = weight * (h * inv_rms).to(x.dtype)
    tl.store(out_ptr + row * dim + cols, out, mask=in_row)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    num_rows, dim = x.shape
    assert x.stride(1) == 1
    assert weight.shape == (dim,) and weight.stride(0) == 1
    has_residual = residual is not None
    if has_residual:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.stride(1) == 1
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if has_residual else None
    block_d = triton.next_power_of_2(dim)
    _rms_norm_kernel[(num_rows,)](
        x,
        residual,
        weight,
        out,
        residual_out,
        x.stride(0),
        residual.stride(0) if has_residual else 0,
        dim,
        eps,
        HAS_RESIDUAL=has_residual,
        BLOCK_D=block_d,
        num_warps=min(max(block_d // 256, 1), 16),
    )
    return out if residual is None else (out, residual_out)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    impl = rms_norm_triton if use_triton(x) else rms_norm_reference
    return impl(x, weight, eps, residual)
