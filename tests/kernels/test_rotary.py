import pytest
import torch

from lightpd.kernels.rotary import apply_rotary_reference, apply_rotary_triton
from tests.kernels.helpers import DEVICE, DTYPES, assert_close, fused_qkv

MAX_POSITIONS = 4096


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64])
def test_matches_reference_in_place(
    dtype: torch.dtype,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    positions_dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    num_tokens = 9
    # Any fp32 table will do: the kernel must only index it the way the reference does.
    cos_sin_cache = torch.randn(MAX_POSITIONS, head_dim, device=DEVICE)
    positions = torch.randint(MAX_POSITIONS, (num_tokens,), dtype=positions_dtype, device=DEVICE)
    q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    q_expected, k_expected, v_before = q.clone(), k.clone(), v.clone()

    apply_rotary_reference(q_expected, k_expected, positions, cos_sin_cache)
    apply_rotary_triton(q, k, positions, cos_sin_cache)

    assert_close(q, q_expected)
    assert_close(k, k_expected)
    # v shares the qkv buffer with q and k: rotating them must not spill into it.
    assert torch.equal(v, v_before)
