"""One placement of a request: reserve on a decode node, prefill, stream its events.

An ``Attempt`` is tried once: its decode node reserves slots for the prompt (in
its queue, up to the request's deadline), its prefill node (if any) computes
the prompt and hands the KV over, and the decode node streams the tokens. Its
id is the request's and its number, so that late events of a failed attempt
cannot mix into the next. Closing it before its end aborts it on both nodes.

A node that leaves the registry, is marked dead, or times out a call fails the
attempt with ``NodeDown``; so does one drained with ``--migrate``, or a node
that reports a failure that is its own, not the request's (a failed hand-off).
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from lightpd.common.wire.messages import Reserved, TokenEvent
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.fleet import Charge, Fleet
from lightpd.controlplane.fleet_schemas import NodePublic
from lightpd.controlplane.metrics import Metrics
from lightpd.controlplane.node_client import NodeBusy, NodeClient, NodeRefused, NodeTimeout
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import Store

LIVENESS_CHECK_S = 1.0
T = TypeVar("T")


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


class Attempt:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        client: NodeClient,
        store: Store,
        metrics: Metrics,
        request_id: str,
        number: int,
        charge: Charge,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.client = client
        self.store = store
        self.metrics = metrics
        self.request_id = request_id
        self.id = f"{request_id}.{number}"
        self.number = number
        self.charge = charge

    async def run(
        self,
        prompt: list[int],
        params: SamplingParams,
        decode: NodePublic,
        prefill: NodePublic | None,
        admit: Callable[[], None],
        deadline: float,
        resume: tuple[int, ...] = (),
    ) -> AsyncIterator[TokenEvent]:
        """The attempt's events; ``prefill`` None: the decode node computes the prompt
        itself (and the ``resume`` tokens after it, which the request generated
        elsewhere). ``admit`` is called once the decode node holds slots."""
        self.client.open_stream(self.id)
        finished = False
        try:
            try:
                reserved = await self._reserve(prompt, params, decode, prefill, deadline, resume)
                admit()
                await self.store.record_request(
                    self.request_id,
                    "prefilling",
                    prefill_node=(prefill or decode).node_id,
                    decode_node=decode.node_id,
                    attempts=self.number + 1,
                )
                if prefill is not None:
                    await self._prefill(prompt, params, prefill, reserved)
                async for event in self._stream(len(prompt), decode, prefill):
                    finished = event.finish_reason is not None
                    yield event
            except NodeRefused as exc:
                raise RequestRejected(str(exc)) from exc
        finally:
            if not finished:
                await asyncio.shield(self._abort(decode, prefill))
            self.client.close_stream(self.id)

    async def _reserve(
        self,
        prompt: list[int],
        params: SamplingParams,
        decode: NodePublic,
        prefill: NodePublic | None,
        deadline: float,
        resume: tuple[int, ...],
    ) -> Reserved:
        """Slots on the decode node, waiting in its queue up to ``deadline``."""
        try:
            return await self._watch(
                self.client.reserve(
                    decode.control_endpoint,
                    self.id,
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

    async def _prefill(
        self, prompt: list[int], params: SamplingParams, prefill: NodePublic, reserved: Reserved
    ) -> None:
        """The prompt to the prefill node, which sends the decode node what its prefix
        cache does not hold."""
        await self._watch(
            self.client.prefill(
                prefill.control_endpoint,
                self.id,
                prompt,
                params,
                reserved.target(),
                ack_timeout_s=self.settings.kv_timeout_s,
            ),
            prefill,
        )
        moved = len(prompt) - reserved.num_cached_tokens
        self.metrics.kv_transfer_tokens.inc(moved)
        self.metrics.kv_transfer_bytes.inc(moved * reserved.layout.bytes_per_token)

    async def _stream(
        self, num_prompt_tokens: int, decode: NodePublic, prefill: NodePublic | None
    ) -> AsyncIterator[TokenEvent]:
        """The events from the prompt computed to the end; the record says
        "transferring" once the prefill node is done."""
        watched = [n for n in (prefill, decode) if n is not None]
        transferring = False
        first = True
        async for event in self._events(watched):
            computed = not (transferring or event.token_ids or event.finish_reason)
            if prefill is not None and first and computed:
                transferring = True  # the prefill node's word that the prompt is computed
                await self.store.record_request(self.request_id, "transferring")
            if event.token_ids and first:
                first = False
                # The computing node's count (a prefill node's comes with the KV).
                event.num_cached_tokens = min(event.num_cached_tokens, num_prompt_tokens)
                self.metrics.cached_prompt_tokens.inc(event.num_cached_tokens)
                if prefill is not None:
                    watched.remove(prefill)  # the prefill node's part is done
                self.charge.settled()
            self.charge.grew(len(event.token_ids))
            if event.finish_reason == "error" and event.retry:
                # The node failed, not the request (a failed hand-off, a broken
                # expert-parallel group): other nodes may succeed; a request that
                # streamed tokens already moves with them.
                raise NodeDown(decode, f"failed: {event.error}", died=False)
            event.request_id = self.request_id
            yield event

    async def _abort(self, *nodes: NodePublic | None) -> None:
        for node in nodes:
            if node is not None:
                await self.client.abort(node.control_endpoint, self.id)

    async def _watch(self, call: Awaitable[T], node: NodePublic) -> T:
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

    async def _events(self, watched: list[NodePublic]) -> AsyncIterator[TokenEvent]:
        """The attempt's events; NodeDown when a watched node goes silent and is dead
        or gone from the registry, or is drained with ``--migrate`` (checked once a
        LIVENESS_CHECK_S, also while events flow). Liveness is the node's (its
        heartbeats, and its serving loop going round), never one request's silence:
        a request queued or paused behind a large batch may wait long, and is not
        taken for a dead node's."""
        checked = time.monotonic()
        while True:
            event = await self.client.next_event(self.id, LIVENESS_CHECK_S)
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
