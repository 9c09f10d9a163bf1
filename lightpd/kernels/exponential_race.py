"""Sampling by the exponential race, fused into one pass over each row of logits.

With E_v ~ Exp(1) independent, ``argmax_v p_v / E_v`` is distributed as p; in
logits at temperature T that is ``argmax_v (z_v / T - log E_v)``. The noise E_v is
a hash of (request key, output step, token id), so a request draws the same
token whatever else shares its batch. Written out in torch, the noise costs
about ten passes over a (B, V) int64 tensor; the kernel makes it in registers
while it reads the logits once.
"""

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so (x < 2**32) * C never overflows int64.
MUL1, MUL2 = 0x21F0AAAD, 0x735A2D97
_UNIFORM_SCALE = 1.0 / (1 << 24)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (xorshift-multiply), on int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def exponential_race_reference(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """Token ids [B] drawn from ``softmax(logits * inv_temperatures)`` row by row.

    logits [B, V] (masked entries -inf); inv_temperatures [B] float32; keys [B]
    int64 32-bit request keys; steps [B] int64 output steps (the RNG counter).
    """
    vocab = logits.shape[1]
    step_keys = hash32(keys ^ hash32(steps & MASK32))  # (B,)
    token_hash = hash32(torch.arange(vocab, dtype=torch.int64, device=logits.device))
    bits = hash32(step_keys[:, None] ^ token_hash[None, :])  # (B, V)
    # 24 random bits -> uniform in (0, 1), never 0 or 1 -> log of Exp(1) noise
    uniform = ((bits >> 8).float() + 0.5) * _UNIFORM_SCALE
    log_noise = torch.log(-torch.log(uniform))
    return (logits.float() * inv_temperatures[:, None] - log_noise).argmax(dim=-1)


@triton.jit
def _hash32(x):
    # uint32 arithmetic wraps at 2**32: the same mix as hash32's masked int64 steps.
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _exponential_race_kernel(
    logits_ptr,
    inv_temperatures_ptr,
    keys_ptr,
    steps_ptr,
    out_ptr,
    logits_row_stride,
    vocab,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    step = tl.load(steps_ptr + row).to(tl.uint32)
    step_key = _hash32(key ^ _hash32(step))
    inv_temperature = tl.load(inv_temperatures_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * logits_row_stride
    best = -float("inf")
    best_id = 0
    for start in range(0, vocab, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        in_vocab = ids < vocab
        z = tl.load(row_ptr + ids, mask=in_vocab, other=-float("inf")).to(tl.float32)
        bits = _hash32(step_key ^ _hash32(ids.to(tl.uint32)))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
        score = z * inv_temperature - tl.log(-tl.log(uniform))
        score = tl.where(in_vocab, score, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_id = start + tl.argmax(score, axis=0)
        # Strictly greater: the first of equal scores wins, as torch's argmax picks.
        better = block_best > best
        best_id = tl.where(better, block_id, best_id)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_id.to(tl.int64))


def exponential_race_triton(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1
    assert inv_temperatures.shape == keys.shape == steps.shape == (num_rows,)
    assert inv_temperatures.dtype == torch.float32
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    _exponential_race_kernel[(num_rows,)](
        logits,
        inv_temperatures,
        keys,
        steps,
        out,
        logits.stride(0),
        vocab,
        BLOCK_V=min(triton.next_power_of_2(vocab), 4096),
        num_warps=8,
    )
    return out


def exponential_race(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    impl = exponential_race_triton if use_triton(logits) else exponential_race_reference
    return impl(logits, inv_temperatures, keys, steps)
