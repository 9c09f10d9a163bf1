"""Each control plane holds a lease in Redis while it lives; the requests of one whose
lease ran out are failed by the others (or by its restarted self).

A control plane that dies (SIGKILL, a lost host) cannot record how its requests
ended: they would stay "running" in Redis for good, and the admin figures would
count them while the nodes hold none. So every request records the instance that
took it, each instance renews ``lightpd:instance:ID`` every ``RENEW_S``, and every
instance looks at the running requests each ``RECONCILE_S``: one whose instance
has no lease at two looks ``GRACE_S`` apart is failed with the reason, within
``lease_s + RECONCILE_S + GRACE_S`` of its instance's death. The second look keeps
a live instance's requests safe across a Redis restart, when every lease may be
gone for the moment it takes the instances to renew (``RENEW_S``).
"""

import asyncio
import contextlib
import logging
import time

import redis.asyncio as redis
from redis.exceptions import RedisError

from lightpd.controlplane.store import Store

logger = logging.getLogger(__name__)

LEASE_S = 10.0
RENEW_S = 2.0
RECONCILE_S = 5.0
GRACE_S = RECONCILE_S  # more than two renewals


def lease_key(instance_id: str) -> str:
    return f"lightpd:instance:{instance_id}"


class InstanceLease:
    def __init__(self, client: redis.Redis, store: Store, lease_s: float = LEASE_S) -> None:
        self.client = client
        self.store = store
        self.lease_s = lease_s
        self._orphans: dict[str, float] = {}  # request id -> when first seen without a lease
        self._last_reconcile = 0.0

    @property
    def instance_id(self) -> str:
        return self.store.instance_id

    async def run(self) -> None:
        """Renew the lease and reconcile until cancelled; then give the lease up."""
        try:
            while True:
                try:
                    await self.renew()
                    if time.monotonic() - self._last_reconcile >= RECONCILE_S:
                        self._last_reconcile = time.monotonic()
                        await self.reconcile()
                except (RedisError, OSError) as exc:  # Redis away: the store says so
                    logger.debug("instance lease: %s", exc)
                await asyncio.sleep(RENEW_S)
        finally:
            with contextlib.suppress(RedisError, OSError):  # else it runs out by itself
                await self.client.delete(lease_key(self.instance_id))

    async def renew(self) -> None:
        await self.client.set(lease_key(self.instance_id), b"1", px=int(self.lease_s * 1000))

    async def reconcile(self) -> int:
        """Fail the running requests of instances without a lease (seen so twice,
        ``GRACE_S`` apart); returns how many."""
        running_owners = await self.store.running_owners()
        if not running_owners:
            self._orphans.clear()
            return 0
        running, owners = zip(*running_owners, strict=True)
        others = sorted({o for o in owners if o and o != self.instance_id})
        async with self.client.pipeline(transaction=False) as pipe:
            for instance in others:
                pipe.exists(lease_key(instance))
            alive = dict(zip(others, await pipe.execute(), strict=True))
        now = time.monotonic()
        orphans = {
            rid: owner
            for rid, owner in zip(running, owners, strict=True)
            if owner and owner != self.instance_id and not alive[owner]
        }
        self._orphans = {rid: self._orphans.get(rid, now) for rid in orphans}
        failed = 0
        for request_id, first_seen in list(self._orphans.items()):
            if now - first_seen < GRACE_S:
                continue
            await self.store.record_request(
                request_id,
                "failed",
                error=f"its control plane ({orphans[request_id]}) stopped before it ended",
            )
            del self._orphans[request_id]
            failed += 1
        if failed:
            logger.warning("failed %d requests of control planes that are gone", failed)
        return failed
