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

Its parts: ``RequestLife`` (request_life.py) holds what one request's attempts
learn and writes its ending once; an ``Attempt`` (attempt.py) is one placement,
reserve, prefill and stream; ``Fleet.charge`` counts an attempt's tokens on its
nodes until their heartbeats do.

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
from lightpd.controlplane.attempt import (
    Attempt,
    NoCapacityError,
    NodeBusyError,
    NodeDown,
    RequestRejected,
)
from lightpd.controlplane.fleet import Charge, Fleet
from lightpd.controlplane.fleet_schemas import NodePublic
from lightpd.controlplane.metrics import Metrics
from lightpd.controlplane.node_client import NodeClient
from lightpd.controlplane.queue_shares import QueueShares
from lightpd.controlplane.request_life import RequestLife
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import Store
from lightpd.controlplane.timeseries import Timeseries

logger = logging.getLogger(__name__)
__all__ = ["Dispatcher", "NoCapacityError", "RequestRejected"]


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
        life = RequestLife(
            request_id,
            len(prompt),
            self.metrics,
            self.timeseries,
            self.store,
            self.settings.model_name,
        )
        admitted = admitted or asyncio.Event()
        self.timeseries.count("started")
        try:
            # The place in the queue is taken before any await, so a burst cannot
            # slip past the bound.
            with self.queue.place(params.tenant, params.tenant_weight) as place:
                if place is None:
                    raise NoCapacityError(
                        f"too many requests are waiting ({self.settings.max_queued}); "
                        "try again later",
                        retry_after_s=5,
                    )

                def admit() -> None:
                    place.leave()
                    life.admitted()
                    admitted.set()

                await self.store.record_request(
                    request_id,
                    "queued",
                    prompt_tokens=len(prompt),
                    max_tokens=params.max_new_tokens,
                )
                async for event in self._serve(life, prompt, params, admit):
                    yield event
                if not life.ended and not admitted.is_set():
                    raise NoCapacityError(
                        f"no node could take the request: {life.failures} attempts failed"
                    )
        except (NoCapacityError, RequestRejected) as exc:
            life.error = str(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            life.left(stopped_here is not None and stopped_here.is_set())
            raise
        finally:
            await asyncio.shield(life.finish())

    async def _serve(
        self,
        life: RequestLife,
        prompt: list[int],
        params: SamplingParams,
        admit: Callable[[], None],
    ) -> AsyncIterator[TokenEvent]:
        """Attempts until one ends the request, within the bounds of the module's
        note; a request that ran and failed everywhere ends with an error event.
        Nothing comes out when no node could take it at all."""
        deadline = time.monotonic() + self.settings.queue_timeout_s
        number = -1
        while life.failures < self.settings.max_attempts:
            number += 1  # node deaths are bounded by MAX_NODE_DEATHS instead
            resume = tuple(life.generated)
            with self.fleet.charge(len(prompt) + len(resume)) as charge:
                try:
                    decode, prefill = await self._pick(life, prompt, resume, params, charge)
                except NoCapacityError as exc:
                    if not resume:
                        raise
                    yield life.failed(f"the request could not move to another node: {exc}")
                    return
                attempt = Attempt(
                    self.settings,
                    self.fleet,
                    self.client,
                    self.store,
                    self.metrics,
                    life.request_id,
                    number,
                    charge,
                )
                events = attempt.run(prompt, params, decode, prefill, admit, deadline, resume)
                try:
                    async for event in events:
                        await life.streamed(event)
                        yield event
                    return
                except NodeBusyError as exc:  # its queue is full: another node may have room
                    logger.info("request %s: %s", life.request_id, exc)
                    life.busy(exc.node.node_id)
                except NodeDown as exc:
                    logger.warning("request %s: %s", life.request_id, exc)
                    node = exc.node
                    if not life.lost(node.node_id, node.role, exc.died, exc.drained):
                        yield life.failed(
                            f"{exc}; {life.deaths[node.role]} {node.role} nodes died while "
                            "serving this request, so it is not tried again"
                        )
                        return
                    if life.generated:  # it moves: the wait for room starts again
                        deadline = time.monotonic() + self.settings.queue_timeout_s
        if life.admitted_at is not None:  # it ran, and failed on every node it was sent to
            yield life.failed(f"no node could serve the request: {life.failures} attempts failed")

    async def _pick(
        self,
        life: RequestLife,
        prompt: list[int],
        resume: tuple[int, ...],
        params: SamplingParams,
        charge: Charge,
    ) -> tuple[NodePublic, NodePublic | None]:
        """A decode node and a prefill node for the prompt (and what a resumed
        request generated), each added to ``charge`` at once, so a burst spreads
        before heartbeats catch up. No prefill node (None) when the decode node
        computes the prompt itself: the prompt is short, no prefill node can take
        it, or the request resumes."""
        tokens = prompt + list(resume)
        overlap = None
        if self.settings.cache_aware_routing:
            hashes = block_hashes(tokens, namespace=params.cache_namespace)  # its tenant's
            index = self.client.prefix_index
            held: dict[str, int] = {}  # by node: each is looked up once per request

            def overlap(node: NodePublic) -> int:
                if node.node_id not in held:
                    self.client.follow_cache(node.control_endpoint, node.node_id)
                    held[node.node_id] = index.overlap(node.control_endpoint, hashes)
                return held[node.node_id]

        decode = await self.fleet.pick("decode", life.tried, charge, overlap)
        if decode is None:
            raise NoCapacityError("no ready decode node can take the request", 5)
        # What the decode node would compute itself: the part of the prompt its prefix
        # cache does not hold (a chat's next turn, a shared system prompt).
        uncached = len(tokens) - (overlap(decode) if overlap else 0)
        local = self.settings.local_prefill_tokens
        prefill = None
        if not resume and not (local > 0 and uncached <= local):
            prefill = await self.fleet.pick("prefill", life.tried, charge, overlap)
        if overlap is not None:
            for node in (decode, prefill):
                if node is not None:
                    index.routed(node.control_endpoint, hashes)
        return decode, prefill
