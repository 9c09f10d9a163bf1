import pytest
import torch

from lightpd.kernels.kv_store import store_kv_reference, store_kv_triton
from tests.kernels.helpers import DEVICE, DTYPES, fused_qkv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64])
def test_writes_exactly_the_given_slots(
    dtype: torch.dtype, num_kv_heads: int, head_dim: int, slots_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    num_tokens, num_slots = 11, 64
    _, k, v = fused_qkv(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype)
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_slots, device=DEVICE)[:num_tokens].to(slots_dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    store_kv_reference(k, v, k_expected, v_expected, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)

    # A copy is exact, and every other slot keeps its old contents.
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
