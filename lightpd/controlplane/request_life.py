"""One request's life on the control plane, from queued to its end.

``RequestLife`` keeps what the dispatcher learns of a request across its
attempts: when it was admitted and streamed its first token, the nodes it was
tried on and those that died under it, every token it streamed (a request that
moves resumes with them), and how it ended. ``finish`` writes the metrics, the
time series and its Redis record once, however it ended.
"""

import time

from lightpd.common.wire.messages import TokenEvent
from lightpd.controlplane.fleet_schemas import NodeRole
from lightpd.controlplane.metrics import Metrics, RequestTimes
from lightpd.controlplane.store import Store
from lightpd.controlplane.timeseries import Timeseries

MAX_NODE_DEATHS = 2  # a request on this many nodes of one role that died is not tried again


class RequestLife:
    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        metrics: Metrics,
        timeseries: Timeseries,
        store: Store,
        model_name: str,
    ) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.metrics = metrics
        self.timeseries = timeseries
        self.store = store
        self.model_name = model_name
        self.started = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.generated: list[int] = []  # every token streamed, whichever node made it
        self.tried: set[str] = set()  # nodes not to place it on again
        self.deaths: dict[NodeRole, int] = {"prefill": 0, "decode": 0}
        self.failures = 0  # attempts that failed on a live node (refusals, hand-offs)
        self.state = "failed"  # its record's end: finished, failed or aborted
        self.reason = "error"  # the finish reason it ends with (stop, length, abort, error)
        self.error: str | None = None
        self.ended = False  # the event that ends it went out

    def admitted(self) -> None:
        if self.admitted_at is None:
            self.admitted_at = time.monotonic()

    async def streamed(self, event: TokenEvent) -> None:
        """An event of the request goes out: its first token's latency is recorded,
        its tokens kept, its end noted."""
        if self.first_token_at is not None:
            event.num_cached_tokens = 0  # reported with the first token only
        elif event.token_ids:
            self.first_token_at = time.monotonic()
            ttft = self.first_token_at - self.started
            self.metrics.ttft.labels(self.model_name).observe(ttft)
            await self.store.record_request(self.request_id, "decoding", ttft_s=ttft)
        self.generated += event.token_ids
        self.timeseries.count("tokens", len(event.token_ids))
        if event.finish_reason is not None:
            self.ended = True
            self.reason = event.finish_reason
            if event.finish_reason == "error":
                self.state, self.error = "failed", event.error
            else:
                self.state = "aborted" if event.finish_reason == "abort" else "finished"

    def failed(self, error: str) -> TokenEvent:
        """The event that ends the request with ``error`` (it streamed already)."""
        self.error, self.ended = error, True
        return TokenEvent(request_id=self.request_id, finish_reason="error", error=error)

    def busy(self, node_id: str) -> None:
        """A node's queue was full: another may have room."""
        self.tried.add(node_id)
        self.failures += 1

    def lost(self, node_id: str, role: NodeRole, died: bool, drained: bool) -> bool:
        """Its attempt failed with its node (dead, drained, or failing the hand-off);
        False when too many nodes of that role died under it to try again. A
        request that streamed already moves with its tokens."""
        self.tried.add(node_id)
        self.deaths[role] += died
        self.failures += not died and not drained
        if self.generated:
            self.metrics.migrations.inc()
            self.timeseries.count("migrated")
        return self.deaths[role] < MAX_NODE_DEATHS

    def left(self, stopped_here: bool) -> None:
        """The caller closed the stream before its end: a stop string it found
        (``stopped_here``), or a disconnect."""
        if not self.ended:
            self.state, self.reason = ("finished", "stop") if stopped_here else ("aborted", "abort")

    async def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        num_tokens = len(self.generated)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        tpot = None
        if ttft is not None and num_tokens > 1:
            tpot = (elapsed - ttft) / (num_tokens - 1)
        queue_s = None if self.admitted_at is None else self.admitted_at - self.started
        times = RequestTimes(elapsed, queue_s, ttft)
        self.metrics.finish(self.state, self.reason, times, self.num_prompt_tokens, num_tokens)
        self.timeseries.request_ended(self.state, ttft, tpot)
        latencies = {"e2e_s": elapsed, **({"tpot_s": tpot} if tpot is not None else {})}
        await self.store.record_request(
            self.request_id,
            self.state,
            output_tokens=num_tokens,
            error=self.error or "",
            **latencies,
        )
