"""One generation through the fleet: reserve on a decode node, prefill, stream tokens.

A request whose nodes fail before its first token is tried again on other nodes
(up to ``max_attempts``); one that fails after it ends with an error event. A
node counts as failed when the registry loses it or marks it dead (no heartbeat
for the TTL) or a call to it times out. The caller closing the stream aborts the
request on both nodes.

Each request's timeline goes to Redis at its transitions: queued (waiting for a
decode node's reservation), prefilling (the prefill node has the prompt),
transferring (the prompt is computed; the last KV and the first token are on
their way to the decode node), decoding (first token out), then finished,
failed or aborted, with its nodes, token counts and latencies.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from common.node_client import NodeClient, NodeRefused, NodeTimeout
from common.protocol import KVTarget, TokenEvent
from common.sampling_params import SamplingParams
from controlplane.fleet import Fleet
from controlplane.metrics import Metrics
from controlplane.schemas import NodePublic
from controlplane.settings import Settings
from controlplane.store import Store
from controlplane.timeseries import Timeseries

logger = logging.getLogger(__name__)
LIVENESS_CHECK_S = 1.0


class NoCapacityError(RuntimeError):
    """No ready node can take the request (HTTP 503)."""


class RequestRejected(ValueError):
    """A node refused the request itself, e.g. too long for its context (HTTP 400)."""


class NodeDown(RuntimeError):
    def __init__(self, node: NodePublic, reason: str) -> None:
        super().__init__(f"{node.role} node {node.node_id} {reason}")
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

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Events of one request until the one that finishes it."""
        started = time.monotonic()
        first_token_at: float | None = None
        num_tokens = 0
        state = "failed"
        ended = False  # the event that ends the request went out
        error: str | None = None
        tried: set[str] = set()
        self.timeseries.count("started")
        await self.store.record_request(
            request_id, "queued", prompt_tokens=len(prompt), max_tokens=params.max_new_tokens
        )
        try:
            for attempt in range(self.settings.max_attempts):
                decode, prefill = await self._pick(tried)
                try:
                    async for event in self._attempt(
                        request_id, attempt, prompt, params, prefill, decode
                    ):
                        if event.token_ids and first_token_at is None:
                            first_token_at = time.monotonic()
                            self.metrics.ttft.observe(first_token_at - started)
                            await self.store.record_request(
                                request_id, "decoding", ttft_s=first_token_at - started
                            )
                        num_tokens += len(event.token_ids)
                        self.timeseries.count("tokens", len(event.token_ids))
                        if event.finish_reason is not None:
                            state, error = _terminal_state(event)
                            ended = True
                        yield event
                    return
                except NodeDown as exc:
                    logger.warning("request %s: %s", request_id, exc)
                    tried.add(exc.node.node_id)
                    if first_token_at is not None:  # output already streamed: cannot redo
                        error, ended = f"{exc}; the request was interrupted", True
                        yield TokenEvent(request_id=request_id, finish_reason="error", error=error)
                        return
            error = f"no node could serve the request after {self.settings.max_attempts} attempts"
            raise NoCapacityError(error)
        except (NoCapacityError, RequestRejected) as exc:
            error = str(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not ended:  # the caller left first (a disconnect, a stop string)
                state = "aborted"
            raise
        finally:
            elapsed = time.monotonic() - started
            ttft = None if first_token_at is None else first_token_at - started
            tpot = (
                (elapsed - ttft) / (num_tokens - 1) if ttft is not None and num_tokens > 1 else None
            )
            self.metrics.finish(state, elapsed, ttft, len(prompt), num_tokens)
            self.timeseries.request_ended(state, ttft, tpot)
            latencies = {"e2e_s": elapsed, **({"tpot_s": tpot} if tpot is not None else {})}
            await asyncio.shield(
                self.store.record_request(
                    request_id, state, output_tokens=num_tokens, error=error or "", **latencies
                )
            )

    async def _pick(self, tried: set[str]) -> tuple[NodePublic, NodePublic]:
        decode = await self.fleet.pick("decode", tried)
        prefill = await self.fleet.pick("prefill", tried)
        if decode is None or prefill is None:
            missing = " and ".join(
                r for r, n in (("decode", decode), ("prefill", prefill)) if not n
            )
            raise NoCapacityError(f"no ready {missing} node can take the request")
        return decode, prefill

    async def _attempt(
        self,
        request_id: str,
        attempt: int,
        prompt: list[int],
        params: SamplingParams,
        prefill: NodePublic,
        decode: NodePublic,
    ) -> AsyncIterator[TokenEvent]:
        # A new id per attempt, so late events of a failed attempt cannot mix in.
        attempt_id = f"{request_id}.{attempt}"
        tokens = len(prompt)
        self.fleet.inflight_tokens[decode.node_id] += tokens
        self.fleet.inflight_tokens[prefill.node_id] += tokens
        self.client.open_stream(attempt_id)
        finished = False
        try:
            reserved = await self._watch(
                self.client.reserve(
                    decode.control_endpoint,
                    attempt_id,
                    prompt,
                    params,
                    timeout=self.settings.reserve_timeout_s,
                ),
                decode,
            )
            await self.store.record_request(
                request_id,
                "prefilling",
                prefill_node=prefill.node_id,
                decode_node=decode.node_id,
                attempts=attempt + 1,
            )
            await self._watch(
                self.client.prefill(
                    prefill.control_endpoint,
                    attempt_id,
                    prompt,
                    params,
                    KVTarget(reserved.kv_endpoint, reserved.layout),
                ),
                prefill,
            )
            watched = [prefill, decode]
            transferring = False
            async for event in self._events(attempt_id, watched):
                before_first_token = prefill in watched
                if before_first_token and not (
                    transferring or event.token_ids or event.finish_reason
                ):
                    transferring = True  # the prefill node's word that the prompt is computed
                    await self.store.record_request(request_id, "transferring")
                if event.token_ids and before_first_token:
                    watched.remove(prefill)  # the prefill node's part is done
                    self.fleet.inflight_tokens[prefill.node_id] -= tokens
                    self.fleet.inflight_tokens[decode.node_id] -= tokens
                    tokens = 0
                if event.finish_reason == "error" and before_first_token:
                    raise NodeDown(decode, f"failed before the first token: {event.error}")
                event.request_id = request_id
                finished = event.finish_reason is not None
                yield event
        except NodeRefused as exc:
            raise RequestRejected(str(exc)) from exc
        finally:
            self.fleet.inflight_tokens[prefill.node_id] -= tokens
            self.fleet.inflight_tokens[decode.node_id] -= tokens
            self.client.close_stream(attempt_id)
            if not finished:
                for node in (decode, prefill):
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
        silence = 0.0
        while True:
            event = await self.client.next_event(attempt_id, LIVENESS_CHECK_S)
            if event is not None:
                silence = 0.0
                yield event
                if event.finish_reason is not None:
                    return
                continue
            silence += LIVENESS_CHECK_S
            for node in watched:
                if not await self.fleet.is_alive(node.node_id):
                    raise NodeDown(node, "left the registry")
            if silence >= self.settings.token_timeout_s:
                raise NodeDown(watched[-1], f"sent nothing for {silence:g} s")


def _terminal_state(event: TokenEvent) -> tuple[str, str | None]:
    if event.finish_reason == "error":
        return "failed", event.error
    if event.finish_reason == "abort":
        return "aborted", None
    return "finished", None
