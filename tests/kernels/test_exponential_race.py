import pytest
import torch

from lightpd.kernels.exponential_race import exponential_race_reference, exponential_race_triton
from tests.kernels.helpers import DEVICE, DTYPES

VOCAB = 5000  # not a multiple of the kernel's block: the last block is partial


def _inputs(num_rows: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    logits = (torch.randn(num_rows, VOCAB, device=DEVICE) * 3).to(dtype)
    inv_temperatures = torch.rand(num_rows, device=DEVICE) * 2 + 0.25
    keys = torch.randint(0, 2**32, (num_rows,), dtype=torch.int64, device=DEVICE)
    steps = torch.randint(0, 2**40, (num_rows,), dtype=torch.int64, device=DEVICE)
    return logits, inv_temperatures, keys, steps


@pytest.mark.parametrize("dtype", DTYPES)
def test_draws_the_reference_tokens(dtype: torch.dtype) -> None:
    args = _inputs(6, dtype)
    assert torch.equal(exponential_race_triton(*args), exponential_race_reference(*args))


def test_masked_tokens_are_never_drawn() -> None:
    logits, inv_temperatures, keys, steps = _inputs(4, torch.float32)
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    allowed[:, [7, 4097, 4999]] = True  # in the first block, the second, and the last
    logits = logits.masked_fill(~allowed, float("-inf"))
    for step in range(5):
        tokens = exponential_race_triton(logits, inv_temperatures, keys, steps + step)
        assert set(tokens.tolist()) <= {7, 4097, 4999}
        assert torch.equal(
            tokens, exponential_race_reference(logits, inv_temperatures, keys, steps + step)
        )


def test_strided_rows() -> None:
    # Logits sliced out of a wider padded buffer, as the decode graphs hand them over.
    logits, inv_temperatures, keys, steps = _inputs(3, torch.float32)
    wide = torch.full((3, VOCAB + 64), float("nan"), device=DEVICE)
    wide[:, :VOCAB] = logits
    view = wide[:, :VOCAB]
    args = (inv_temperatures, keys, steps)
    assert torch.equal(
        exponential_race_triton(view, *args), exponential_race_reference(logits, *args)
    )
