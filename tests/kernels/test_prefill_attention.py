import pytest
import torch

from lightpd.kernels.prefill_attention import (
    PrefillLaunch,
    prefill_attention_reference,
    prefill_attention_triton,
)
from tests.kernels.helpers import DEVICE, DTYPES, assert_close, fused_qkv, make_pool

# (new tokens, cached prefix) per sequence: a one-token chunk after a prefix, a short
# prompt, a prompt longer than one query tile, a chunk after a prefix longer than a
# KV tile, and a single-token prompt.
MIXED_BATCH = [(1, 17), (5, 0), (70, 0), (33, 100), (1, 0)]
FRESH_PROMPTS = [(3, 0), (64, 0), (9, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(
    dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int
) -> None:
    _check(MIXED_BATCH, dtype, head_dim, num_q_heads, num_kv_heads)


def test_fresh_prompts_match_reference() -> None:
    _check(FRESH_PROMPTS, torch.float32, 64, 4, 2)


@pytest.mark.parametrize(
    "launch",
    [PrefillLaunch(block_m=16, block_n=16, num_warps=2, num_stages=1), PrefillLaunch()],
    ids=str,
)
def test_every_tile_shape_gives_the_same_attention(launch: PrefillLaunch) -> None:
    # Query tiles smaller than a KV tile and the other way round, across the prefix.
    _check(MIXED_BATCH, torch.float16, 64, 4, 2, launch)


def _check(
    seqs: list[tuple[int, int]],
    dtype: torch.dtype,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    launch: PrefillLaunch | None = None,
) -> None:
    torch.manual_seed(0)
    num_new = [n for n, _ in seqs]
    seq_lens = [n + prefix for n, prefix in seqs]
    pool = make_pool(seq_lens, num_kv_heads, head_dim, dtype)
    q, _, _ = fused_qkv(sum(num_new), num_q_heads, num_kv_heads, head_dim, dtype)
    cu_seqlens_q = torch.tensor([0, *num_new], device=DEVICE).cumsum(0).to(torch.int32)
    args = (
        q,
        pool.k_cache,
        pool.v_cache,
        pool.req_to_token,
        pool.req_indices,
        cu_seqlens_q,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        head_dim**-0.5,
        max(num_new),
    )

    actual = prefill_attention_triton(*args, launch=launch)

    assert actual.shape == q.shape and actual.dtype == dtype
    assert_close(actual, prefill_attention_reference(*args))
