"""Routing over the registry: which decode and which prefill node take a request.

The registry is read from Redis at most every ``refresh_s`` and shared by all
requests of this process. Decode nodes are ranked by free KV slots, prefill
nodes by queued prompt tokens, both net of the work this process has sent them
since their last heartbeat counted it. A decode node's slots are also net of
what its last heartbeat cannot show yet (``unheard``): a request admitted, or
one that ended and freed its slots, since then. Without that, a chat's next
turn, sent as soon as the last reply ends, finds the node holding the chat
still charged for that reply and goes elsewhere. Draining and dead nodes get
nothing new.

Cache-aware: a request's ``overlap`` with a node (the tokens of its prompt that
node's prefix cache holds, from ``PrefixIndex``) counts as work the node need
not do. A prefill node that holds the longest part takes the request unless its
queue is ``balance_tokens`` longer than the shortest (the compute saved is worth
a wait); otherwise, and for decode nodes always, by load, where the cached part
counts (a decode node needs no slots, and no transfer, for it): among decode
nodes of like load the holder wins, but identical prefixes (a shared system
prompt) do not pile every request onto one decode node.

While Redis is down the last registry read serves on. When it is back, nodes whose
heartbeats could not reach it meanwhile are listed as dead (or, if it lost its
data, not at all) until they register again, a second or two later; for
``node_ttl_s`` after the last failed Redis call, such a node keeps its place
here, so that its running requests are not taken for lost.
"""

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

from lightpd.controlplane.fleet_schemas import NodePublic, NodeRole
from lightpd.controlplane.store import REDIS_DOWN, Store


class Fleet:
    def __init__(
        self,
        store: Store,
        model_fingerprint: str,
        refresh_s: float = 0.25,
        balance_tokens: int = 8192,
        unheard_max_s: float = 3.0,
    ) -> None:
        self.store = store
        self.balance_tokens = balance_tokens
        self.model_fingerprint = model_fingerprint
        self.refresh_s = refresh_s
        self._nodes: dict[str, NodePublic] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self.inflight_tokens: Counter[str] = Counter()
        # By decode node: (when, slots) its last heartbeat may not count.
        self._unheard: defaultdict[str, list[tuple[float, int]]] = defaultdict(list)
        self.unheard_max_s = unheard_max_s

    async def nodes(self, max_age_s: float | None = None) -> list[NodePublic]:
        """The registry as read at most ``max_age_s`` (default ``refresh_s``) ago."""
        max_age_s = self.refresh_s if max_age_s is None else max_age_s
        if self.store.outage.down:  # no asking again before refresh_s, however urgent
            max_age_s = max(max_age_s, self.refresh_s)
        async with self._lock:
            if time.monotonic() - self._fetched_at > max_age_s:
                try:
                    nodes = await self.store.nodes()
                except REDIS_DOWN as exc:
                    self.store.outage.failed(exc)
                else:
                    self.store.outage.recovered()
                    self._nodes = self._after_outage(nodes)
                    for gone in self._unheard.keys() - self._nodes.keys():
                        del self._unheard[gone]
                self._fetched_at = time.monotonic()
        return list(self._nodes.values())

    def _after_outage(self, nodes: list[NodePublic]) -> dict[str, NodePublic]:
        """``nodes`` as read, except that right after an outage a node that was alive
        and now reads dead or gone keeps its last entry (see the module's note)."""
        read = {n.node_id: n for n in nodes}
        if not self.store.outage.failed_within(self.store.node_ttl_s):
            return read
        for node_id, node in self._nodes.items():
            lapsed = node_id not in read or read[node_id].status == "dead"
            if lapsed and node.status != "dead":
                read[node_id] = node
        return read

    def cached_nodes(self) -> list[NodePublic]:
        return list(self._nodes.values())

    async def is_alive(self, node_id: str) -> bool:
        """Whether the node is in the registry and not dead (heartbeats lapsed)."""
        status = await self.status(node_id)
        return status is not None and status != "dead"

    async def status(self, node_id: str) -> str | None:
        """The node's status in the registry (cached briefly); None once it is gone."""
        await self.nodes()
        node = self._nodes.get(node_id)
        return None if node is None else node.status

    async def ready_counts(self) -> dict[str, int]:
        """Ready nodes by role."""
        ready = await self._ready(lambda n: True)
        return {role: sum(n.role == role for n in ready) for role in ("prefill", "decode")}

    async def servable(self) -> bool:
        """Whether a request can be served now: a ready decode node (it prefills
        itself when no prefill node can take the prompt)."""
        return (await self.ready_counts())["decode"] > 0

    async def max_model_len(self) -> int | None:
        """The context every ready node can serve, or None when no node is ready."""
        ready = await self._ready(lambda n: True)
        return min((n.max_model_len for n in ready), default=None)

    async def pick(
        self,
        role: NodeRole,
        exclude: set[str],
        charge: "Charge | None" = None,
        overlap: Callable[[NodePublic], int] | None = None,
    ) -> NodePublic | None:
        """The best ready node of ``role``, added to ``charge`` in the same step (no
        await between choosing and charging), so concurrent picks see each other.
        ``overlap``: how many of the charge's tokens a node's prefix cache holds."""
        candidates = await self._ready(lambda n: n.role == role and n.node_id not in exclude)
        if not candidates:
            return None
        tokens = 0 if charge is None else charge.tokens
        score = self._score_decode if role == "decode" else self._score_prefill
        held = {n.node_id: overlap(n) if overlap else 0 for n in candidates}
        scores = {n.node_id: score(n, tokens, held[n.node_id]) for n in candidates}
        node = max(candidates, key=lambda n: scores[n.node_id])
        most = max(held.values())
        if most > 0 and role == "prefill":
            holders = [n for n in candidates if held[n.node_id] == most]
            holder = max(holders, key=lambda n: scores[n.node_id])
            if not self._overloaded(holder, scores, tokens - most):
                node = holder
        if charge is not None:
            charge.add(node)
        return node

    @contextlib.contextmanager
    def charge(self, tokens: int) -> Iterator["Charge"]:
        """Charge the nodes ``pick`` chooses with ``tokens`` (a prompt) in flight,
        until the attempt's first token (``Charge.settled``) or its end; see
        ``Charge``."""
        charge = Charge(self, tokens)
        try:
            yield charge
        finally:
            charge.close()

    def _admitted(self, node_id: str, slots: int, since: float) -> None:
        """A decode node took ``slots`` at ``since`` (wall clock): until a heartbeat
        after that, its stats may not show them."""
        self._unheard[node_id].append((since, slots))

    def _released(self, node_id: str, slots: int) -> None:
        """A decode node freed ``slots`` just now: until a heartbeat after this, its
        stats may still count them. (Admitted and released between two heartbeats,
        the two entries cancel out, as the stats never showed the slots.)"""
        self._unheard[node_id].append((time.time(), -slots))

    def unheard(self, node: NodePublic) -> int:
        """Slots in use on a decode node that its last heartbeat does not show (less
        those it still shows but are free); what is older than the heartbeat, or
        than ``unheard_max_s``, is dropped."""
        entries = self._unheard.get(node.node_id)
        if not entries:
            return 0
        oldest = max(node.last_heartbeat, time.time() - self.unheard_max_s)
        entries[:] = [(when, slots) for when, slots in entries if when >= oldest]
        return sum(slots for _, slots in entries)

    async def _ready(self, wanted: Callable[[NodePublic], bool]) -> list[NodePublic]:
        """Ready nodes that are ``wanted``; when none, the registry is read afresh once,
        so a node that joined since the last read is not missed."""
        for max_age_s in (None, 0.0):
            nodes = [n for n in await self.nodes(max_age_s) if n.status == "ready" and wanted(n)]
            if nodes:
                return nodes
        return []

    def _overloaded(self, node: NodePublic, scores: dict[str, float], uncached: int) -> bool:
        """Whether prefill node ``node`` should not take a request for its cache's
        sake: its queue (the score less this request's part) against the shortest."""
        queue = -scores[node.node_id] - uncached
        shortest = min(-score for score in scores.values()) - uncached
        return queue > shortest + self.balance_tokens

    def _score_decode(self, node: NodePublic, tokens: int, held: int) -> float:
        # Free slots net of the reservations queued there (from every control
        # plane, as of the last heartbeat) and of this process's since, and of the
        # slots this request would take there.
        if node.stats is None:
            free = node.num_slots
        else:
            free = node.stats.num_free_slots - node.stats.num_queued_tokens
        free -= self.inflight_tokens[node.node_id] + self.unheard(node)
        return free - (tokens - held)

    def _score_prefill(self, node: NodePublic, tokens: int, held: int) -> float:
        # Prompt tokens it would compute before this one's last, this one's included.
        queued = node.stats.num_queued_tokens if node.stats else 0
        return -(queued + self.inflight_tokens[node.node_id] + tokens - held)


class Charge:
    """What one attempt of a request costs the nodes it was placed on, as routing
    counts it until their heartbeats do (``Fleet.charge`` makes one).

    From the pick to the first token, the prompt's tokens are in flight on each
    node (``inflight_tokens``): a burst spreads before any heartbeat shows it.
    From then on a decode node's heartbeats count the slots, but the last one
    may predate them: ``settled`` notes them as unheard since the pick, and
    ``close`` notes them (and the tokens generated, ``grew``) as freed, so a
    chat's next turn, sent as soon as the reply ends, still finds its node
    free. Closing is idempotent."""

    def __init__(self, fleet: Fleet, tokens: int) -> None:
        self.fleet = fleet
        self.tokens = tokens
        self.nodes: list[NodePublic] = []
        self.since = time.time()  # a heartbeat after this may count the slots
        self._in_flight = True
        self._slots = 0  # a decode node's, once settled

    def add(self, node: NodePublic) -> None:
        self.nodes.append(node)
        self.fleet.inflight_tokens[node.node_id] += self.tokens

    def settled(self) -> None:
        """The first token: the prompt is computed, its slots held on the decode node."""
        if not self._in_flight:
            return
        self._in_flight = False
        for node in self.nodes:
            self.fleet.inflight_tokens[node.node_id] -= self.tokens
            if node.role == "decode":
                self._slots = self.tokens
                self.fleet._admitted(node.node_id, self.tokens, self.since)

    def grew(self, tokens: int) -> None:
        """The decode node holds ``tokens`` more (generated)."""
        if self._slots:
            self._slots += tokens

    def close(self) -> None:
        """The attempt ended: nothing is in flight, and its slots are free."""
        if self._in_flight:
            self._in_flight = False
            for node in self.nodes:
                self.fleet.inflight_tokens[node.node_id] -= self.tokens
        for node in self.nodes:
            if node.role == "decode" and self._slots:
                self.fleet._released(node.node_id, self._slots)
        self._slots = 0
