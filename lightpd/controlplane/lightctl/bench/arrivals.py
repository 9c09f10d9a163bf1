"""When each request (or conversation) is sent: a gamma-distributed arrival process.

As in vLLM's benchmark: the gaps between arrivals are Gamma(shape=burstiness,
scale=1 / (rate * burstiness)), so their mean is 1 / rate for any burstiness;
burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular.
A rate of infinity sends everything at once.
"""

import math
import random


def check_load(rate: float, burstiness: float) -> None:
    if not rate > 0:
        raise ValueError(f"the request rate must be positive (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")


def arrival_times(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start; the first is 0."""
    check_load(rate, burstiness)
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(f"arrivals-{seed}")
    scale = 1.0 / (rate * burstiness)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times
