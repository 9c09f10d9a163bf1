"""One generation through the fleet: reserve on a decode node, prefill, stream tokens.

The prompt is computed on a prefill node, which hands its KV to the decode node,
unless what the decode node's prefix cache does not hold of it is short (at most
``local_prefill_tokens``) or no prefill node can take it: then the decode node
computes it itself (its Reserve says ``prefill_here``), so a fleet without
prefill nodes is a colocated one, and one whose prefill nodes all died keeps
serving.

A request waits, in order, in its decode node's queue until slots free up (up to
``queue_timeout_s``); past that bound, or when ``max_queued`` requests of this
control plane already wait, it gets a 503 with Retry-After. Its caller learns
through ``admitted`` when it holds slots, so a streaming response starts only
then and never carries an error for a request that never ran.

A request whose KV hand-off fails before its first token is tried again on
other nodes (up to ``max_attempts``); so is one whose node dies then, but only
once per role: a request that was on two prefill nodes, or two decode nodes,
that died is failed, since it may be what killed them (one of each is two
faults, more likely unrelated). A request that a node failed for its own sake (it would fail
anywhere) is failed with the node's reason, not retried.

A request whose decode node dies, leaves the registry or is drained with
``--migrate`` (status "migrating") after its first token moves: another decode
node gets the prompt and every token streamed so far (``output_token_ids``),
recomputes them and goes on, counting them as output, so seeded sampling,
penalties and limits continue exactly and the client's stream goes on with no
token twice or missing. The same bounds hold (two deaths of one role,
``max_attempts`` failures on live nodes, ``queue_timeout_s`` to find room);
past them the stream ends with an error event.

Routing is cache-aware (``Fleet.pick``, ``PrefixIndex``): each node is charged
what its prefix cache does not hold of the prompt. A decode node's Reserved says
how many leading prompt tokens it holds; the prefill node sends only the rest.
The first token's event carries how many prompt tokens the computing node took
from its cache (the usage's ``cached_tokens``).

A node counts as failed when the registry loses it or marks it dead (no
heartbeat for the TTL, or a stuck serving loop) or a call to it times out. The
caller closing the stream aborts the request on both nodes.

Each request's timeline goes to Redis at its transitions: queued (waiting for a
decode node's reservation), prefilling (the prefill node has the prompt; its
``prefill_node`` is the decode node's id when that node computes it),
transferring (the prompt is computed; the last KV and the first token are on
their way to the decode node; not for a local prefill), decoding (first token
out), then finished, failed or aborted, with its nodes, token counts and
latencies.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from lightpd.common.wire.messages import TokenEvent
from lightpd.common.wire.prefix_blocks import block_hashes
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.fleet_schemas import NodePublic
from lightpd.controlplane.metrics import Metrics, RequestTimes
from lightpd.controlplane.node_client import NodeBusy, NodeClient, NodeRefused, NodeTimeout
from lightpd.controlplane.queue_shares import QueueShares
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import Store
from lightpd.controlplane.timeseries import Timeseries

logger = logging.getLogger(__name__)
LIVENESS_CHECK_S = 1.0
MAX_NODE_DEATHS = 2  # a request on this many nodes of one role that died is not tried again


class NoCapacityError(RuntimeError):
    """No ready node can take the request now (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRejected(ValueError):
    """A node refused the request itself, e.g. too long for its context (HTTP 400)."""


class NodeDown(RuntimeError):
    """The attempt failed with its node (``died``: the node itself is gone;
    ``drained``: it is alive but its requests move, ``--migrate``)."""

    def __init__(
        self, node: NodePublic, reason: str, died: bool = True, drained: bool = False
    ) -> None:
        super().__init__(f"{node.role} node {node.node_id} {reason}")
        self.node = node
        self.died = died
        self.drained = drained


class NodeBusyError(RuntimeError):
    def __init__(self, node: NodePublic, reason: str) -> None:
        super().__init__(reason)
        self.node = node


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        client: NodeClient,
        store: Store,
        metrics: Metrics,
        timeseries: Timeseries,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.client = client
        self.store = store
        self.metrics = metrics
        self.timeseries = timeseries
        # Requests of this control plane waiting for slots, shared by tenants.
        self.queue = QueueShares(settings.max_queued)

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        admitted: asyncio.Event | None = None,
        stopped_here: asyncio.Event | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Events of one request until the one that finishes it. ``admitted`` is set
        once a decode node holds slots for it. A caller that ends the request itself
        because it is complete (a stop string) sets ``stopped_here`` before closing
        this generator, so it counts as finished, not aborted."""
        started = time.monotonic()
        first_token_at: float | None = None
        num_tokens = 0
        state = "failed"
        reason = "error"  # the finish reason it ends with (stop, length, abort, error)
        admitted_at: float | None = None
        ended = False  # the event that ends the request went out
        error: str | None = None
        tried: set[str] = set()
        deaths = {"prefill": 0, "decode": 0}  # nodes that died while serving it, by role
        generated: list[int] = []  # every token streamed, whichever node made it
        admitted = admitted or asyncio.Event()
        queued = False

        def admit() -> None:
            nonlocal queued, admitted_at
            if queued:
                self.queue.give_back(params.tenant)
                queued = False
            if admitted_at is None:
                admitted_at = time.monotonic()
            admitted.set()

        self.timeseries.count("started")
        try:
            # The place in the queue is taken before any await, so a burst cannot
            # slip past the bound.
            if not self.queue.take(params.tenant, params.tenant_weight):
                raise NoCapacityError(
                    f"too many requests are waiting ({self.settings.max_queued}); try again later",
                    retry_after_s=5,
                )
            queued = True
            await self.store.record_request(
                request_id, "queued", prompt_tokens=len(prompt), max_tokens=params.max_new_tokens
            )
            deadline = time.monotonic() + self.settings.queue_timeout_s
            failures = 0  # attempts that failed on a live node (refusals, hand-offs)
            attempt = -1
            while failures < self.settings.max_attempts:
                attempt += 1  # node deaths are bounded by MAX_NODE_DEATHS instead
                resume = tuple(generated)
                try:
                    decode, prefill = await self._pick(
                        tried, prompt + list(resume), resume, params.cache_namespace
                    )
                except NoCapacityError as exc:
                    if not resume:
                        raise
                    error, ended = f"the request could not move to another node: {exc}", True
                    yield TokenEvent(request_id=request_id, finish_reason="error", error=error)
                    return
                try:
                    async for event in self._attempt(
                        request_id, attempt, prompt, params, prefill, decode, admit, deadline,
                        resume,
                    ):  # fmt: skip
                        if first_token_at is not None:
                            event.num_cached_tokens = 0  # reported with the first token only
                        if event.token_ids and first_token_at is None:
                            first_token_at = time.monotonic()
                            self.metrics.ttft.labels(self.settings.model_name).observe(
                                first_token_at - started
                            )
                            await self.store.record_request(
                                request_id, "decoding", ttft_s=first_token_at - started
                            )
                        num_tokens += len(event.token_ids)
                        generated += event.token_ids
                        self.timeseries.count("tokens", len(event.token_ids))
                        if event.finish_reason is not None:
                            state, error = _terminal_state(event)
                            reason = event.finish_reason
                            ended = True
                        yield event
                    return
                except NodeBusyError as exc:  # its queue is full: another node may have room
                    logger.info("request %s: %s", request_id, exc)
                    tried.add(exc.node.node_id)
                    failures += 1
                    continue
                except NodeDown as exc:
                    logger.warning("request %s: %s", request_id, exc)
                    tried.add(exc.node.node_id)
                    deaths[exc.node.role] += exc.died
                    failures += not exc.died and not exc.drained
                    if generated:  # it moves, with what it streamed so far
                        self.metrics.migrations.inc()
                        self.timeseries.count("migrated")
                        deadline = time.monotonic() + self.settings.queue_timeout_s
                    if deaths[exc.node.role] >= MAX_NODE_DEATHS:
                        error, ended = (
                            f"{exc}; {deaths[exc.node.role]} {exc.node.role} nodes died while "
                            "serving this request, so it is not tried again",
                            True,
                        )
                        yield TokenEvent(request_id=request_id, finish_reason="error", error=error)
                        return
            if admitted.is_set():  # it ran, and failed on every node it was sent to
                error, ended = (
                    f"no node could serve the request: {failures} attempts failed",
                    True,
                )
                yield TokenEvent(request_id=request_id, finish_reason="error", error=error)
                return
            raise NoCapacityError(f"no node could take the request: {failures} attempts failed")
        except (NoCapacityError, RequestRejected) as exc:
            error = str(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not ended:  # the caller left first: a stop string, or a disconnect
                stop = stopped_here is not None and stopped_here.is_set()
                state, reason = ("finished", "stop") if stop else ("aborted", "abort")
            raise
        finally:
            if queued:
                self.queue.give_back(params.tenant)
            elapsed = time.monotonic() - started
            ttft = None if first_token_at is None else first_token_at - started
            tpot = (
                (elapsed - ttft) / (num_tokens - 1) if ttft is not None and num_tokens > 1 else None
            )
            queue_s = None if admitted_at is None else admitted_at - started
            times = RequestTimes(elapsed, queue_s, ttft)
            self.metrics.finish(state, reason, times, len(prompt), num_tokens)
            self.timeseries.request_ended(state, ttft, tpot)
            latencies = {"e2e_s": elapsed, **({"tpot_s": tpot} if tpot is not None else {})}
            await asyncio.shield(
                self.store.record_request(
                    request_id, state, output_tokens=num_tokens, error=error or "", **latencies
                )
            )

    async def _pick(
        self,
        tried: set[str],
        tokens: list[int],
        resume: tuple[int, ...] = (),
        namespace: int = 0,
    ) -> tuple[NodePublic, NodePublic | None]:
        """A decode node and a prefill node for ``tokens`` (the prompt, and what a
        resumed request generated), each charged them in flight at once (the
        attempt gives them back), so a burst spreads before heartbeats catch up.
        No prefill node (None) when the decode node computes the prompt itself: the
        prompt is short, no prefill node can take it, or the request resumes."""
        overlap = None
        if self.settings.cache_aware_routing:
            hashes = block_hashes(tokens, namespace=namespace)  # the request's tenant's
            index = self.client.prefix_index
            held: dict[str, int] = {}  # by node: each is looked up once per request

            def overlap(node: NodePublic) -> int:
                if node.node_id not in held:
                    self.client.follow_cache(node.control_endpoint, node.node_id)
                    held[node.node_id] = index.overlap(node.control_endpoint, hashes)
                return held[node.node_id]

        decode = await self.fleet.pick("decode", tried, len(tokens), overlap)
        if decode is None:
            raise NoCapacityError("no ready decode node can take the request", 5)
        # What the decode node would compute itself: the part of the prompt its prefix
        # cache does not hold (a chat's next turn, a shared system prompt).
        uncached = len(tokens) - (overlap(decode) if overlap else 0)
        local = self.settings.local_prefill_tokens
        prefill = None
        if not resume and not (local > 0 and uncached <= local):
            prefill = await self.fleet.pick("prefill", tried, len(tokens), overlap)
        if overlap is not None:
            for node in (decode, prefill):
                if node is not None:
                    self.client.prefix_index.routed(node.control_endpoint, hashes)
        return decode, prefill

    async def _attempt(
        self,
        request_id: str,
        attempt: int,
        prompt: list[int],
        params: SamplingParams,
        prefill: NodePublic | None,
        decode: NodePublic,
        admit: Callable[[], None],
        deadline: float,
        resume: tuple[int, ...] = (),
    ) -> AsyncIterator[TokenEvent]:
        """One try; ``prefill`` None: the decode node computes the prompt itself (and
        the ``resume`` tokens after it, which the request generated elsewhere)."""
        # A new id per attempt, so late events of a failed attempt cannot mix in.
        attempt_id = f"{request_id}.{attempt}"
        nodes = [n for n in (prefill, decode) if n is not None]
        tokens = len(prompt) + len(resume)  # charged to each of them by _pick
        self.client.open_stream(attempt_id)
        finished = False
        reserving_at = time.time()  # a heartbeat after this may count the slots
        held_slots = 0  # the decode node's slots for this attempt, once it took them
        try:
            try:
                reserved = await self._watch(
                    self.client.reserve(
                        decode.control_endpoint,
                        attempt_id,
                        prompt,
                        params,
                        queue_timeout_s=max(0.0, deadline - time.monotonic()),
                        kv_timeout_s=self.settings.kv_timeout_s,
                        prefill_here=prefill is None,
                        output_token_ids=resume,
                    ),
                    decode,
                )
            except NodeBusy as exc:
                if time.monotonic() >= deadline:
                    raise NoCapacityError(
                        f"the request waited {self.settings.queue_timeout_s:g} s for a decode "
                        "node's KV slots; try again later",
                        retry_after_s=10,
                    ) from exc
                raise NodeBusyError(decode, str(exc)) from exc
            admit()
            await self.store.record_request(
                request_id,
                "prefilling",
                prefill_node=nodes[0].node_id,
                decode_node=decode.node_id,
                attempts=attempt + 1,
            )
            if prefill is not None:
                await self._watch(
                    self.client.prefill(
                        prefill.control_endpoint,
                        attempt_id,
                        prompt,
                        params,
                        reserved.target(),
                        ack_timeout_s=self.settings.kv_timeout_s,
                    ),
                    prefill,
                )
                # Only what the decode node's cache does not hold moves.
                moved = len(prompt) - reserved.num_cached_tokens
                self.metrics.kv_transfer_tokens.inc(moved)
                self.metrics.kv_transfer_bytes.inc(moved * reserved.layout.bytes_per_token)
            watched = list(nodes)
            before_first_token = True
            transferring = False
            async for event in self._events(attempt_id, watched):
                if (
                    prefill is not None
                    and before_first_token
                    and not (transferring or event.token_ids or event.finish_reason)
                ):
                    transferring = True  # the prefill node's word that the prompt is computed
                    await self.store.record_request(request_id, "transferring")
                if event.token_ids and before_first_token:
                    before_first_token = False
                    # The computing node's count (a prefill node's comes with the KV).
                    event.num_cached_tokens = min(event.num_cached_tokens, len(prompt))
                    self.metrics.cached_prompt_tokens.inc(event.num_cached_tokens)
                    if prefill is not None:
                        watched.remove(prefill)  # the prefill node's part is done
                    for node in nodes:
                        self.fleet.inflight_tokens[node.node_id] -= tokens
                    held_slots = tokens
                    self.fleet.admitted(decode.node_id, held_slots, reserving_at)
                    tokens = 0
                held_slots += len(event.token_ids)
                if event.finish_reason == "error" and event.retry:
                    # The node failed, not the request (a failed hand-off, a broken
                    # expert-parallel group): other nodes may succeed; a request that
                    # streamed tokens already moves with them.
                    raise NodeDown(decode, f"failed: {event.error}", died=False)
                event.request_id = request_id
                finished = event.finish_reason is not None
                yield event
        except NodeRefused as exc:
            raise RequestRejected(str(exc)) from exc
        finally:
            for node in nodes:
                self.fleet.inflight_tokens[node.node_id] -= tokens
            if held_slots:
                self.fleet.released(decode.node_id, held_slots)
            if not finished:
                await asyncio.shield(self._abort(attempt_id, *reversed(nodes)))
            self.client.close_stream(attempt_id)

    async def _abort(self, attempt_id: str, *nodes: NodePublic) -> None:
        for node in nodes:
            await self.client.abort(node.control_endpoint, attempt_id)

    async def _watch(self, call, node: NodePublic):
        """Await a call to ``node``, giving up if the registry loses the node meanwhile."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=LIVENESS_CHECK_S)
                if done:
                    return task.result()
                if not await self.fleet.is_alive(node.node_id):
                    raise NodeDown(node, "left the registry")
        except NodeTimeout as exc:
            raise NodeDown(node, f"did not answer: {exc}") from exc
        finally:
            task.cancel()

    async def _events(
        self, attempt_id: str, watched: list[NodePublic]
    ) -> AsyncIterator[TokenEvent]:
        """The attempt's events; NodeDown when a watched node goes silent and is dead
        or gone from the registry, or is drained with ``--migrate`` (checked once a
        LIVENESS_CHECK_S, also while events flow). Liveness is the node's (its
        heartbeats, and its serving loop going round), never one request's silence:
        a request queued or paused behind a large batch may wait long, and is not
        taken for a dead node's."""
        checked = time.monotonic()
        while True:
            event = await self.client.next_event(attempt_id, LIVENESS_CHECK_S)
            if event is not None:
                yield event
                if event.finish_reason is not None:
                    return
            if event is None or time.monotonic() - checked >= LIVENESS_CHECK_S:
                checked = time.monotonic()
                for node in watched:
                    status = await self.fleet.status(node.node_id)
                    if status == "migrating":
                        raise NodeDown(node, "is drained with --migrate", died=False, drained=True)
                    # A node streaming to us is alive, whatever a registry that missed its
                    # heartbeats (a Redis restart) says: only silence makes it dead.
                    if event is None and status in (None, "dead"):
                        raise NodeDown(node, "left the registry")


def _terminal_state(event: TokenEvent) -> tuple[str, str | None]:
    if event.finish_reason == "error":
        return "failed", event.error
    if event.finish_reason == "abort":
        return "aborted", None
    return "finished", None
