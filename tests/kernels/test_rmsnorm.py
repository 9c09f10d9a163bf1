import pytest
import torch

from lightpd.kernels.rmsnorm import rms_norm_reference, rms_norm_triton
from tests.kernels.helpers import DEVICE, DTYPES, assert_close

EPS = 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(dtype: torch.dtype, dim: int, with_residual: bool) -> None:
    torch.manual_seed(0)
    # Rows of a wider buffer: the row stride is not the row length.
    x = torch.randn(7, dim + 24, dtype=dtype, device=DEVICE)[:, :dim]
    weight = torch.randn(dim, dtype=dtype, device=DEVICE)
    residual = torch.randn(7, dim, dtype=dtype, device=DEVICE) if with_residual else None
    x_before = x.clone()

    actual = rms_norm_triton(x, weight, EPS, residual)
    expected = rms_norm_reference(x, weight, EPS, residual)

    assert torch.equal(x, x_before)
    if not with_residual:
        assert_close(actual, expected)
        return
    (out, new_residual), (expected_out, expected_residual) = actual, expected
    assert_close(out, expected_out)
    # The sum is one rounding in either version, so it matches bit for bit.
    assert torch.equal(new_residual, expected_residual)


def test_weight_dtype_promotes_like_torch() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.float16, device=DEVICE)
    weight = torch.randn(64, dtype=torch.float32, device=DEVICE)
    actual = rms_norm_triton(x, weight, EPS)
    expected = rms_norm_reference(x, weight, EPS)
    assert actual.dtype == expected.dtype == torch.float32
    assert_close(actual, expected)
