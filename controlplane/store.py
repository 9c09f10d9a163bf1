"""Fleet state in Redis: the node registry, request states and API keys.

A node is a hash ``lightpd:node:{id}`` (registration, stats, status, times) that
expires ``node_ttl_s`` after its last heartbeat, so a dead node leaves the
registry by itself. A request is a hash written at each state transition, never
per token, indexed by time in ``lightpd:requests``.
"""

import time

import redis.asyncio as redis

from controlplane.schemas import NodePublic, NodeRegistration, NodeStats

_NODES = "lightpd:nodes"
_REQUESTS = "lightpd:requests"
_RUNNING = "lightpd:requests:running"
_API_KEYS = "lightpd:api_keys"
REQUEST_TTL_S = 24 * 3600
MAX_RECENT_REQUESTS = 10_000
REMOVED_MEMORY_S = 3600
TERMINAL_STATES = ("finished", "failed", "aborted")


def _node_key(node_id: str) -> str:
    return f"lightpd:node:{node_id}"


def _removed_key(node_id: str) -> str:
    return f"lightpd:removed:{node_id}"


def _request_key(request_id: str) -> str:
    return f"lightpd:request:{request_id}"


class Store:
    def __init__(self, client: redis.Redis, node_ttl_s: float) -> None:
        self.redis = client
        self.node_ttl_ms = int(node_ttl_s * 1000)

    # ---- nodes ----

    async def register(self, registration: NodeRegistration) -> None:
        now = time.time()
        key = _node_key(registration.node_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key, _removed_key(registration.node_id))
            pipe.hset(
                key,
                mapping={
                    "registration": registration.model_dump_json(),
                    "status": "ready",
                    "registered_at": now,
                    "last_heartbeat": now,
                },
            )
            pipe.pexpire(key, self.node_ttl_ms)
            pipe.sadd(_NODES, registration.node_id)
            await pipe.execute()

    async def heartbeat(self, node_id: str, stats: NodeStats) -> str | None:
        """Store fresh stats; returns the node's status, or None if it is not registered."""
        key = _node_key(node_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, "status")
            pipe.hset(
                key, mapping={"stats": stats.model_dump_json(), "last_heartbeat": time.time()}
            )
            pipe.pexpire(key, self.node_ttl_ms)
            status, _, _ = await pipe.execute()
        if status is None:  # expired or removed: undo the partial write
            await self.redis.delete(key)
            return None
        return status.decode()

    async def set_status(self, node_id: str, status: str) -> bool:
        key = _node_key(node_id)
        if not await self.redis.exists(key):
            return False
        await self.redis.hset(key, "status", status)
        return True

    async def remove(self, node_id: str) -> bool:
        """Remove a node for good: its later heartbeats are told so and it stops."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_node_key(node_id))
            pipe.srem(_NODES, node_id)
            pipe.set(_removed_key(node_id), 1, ex=REMOVED_MEMORY_S)
            deleted, _, _ = await pipe.execute()
        return bool(deleted)

    async def was_removed(self, node_id: str) -> bool:
        return bool(await self.redis.exists(_removed_key(node_id)))

    async def nodes(self) -> list[NodePublic]:
        ids = sorted(m.decode() for m in await self.redis.smembers(_NODES))
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hgetall(_node_key(node_id))
            records = await pipe.execute()
        nodes, gone = [], []
        for node_id, record in zip(ids, records, strict=True):
            if not record:
                gone.append(node_id)
                continue
            fields = {k.decode(): v.decode() for k, v in record.items()}
            registration = NodeRegistration.model_validate_json(fields["registration"])
            stats = fields.get("stats")
            nodes.append(
                NodePublic(
                    **registration.model_dump(),
                    status=fields["status"],
                    stats=NodeStats.model_validate_json(stats) if stats else None,
                    registered_at=float(fields["registered_at"]),
                    last_heartbeat=float(fields["last_heartbeat"]),
                )
            )
        if gone:  # expired: drop them from the index too
            await self.redis.srem(_NODES, *gone)
        return nodes

    # ---- requests ----

    async def record_request(self, request_id: str, state: str, **fields: object) -> None:
        now = time.time()
        key = _request_key(request_id)
        mapping = {"state": state, f"t_{state}": now, **{k: str(v) for k, v in fields.items()}}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, REQUEST_TTL_S)
            if state == "queued":
                pipe.zadd(_REQUESTS, {request_id: now})
                pipe.zremrangebyrank(_REQUESTS, 0, -MAX_RECENT_REQUESTS - 1)
                pipe.sadd(_RUNNING, request_id)
            elif state in TERMINAL_STATES:
                pipe.srem(_RUNNING, request_id)
            await pipe.execute()

    async def requests(self, limit: int = 100, running_only: bool = False) -> list[dict]:
        if running_only:
            ids = [m.decode() for m in await self.redis.smembers(_RUNNING)][:limit]
        else:
            ids = [m.decode() for m in await self.redis.zrevrange(_REQUESTS, 0, limit - 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(_request_key(request_id))
            records = await pipe.execute()
        return [
            {"request_id": rid, **{k.decode(): v.decode() for k, v in record.items()}}
            for rid, record in zip(ids, records, strict=True)
            if record
        ]

    # ---- API keys ----

    async def api_key_known(self, key: str) -> bool:
        return bool(await self.redis.sismember(_API_KEYS, key))

    async def has_api_keys(self) -> bool:
        return bool(await self.redis.scard(_API_KEYS))

    async def add_api_key(self, key: str) -> None:
        await self.redis.sadd(_API_KEYS, key)

    async def remove_api_key(self, key: str) -> bool:
        return bool(await self.redis.srem(_API_KEYS, key))
