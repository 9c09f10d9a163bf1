"""Peak-memory admission (LightLLM's rule) with output lengths learned as requests finish."""

from collections import deque
from collections.abc import Iterable

from lightpd.common.engine.request import Request


class OutputLengthEstimator:
    """Predicts how many tokens a request will generate, from recently finished ones.

    Until enough requests have finished it assumes the worst (``max_new_tokens``);
    after that, a high quantile of recent lengths, never above ``max_new_tokens``.
    """

    def __init__(self, window: int = 1000, min_samples: int = 8, quantile: float = 0.9) -> None:
        self._lengths: deque[int] = deque(maxlen=window)
        self._min_samples = min_samples
        self._quantile = quantile
        self._cached: int | None = None

    def observe(self, num_output_tokens: int) -> None:
        self._lengths.append(num_output_tokens)
        self._cached = None

    def expected_output(self, max_new_tokens: int) -> int:
        if len(self._lengths) < self._min_samples:
            return max_new_tokens
        if self._cached is None:
            ordered = sorted(self._lengths)
            self._cached = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]
        return min(max_new_tokens, self._cached)

    def remaining(self, request: Request) -> int:
        """Tokens ``request`` is still expected to add to the pool."""
        left = request.max_new_tokens - request.num_output_tokens
        expected = self.expected_output(request.max_new_tokens) - request.num_output_tokens
        return max(1, min(left, expected))


def peak_tokens(entries: Iterable[tuple[int, int]]) -> int:
    """Peak pool use of requests given as (remaining tokens b, current tokens a).

    Sorted by b descending, request i (1-based) finishes last among the first i,
    at which point those i requests hold sum_{j<=i} a_j + i * b_i tokens and the
    rest have already finished; the peak is the largest such sum.
    """
    peak = held = 0
    for i, (remaining, current) in enumerate(sorted(entries, reverse=True), start=1):
        held += current
        peak = max(peak, held + i * remaining)
    return peak
