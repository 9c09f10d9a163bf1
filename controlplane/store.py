"""Fleet state in Redis: the node registry, request states and API keys.

A node is a hash ``lightpd:node:{id}`` (registration, stats, status, times). A
node whose last heartbeat is older than ``node_ttl_s`` is dead: it is listed
with status "dead" (never routed to) until an admin removes it, and its record
expires ``DEAD_NODE_MEMORY_S`` after that heartbeat. Heartbeat ages are measured
on Redis's clock, so control planes with skewed clocks agree on who is dead. A
request is a hash written at each state transition, never per token, indexed by
time in ``lightpd:requests``.
"""

import hashlib
import time
from typing import get_args

import redis.asyncio as redis

from controlplane.schemas import (
    NodePublic,
    NodeRegistration,
    NodeStats,
    RequestPublic,
    RequestState,
    TimelineStep,
)

_NODES = "lightpd:nodes"
_REQUESTS = "lightpd:requests"
_RUNNING = "lightpd:requests:running"
_API_KEYS = "lightpd:api_keys"
REQUEST_TTL_S = 24 * 3600
MAX_RECENT_REQUESTS = 10_000
REMOVED_MEMORY_S = 3600
DEAD_NODE_MEMORY_S = 24 * 3600  # a dead node nobody removed is forgotten after a day
TERMINAL_STATES = ("finished", "failed", "aborted")
_STATES: tuple[str, ...] = get_args(RequestState)
_NUMBERS = ("prompt_tokens", "max_tokens", "output_tokens", "attempts", "ttft_s", "tpot_s", "e2e_s")


# Refresh a live node's stats atomically; a node that is gone, or already dead, is
# answered nil so that it registers again (the dispatcher has given up on it). Only
# the session that registered the node may refresh it ("conflict" otherwise).
_HEARTBEAT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local node = redis.call('HMGET', KEYS[1], 'status', 'last_heartbeat', 'session')
if not node[1] or now - tonumber(node[2]) > tonumber(ARGV[1]) then
  return false
end
if (node[3] or '') ~= ARGV[4] then
  return 'conflict'
end
redis.call('HSET', KEYS[1], 'stats', ARGV[2], 'last_heartbeat', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return node[1]
"""


def _session_hash(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest() if session else ""


def _node_key(node_id: str) -> str:
    return f"lightpd:node:{node_id}"


def _removed_key(node_id: str) -> str:
    return f"lightpd:removed:{node_id}"


def _request_key(request_id: str) -> str:
    return f"lightpd:request:{request_id}"


def _request_public(request_id: str, fields: dict[str, str]) -> RequestPublic:
    """A request's hash (strings, one ``t_{state}`` per state reached) as typed fields."""
    timeline = sorted(
        (
            TimelineStep(state=state, at=float(fields[f"t_{state}"]))
            for state in _STATES
            if f"t_{state}" in fields
        ),
        key=lambda step: step.at,
    )
    numbers = {k: fields[k] for k in _NUMBERS if fields.get(k)}
    nodes = {k: fields[k] for k in ("prefill_node", "decode_node") if fields.get(k)}
    return RequestPublic(
        request_id=request_id,
        state=fields["state"],
        timeline=timeline,
        error=fields.get("error") or None,
        **numbers,
        **nodes,
    )


class Store:
    def __init__(self, client: redis.Redis, node_ttl_s: float, node_stall_s: float = 30.0) -> None:
        self.redis = client
        self.node_ttl_s = node_ttl_s
        self.node_stall_s = node_stall_s
        self._heartbeat = client.register_script(_HEARTBEAT)

    async def now(self) -> float:
        """Redis's clock, the one node heartbeats are stamped with."""
        seconds, micros = await self.redis.time()
        return seconds + micros / 1e6

    # ---- nodes ----

    async def register(self, registration: NodeRegistration, session: str = "") -> bool:
        """Register (or re-register) a node. False, and nothing written, when a live
        node of that id registered under another session: ids cannot be taken over."""
        now = await self.now()
        key = _node_key(registration.node_id)
        held = await self.redis.hmget(key, "session", "last_heartbeat")
        live = held[1] is not None and now - float(held[1]) <= self.node_ttl_s
        if live and (held[0] or b"").decode() != _session_hash(session):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key, _removed_key(registration.node_id))
            pipe.hset(
                key,
                mapping={
                    "registration": registration.model_dump_json(),
                    "status": "ready",
                    "registered_at": now,
                    "last_heartbeat": now,
                    "session": _session_hash(session),
                },
            )
            pipe.expire(key, DEAD_NODE_MEMORY_S)
            pipe.sadd(_NODES, registration.node_id)
            await pipe.execute()
        return True

    async def heartbeat(self, node_id: str, stats: NodeStats, session: str = "") -> str | None:
        """Store fresh stats; returns the node's status, "conflict" if another session
        holds the node id, or None if it is not registered (removed, or dead: its
        heartbeats lapsed, so it must register again)."""
        status = await self._heartbeat(
            keys=[_node_key(node_id)],
            args=[
                self.node_ttl_s,
                stats.model_dump_json(),
                DEAD_NODE_MEMORY_S,
                _session_hash(session),
            ],
        )
        return None if status is None else status.decode()

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
        """Every node, dead ones included (status "dead"), sorted by id."""
        ids = sorted(m.decode() for m in await self.redis.smembers(_NODES))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for node_id in ids:
                pipe.hgetall(_node_key(node_id))
            (seconds, micros), *records = await pipe.execute()
        now = seconds + micros / 1e6
        nodes, gone = [], []
        for node_id, record in zip(ids, records, strict=True):
            if not record:
                gone.append(node_id)
                continue
            fields = {k.decode(): v.decode() for k, v in record.items()}
            registration = NodeRegistration.model_validate_json(fields["registration"])
            stats = NodeStats.model_validate_json(fields["stats"]) if "stats" in fields else None
            last_heartbeat = float(fields["last_heartbeat"])
            # A node whose serving loop stopped going round is as dead as a silent one.
            stalled = stats is not None and stats.loop_age_s > self.node_stall_s
            dead = stalled or now - last_heartbeat > self.node_ttl_s
            nodes.append(
                NodePublic(
                    **registration.model_dump(),
                    status="dead" if dead else fields["status"],
                    stats=stats,
                    registered_at=float(fields["registered_at"]),
                    last_heartbeat=last_heartbeat,
                )
            )
        if gone:  # forgotten: drop them from the index too
            await self.redis.srem(_NODES, *gone)
        return nodes

    # ---- requests ----

    async def record_request(self, request_id: str, state: str, **fields: object) -> None:
        now = time.time()
        key = _request_key(request_id)
        mapping = {"state": state, f"t_{state}": now, **{k: str(v) for k, v in fields.items()}}
        async with self.redis.pipeline(transaction=False) as pipe:
            if state == "prefilling":  # a retry starts over: its earlier transfer is void
                pipe.hdel(key, "t_transferring")
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, REQUEST_TTL_S)
            if state == "queued":
                pipe.zadd(_REQUESTS, {request_id: now})
                pipe.zremrangebyrank(_REQUESTS, 0, -MAX_RECENT_REQUESTS - 1)
                pipe.sadd(_RUNNING, request_id)
            elif state in TERMINAL_STATES:
                pipe.srem(_RUNNING, request_id)
            await pipe.execute()

    async def requests(self, limit: int = 100, running_only: bool = False) -> list[RequestPublic]:
        """The latest requests first; with ``running_only``, those not yet ended."""
        if running_only:
            running = [m.decode() for m in await self.redis.smembers(_RUNNING)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id in running:
                    pipe.zscore(_REQUESTS, request_id)
                queued_at = await pipe.execute()
            latest = sorted(zip(queued_at, running, strict=True), key=lambda p: -(p[0] or 0))
            ids = [request_id for _, request_id in latest[:limit]]
        else:
            ids = [m.decode() for m in await self.redis.zrevrange(_REQUESTS, 0, limit - 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(_request_key(request_id))
            records = await pipe.execute()
        return [
            _request_public(rid, {k.decode(): v.decode() for k, v in record.items()})
            for rid, record in zip(ids, records, strict=True)
            if record
        ]

    async def num_running(self) -> int:
        return await self.redis.scard(_RUNNING)

    # ---- API keys ----

    async def api_key_known(self, key: str) -> bool:
        return bool(await self.redis.sismember(_API_KEYS, key))

    async def has_api_keys(self) -> bool:
        return bool(await self.redis.scard(_API_KEYS))

    async def add_api_key(self, key: str) -> None:
        await self.redis.sadd(_API_KEYS, key)

    async def remove_api_key(self, key: str) -> bool:
        return bool(await self.redis.srem(_API_KEYS, key))
