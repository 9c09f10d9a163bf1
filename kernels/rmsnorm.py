"""RMSNorm, optionally fused with the residual add that precedes it."""

import torch

from kernels import use_triton


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


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    impl = rms_norm_triton if use_triton(x) else rms_norm_reference
    return impl(x, weight, eps, residual)
