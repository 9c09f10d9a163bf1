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

from collections import Counter
from collections.abc import Iterable

from lightpd.common.engine.request import Request


def _share(held: int, request: Request) -> float:
    return held / request.params.tenant_weight


def next_waiting(waiting: Iterable[Request], running: list[Request]) -> Request | None:
    """The waiting request to admit next (None if none waits)."""
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
