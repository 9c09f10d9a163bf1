"""The control plane's queue, shared by tenants.

At most ``max_queued`` requests of a control plane wait for decode slots at once;
past that a request gets a 503 with Retry-After. Left at that, one tenant's burst
would take every place and leave the others only 503s. So while the queue is full,
a tenant still gets a place if it holds fewer than its weighted share of the bound
among the tenants that wait (its weight over theirs and its own): a flood fills the
queue, and a newcomer still gets in. The queue may then pass the bound, by at most
the shares of the tenants under theirs (so never twice over).
"""

import contextlib
from collections import Counter
from collections.abc import Iterator


class QueueShares:
    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self.waiting: Counter[int] = Counter()  # by tenant
        self.weights: dict[int, float] = {}

    @property
    def num_queued(self) -> int:
        return self.waiting.total()

    def share(self, tenant: int, weight: float) -> float:
        """``tenant``'s places of the bound, as the tenants waiting now share it."""
        others = sum(self.weights[t] for t, n in self.waiting.items() if n and t != tenant)
        return self.max_queued * weight / (weight + others)

    def take(self, tenant: int, weight: float) -> bool:
        """A place for a request of ``tenant``; False when the queue is full and the
        tenant holds its share already."""
        full = self.num_queued >= self.max_queued
        if full and self.waiting[tenant] >= self.share(tenant, weight):
            return False
        self.waiting[tenant] += 1
        self.weights[tenant] = weight
        return True

    def give_back(self, tenant: int) -> None:
        self.waiting[tenant] -= 1
        if not self.waiting[tenant]:
            del self.waiting[tenant]
            self.weights.pop(tenant, None)

    @contextlib.contextmanager
    def place(self, tenant: int, weight: float) -> Iterator["Place | None"]:
        """A place taken (``take``) for the block, given back at its end at the latest;
        None when none could be taken."""
        if not self.take(tenant, weight):
            yield None
            return
        place = Place(self, tenant)
        try:
            yield place
        finally:
            place.leave()


class Place:
    """A request's place in the queue; ``leave`` gives it back (once)."""

    def __init__(self, queue: QueueShares, tenant: int) -> None:
        self.queue = queue
        self.tenant = tenant
        self.held = True

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.queue.give_back(self.tenant)
