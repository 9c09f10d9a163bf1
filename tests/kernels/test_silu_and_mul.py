import pytest
import torch

from lightpd.kernels.silu_and_mul import silu_and_mul_reference, silu_and_mul_triton
from tests.kernels.helpers import DEVICE, DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", [64, 1100])  # 1100: several column blocks, a ragged last one
def test_matches_reference(dtype: torch.dtype, inner: int) -> None:
    torch.manual_seed(0)
    # gate_up as the first columns of a wider buffer: the row stride is not 2I.
    x = torch.randn(5, 2 * inner + 16, dtype=dtype, device=DEVICE)[:, : 2 * inner]
    x_before = x.clone()

    actual = silu_and_mul_triton(x)

    assert actual.shape == (5, inner)
    assert_close(actual, silu_and_mul_reference(x))
    assert torch.equal(x, x_before)
