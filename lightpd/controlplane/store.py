"""Fleet state in Redis: the node registry, request states and API keys.

A node is a hash ``lightpd:node:{id}`` (registration, stats, status, times). A
node whose last heartbeat is older than ``node_ttl_s`` is dead: it is listed
with status "dead" (never routed to) until an admin removes it, and its record
expires ``DEAD_NODE_MEMORY_S`` after that heartbeat. Heartbeat ages are measured
on Redis's clock, so control planes with skewed clocks agree on who is dead. A
request is a hash written at each state transition, never per token, indexed by
time in ``lightpd:requests``.

Redis may go away for a while. Request-state writes never fail then: what Redis
misses is kept in memory, the latest state of each request (bounded), and
written once it answers again, so no stream ends for a lost write and no
request stays "running" in Redis after it ended. API keys that Redis confirmed
lately keep working. Everything else that needs Redis raises its error, which
the app answers with a 503 and Retry-After.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import get_args

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lightpd.controlplane.fleet_schemas import (
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
# API keys made in /admin/api-keys, as salted hashes: field = the key's id (a
# digest, to find its record), value = {"salt", "hash", "prefix", "created_at"}.
_API_KEYS = "lightpd:api_key_hashes"
_PLAIN_API_KEYS = "lightpd:api_keys"  # where versions before hashing kept them in the clear
API_KEY_PREFIX_CHARS = 7  # shown to tell keys apart ("sk-AbCd...")
REQUEST_TTL_S = 24 * 3600
MAX_RECENT_REQUESTS = 10_000
REMOVED_MEMORY_S = 3600
DEAD_NODE_MEMORY_S = 24 * 3600  # a dead node nobody removed is forgotten after a day
TERMINAL_STATES = ("finished", "failed", "aborted")
_STATES: tuple[str, ...] = get_args(RequestState)
_NUMBERS = ("prompt_tokens", "max_tokens", "output_tokens", "attempts", "ttft_s", "tpot_s", "e2e_s")
# Errors that mean Redis cannot be reached now (down, restarting, loading its data).
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_PENDING_REQUESTS = 100_000  # requests whose state waits in memory for Redis
PENDING_RETRY_S = 1.0  # how often the writes Redis missed are tried again
PENDING_BATCH = 1000  # requests per pipeline when they are
MAX_VERIFIED_KEYS = 10_000
VERIFIED_KEY_MEMORY_S = 600.0  # a key Redis confirmed this long ago still works while it is down

logger = logging.getLogger(__name__)


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


class Outage:
    """What this process has seen of Redis: whether it is down, since when, and when a
    call last failed. One log line when it goes, one when it answers again."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.last_failure = -math.inf

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> None:
        self.last_failure = time.monotonic()
        if self.down_since is None:
            self.down_since = self.last_failure
            logger.warning("Redis fails (%s); serving from memory until it answers again", exc)

    def recovered(self) -> None:
        if self.down_since is not None:
            logger.warning("Redis answers again after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None

    def failed_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_failure <= seconds


@dataclass
class _RequestUpdate:
    """Writes to one request's record, merged (later fields win); one state
    transition, or several that Redis has not seen yet."""

    fields: dict[str, str]
    queued_at: float | None = None  # it entered the index and the running set
    ended: bool = False  # it left the running set
    restarted: bool = False  # a retry began: an earlier transfer is void

    def then(self, later: "_RequestUpdate") -> "_RequestUpdate":
        fields = dict(self.fields)
        if later.restarted:
            fields.pop("t_transferring", None)
        return _RequestUpdate(
            fields=fields | later.fields,
            queued_at=self.queued_at if later.queued_at is None else later.queued_at,
            ended=self.ended or later.ended,
            restarted=self.restarted or later.restarted,
        )


class _RequestWrites:
    """Request states on their way to Redis; what it misses waits here until it is back.

    At most ``max_pending`` requests wait (their latest state each); when full, the
    one updated longest ago is dropped, with a log line. A request with a write
    waiting or in flight gets its next one merged in, never sent beside it, so
    Redis sees each request's states in order. A task writes what waits, once a
    second, while anything does.
    """

    def __init__(self, client: redis.Redis, outage: Outage, max_pending: int) -> None:
        self.redis = client
        self.outage = outage
        self.max_pending = max_pending
        self.pending: OrderedDict[str, _RequestUpdate] = OrderedDict()
        self._writing: set[str] = set()
        self._retry: asyncio.Task | None = None
        self.num_dropped = 0

    async def record(self, request_id: str, update: _RequestUpdate) -> None:
        if self.outage.down or request_id in self.pending or request_id in self._writing:
            self._keep(request_id, update)
        else:
            await self._write({request_id: update})

    async def _write(self, batch: dict[str, _RequestUpdate]) -> bool:
        """Send ``batch`` in one pipeline; what does not arrive waits (False)."""
        self._writing.update(batch)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, update in batch.items():
                    _queue_update(pipe, request_id, update)
                if any(update.queued_at is not None for update in batch.values()):
                    pipe.zremrangebyrank(_REQUESTS, 0, -MAX_RECENT_REQUESTS - 1)
                await pipe.execute()
        except BaseException as exc:  # cancelled too: it may not have arrived
            for request_id, update in batch.items():
                self._keep(request_id, update, older=True)
            if not isinstance(exc, RedisError | OSError):
                raise
            self.outage.failed(exc)  # unreachable, or refusing writes (a full disk)
            return False
        finally:
            self._writing.difference_update(batch)
        self.outage.recovered()
        return True

    def _keep(self, request_id: str, update: _RequestUpdate, older: bool = False) -> None:
        held = self.pending.pop(request_id, None)
        if held is not None:
            update = update.then(held) if older else held.then(update)
        self.pending[request_id] = update
        if len(self.pending) > self.max_pending:
            dropped, _ = self.pending.popitem(last=False)
            if not self.num_dropped:
                logger.warning(
                    "%d request states wait for Redis, the most kept: dropping the oldest "
                    "(first: %s); Redis will not learn how those requests went on",
                    self.max_pending,
                    dropped,
                )
            self.num_dropped += 1
        if self._retry is None or self._retry.done():
            self._retry = asyncio.get_running_loop().create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self.pending:
            await asyncio.sleep(PENDING_RETRY_S)
            while batch := self._take(PENDING_BATCH):
                if not await self._write(batch):
                    break
        if self.num_dropped:
            logger.warning(
                "request states written; %d were dropped while Redis was away", self.num_dropped
            )
            self.num_dropped = 0

    def _take(self, limit: int) -> dict[str, _RequestUpdate]:
        ids = list(islice((rid for rid in self.pending if rid not in self._writing), limit))
        return {rid: self.pending.pop(rid) for rid in ids}


def _queue_update(pipe: redis.client.Pipeline, request_id: str, update: _RequestUpdate) -> None:
    key = _request_key(request_id)
    if update.restarted:
        pipe.hdel(key, "t_transferring")
    pipe.hset(key, mapping=update.fields)
    pipe.expire(key, REQUEST_TTL_S)
    if update.queued_at is not None:
        pipe.zadd(_REQUESTS, {request_id: update.queued_at})
        pipe.sadd(_RUNNING, request_id)
    if update.ended:
        pipe.srem(_RUNNING, request_id)


class _VerifiedKeys:
    """API keys that Redis confirmed lately (their SHA-256), so that they keep working
    while it is down: the latest ``MAX_VERIFIED_KEYS``, for ``VERIFIED_KEY_MEMORY_S``."""

    def __init__(self) -> None:
        self._confirmed_at: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> None:
        digest = _digest(key)
        self._confirmed_at.pop(digest, None)
        self._confirmed_at[digest] = time.monotonic()
        if len(self._confirmed_at) > MAX_VERIFIED_KEYS:
            self._confirmed_at.popitem(last=False)

    def discard(self, key: str) -> None:
        self._confirmed_at.pop(_digest(key), None)

    def __contains__(self, key: str) -> bool:
        confirmed_at = self._confirmed_at.get(_digest(key))
        return confirmed_at is not None and time.monotonic() - confirmed_at <= VERIFIED_KEY_MEMORY_S


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_id(key: str) -> str:
    """The id of a key's record: a digest (keys are random, so it reveals nothing)."""
    return _digest(key)[:24]


def _key_record(key: str) -> str:
    salt = secrets.token_hex(16)
    return json.dumps(
        {
            "salt": salt,
            "hash": _salted(salt, key),
            "prefix": key[:API_KEY_PREFIX_CHARS],
            "created_at": time.time(),
        }
    )


def _salted(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def _record_matches(record: bytes | None, key: str) -> bool:
    if record is None:
        return False
    try:
        fields = json.loads(record)
        return hmac.compare_digest(_salted(fields["salt"], key), fields["hash"])
    except (ValueError, KeyError, TypeError):
        return False


class Store:
    def __init__(
        self,
        client: redis.Redis,
        node_ttl_s: float,
        node_stall_s: float = 30.0,
        max_pending_requests: int = MAX_PENDING_REQUESTS,
    ) -> None:
        self.redis = client
        self.node_ttl_s = node_ttl_s
        self.node_stall_s = node_stall_s
        self.outage = Outage()
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._request_writes = _RequestWrites(client, self.outage, max_pending_requests)
        self._verified_keys = _VerifiedKeys()
        self._has_api_keys: bool | None = None  # Redis's last answer
        # This control plane, in each request it takes (instance_lease.py).
        self.instance_id = secrets.token_hex(8)

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
        """Write a request's new state. Never raises for Redis: a state it misses waits
        in memory and is written once it is back, so a stream never ends for it."""
        now = time.time()
        update = _RequestUpdate(
            fields={
                "state": state,
                f"t_{state}": str(now),
                **({"instance": self.instance_id} if state == "queued" else {}),
                **{k: str(v) for k, v in fields.items()},
            },
            queued_at=now if state == "queued" else None,
            ended=state in TERMINAL_STATES,
            restarted=state == "prefilling",  # a retry starts over: its earlier transfer is void
        )
        await self._request_writes.record(request_id, update)

    @property
    def num_pending_requests(self) -> int:
        """Requests whose latest state waits in memory for Redis."""
        return len(self._request_writes.pending)

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

    async def running_owners(self) -> list[tuple[str, str | None]]:
        """Each running request and the control plane instance that took it."""
        running = [m.decode() for m in await self.redis.smembers(_RUNNING)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in running:
                pipe.hget(_request_key(request_id), "instance")
            owners = await pipe.execute()
        return [(rid, o.decode() if o else None) for rid, o in zip(running, owners, strict=True)]

    async def num_running(self) -> int:
        return await self.redis.scard(_RUNNING)

    # ---- API keys ----

    async def api_key_known(self, key: str) -> bool:
        """Whether ``key`` was made in /admin/api-keys. While Redis is down, a key it
        confirmed lately still is; asking about any other raises Redis's error."""
        if self.outage.down and key in self._verified_keys:
            return True
        try:
            known = _record_matches(await self.redis.hget(_API_KEYS, api_key_id(key)), key)
        except REDIS_DOWN as exc:
            self.outage.failed(exc)
            if key in self._verified_keys:
                return True
            raise
        self.outage.recovered()
        if known:
            self._verified_keys.add(key)
        else:
            self._verified_keys.discard(key)
        return known

    async def has_api_keys(self) -> bool:
        """Whether any key was made in /admin/api-keys; Redis's last answer while it is
        down (raises if there was none)."""
        if self.outage.down and self._has_api_keys is not None:
            return self._has_api_keys
        try:
            self._has_api_keys = bool(await self.redis.hlen(_API_KEYS))
        except REDIS_DOWN as exc:
            self.outage.failed(exc)
            if self._has_api_keys is None:
                raise
        else:
            self.outage.recovered()
        return self._has_api_keys

    async def add_api_key(self, key: str) -> str:
        """Keep ``key`` as a salted hash; returns its id."""
        key_id = api_key_id(key)
        await self.redis.hset(_API_KEYS, key_id, _key_record(key))
        self._has_api_keys = True
        return key_id

    async def remove_api_key(self, key_or_id: str) -> bool:
        """Forget a key, given whole or by its id."""
        self._verified_keys.discard(key_or_id)
        removed = await self.redis.hdel(_API_KEYS, key_or_id, api_key_id(key_or_id))
        return bool(removed)

    async def api_keys(self) -> list[dict]:
        """Each key's id, prefix and creation time: never the key or its hash."""
        listed = []
        for key_id, record in (await self.redis.hgetall(_API_KEYS)).items():
            fields = json.loads(record)
            listed.append(
                {
                    "id": key_id.decode(),
                    "prefix": fields["prefix"],
                    "created_at": fields["created_at"],
                }
            )
        return sorted(listed, key=lambda k: k["created_at"])

    async def hash_plain_api_keys(self) -> int:
        """Move keys an older version kept in the clear to salted hashes, then have
        Redis rewrite its append-only file, so no plain key stays on disk. Returns
        how many moved."""
        plain = [k.decode() for k in await self.redis.smembers(_PLAIN_API_KEYS)]
        if not plain:
            return 0
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in plain:
                pipe.hset(_API_KEYS, api_key_id(key), _key_record(key))
            pipe.delete(_PLAIN_API_KEYS)
            await pipe.execute()
        with contextlib.suppress(RedisError):  # not Redis: nothing on our disk to rewrite
            await self.redis.bgrewriteaof()
        return len(plain)
