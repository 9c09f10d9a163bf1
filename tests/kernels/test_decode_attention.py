import pytest
import torch
import triton

from lightpd.kernels.decode_attention import (
    DecodeLaunch,
    decode_attention_reference,
    decode_attention_triton,
    decode_launch,
)
from tests.kernels.helpers import DEVICE, DTYPES, assert_close, fused_qkv, make_pool

# Context lengths: a single token, short ones, exactly one KV tile, and one long
# enough to be cut into several splits while the others use fewer.
SEQ_LENS = [1, 5, 64, 333, 70]


def test_small_batches_split_long_contexts() -> None:
    assert decode_launch(1, 8, 8192).num_splits > 8
    assert decode_launch(1, 8, 8192).num_splits <= triton.cdiv(8192, 64)
    assert decode_launch(256, 8, 512).num_splits == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (8, 2), (8, 1)])
def test_matches_reference(
    dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int
) -> None:
    _check(dtype, head_dim, num_q_heads, num_kv_heads, max(SEQ_LENS))


def test_max_seq_len_above_the_longest_context() -> None:
    # More splits are launched than any request fills; the empty ones must not count.
    _check(torch.float32, 64, 4, 1, max(SEQ_LENS) + 100)


@pytest.mark.parametrize(
    "launch",
    [
        DecodeLaunch(num_splits=1),
        DecodeLaunch(num_splits=4, block_n=32),
        DecodeLaunch(num_splits=32, block_n=128, num_warps=8, num_stages=3),
    ],
    ids=str,
)
def test_every_launch_gives_the_same_attention(launch: DecodeLaunch) -> None:
    # One split per request, splits smaller than a context, and more splits than tiles.
    _check(torch.float32, 64, 8, 2, max(SEQ_LENS), launch)


def _check(
    dtype: torch.dtype,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_seq_len: int,
    launch: DecodeLaunch | None = None,
) -> None:
    torch.manual_seed(0)
    pool = make_pool(SEQ_LENS, num_kv_heads, head_dim, dtype)
    q, _, _ = fused_qkv(len(SEQ_LENS), num_q_heads, num_kv_heads, head_dim, dtype)
    args = (
        q,
        pool.k_cache,
        pool.v_cache,
        pool.req_to_token,
        pool.req_indices,
        torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE),
        head_dim**-0.5,
        max_seq_len,
    )

    actual = decode_attention_triton(*args, launch=launch)

    assert actual.shape == q.shape and actual.dtype == dtype
    assert_close(actual, decode_attention_reference(*args))
