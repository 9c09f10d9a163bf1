"""Kernels: one op per file, each a plain-PyTorch reference plus a Triton version.

Every op module exposes ``<op>_reference``, ``<op>_triton`` and ``<op>``, all with
the same signature. ``<op>`` runs Triton on CUDA tensors and the reference
elsewhere; tests compare the two (under ``TRITON_INTERPRET=1`` on CPU).
"""

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Whether the fast path applies to tensors living where ``t`` lives."""
    return t.is_cuda
