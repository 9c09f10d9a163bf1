"""Fair shares of a node among tenants: which waiting request goes next, and whose
running request makes room for it.

Each request carries its tenant and the tenant's weight (``SamplingParams.tenant``,
``tenant_weight``; the control plane sets them from the API key). A tenant's share
is its running requests over its weight. The next request admitted is the first
waiting request of the tenant with the smallest share (first come, first served
within a tenant, and across tenants at equal shares, so a node with one tenant
admits in arrival order as before). When it does not fit, a request of a tenant
that stays at least at the newcomer's share after losing one is paused (its KV
freed, recomputed later) until it fits: one tenant's burst of a thousand sequences
cannot keep another tenant's four-token request waiting. Shares converge without
pausing back and forth, since a tenant is paused only down to the newcomer's level.
"""

from collections import Counter, deque

from lightpd.common.engine.request import Request


class WaitingQueue(deque):
    """The scheduler's queue of waiting requests, counting them by tenant, so that a
    node with one tenant picks its head at once (no scan on the step's path)."""

    def __init__(self) -> None:
        super().__init__()
        self.tenants: Counter[int] = Counter()

    def append(self, request: Request) -> None:
        super().append(request)
        self.tenants[request.params.tenant] += 1

    def appendleft(self, request: Request) -> None:
        super().appendleft(request)
        self.tenants[request.params.tenant] += 1

    def remove(self, request: Request) -> None:
        super().remove(request)
        self.tenants[request.params.tenant] -= 1
        if not self.tenants[request.params.tenant]:
            del self.tenants[request.params.tenant]


def _share(held: int, request: Request) -> float:
    return held / request.params.tenant_weight


def next_waiting(waiting: WaitingQueue, running: list[Request]) -> Request | None:
    """The waiting request to admit next (None if none waits)."""
    if len(waiting.tenants) <= 1:
        return waiting[0] if waiting else None
    held = Counter(r.params.tenant for r in running)
    best: Request | None = None
    seen: set[int] = set()
    for request in waiting:  # in queue order: the first of each tenant stands for it
        tenant = request.params.tenant
        if tenant in seen:
            continue
        seen.add(tenant)
        if best is None or _share(held[tenant], request) < _share(held[best.params.tenant], best):
            best = request
        if len(seen) == len(waiting.tenants):
            break  # every tenant's first request is weighed
    return best


def make_room_from(request: Request, running: list[Request]) -> Request | None:
    """A running request to pause so that ``request`` may run: the newest decoding
    one of the tenant furthest over ``request``'s share after admission; None if no
    tenant is over it."""
    movable = [r for r in running if r.is_movable]
    held = Counter(r.params.tenant for r in running)
    tenant = request.params.tenant
    after = _share(held[tenant] + 1, request)
    victim: Request | None = None
    for candidate in movable:
        other = candidate.params.tenant
        if other == tenant or _share(held[other] - 1, candidate) < after:
            continue
        if victim is None or (
            _share(held[other], candidate),
            candidate.arrival,
        ) > (_share(held[victim.params.tenant], victim), victim.arrival):
            victim = candidate
    return victim
