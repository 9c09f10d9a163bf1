"""Continuous batching: which requests run this step, and what their results do.

Prefill comes first: waiting requests are admitted in arrival order while the
peak-memory rule says the pool holds them, and their prompts run in chunks of at
most ``max_prefill_tokens`` per step. Otherwise every admitted request decodes one
token. When the pool runs dry mid-decode (an output outgrew its estimate), the
newest requests are paused: their slots go back and they wait at the head of the
queue, to be recomputed from prompt + output when room returns. With a prefix
cache, admission counts cached slots that no request uses as free, a request
starts computing after its longest cached prefix, and what it computed stays
cached when it ends or pauses.
"""

import logging
from dataclasses import dataclass

from lightpd.common.engine.admission import OutputLengthEstimator, peak_tokens
from lightpd.common.engine.fair_share import WaitingQueue, make_room_from, next_waiting
from lightpd.common.engine.kv_manager import KVManager
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.prefix_cache import PrefixCache
from lightpd.common.engine.req_table import RequestTable
from lightpd.common.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """Positions ``[starts[i], ends[i])`` of ``requests[i]`` run this step."""

    is_prefill: bool
    requests: list[Request]
    starts: list[int]
    ends: list[int]

    @property
    def samples(self) -> list[bool]:
        """Which requests sample a token: all in decode; in prefill, those whose
        prompt is complete after this chunk."""
        return [end == r.num_tokens for r, end in zip(self.requests, self.ends, strict=True)]

    def add_chunk(self, request: Request, budget: int) -> int:
        """Add the next at most ``budget`` uncomputed tokens of ``request``; returns how many."""
        start = request.num_computed_tokens
        end = min(request.num_tokens, start + budget)
        self.requests.append(request)
        self.starts.append(start)
        self.ends.append(end)
        return end - start


class Scheduler:
    def __init__(
        self,
        pool: TokenKVPool,
        table: RequestTable,
        max_prefill_tokens: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.pool = pool
        self.table = table
        self.kv = KVManager(pool, table, prefix_cache)
        self.max_prefill_tokens = max_prefill_tokens
        self.estimator = OutputLengthEstimator()
        self.waiting = WaitingQueue()
        # Requests whose grammar still compiles wait apart, in arrival order: the
        # batch runs on, and no step ever waits for a compile.
        self.compiling: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Admitted requests that someone waits to hear of (reservations, and requests
        # queued under a deadline), until taken (``take_admitted``).
        self._newly_admitted: list[Request] = []

    def add(self, request: Request) -> None:
        if request.grammar is not None and not request.grammar.compiled:
            self.compiling.append(request)
        else:
            self.waiting.append(request)

    def take_compiled(self) -> None:
        """Queue the requests whose grammar is ready or failed (over a budget too:
        the engine then fails them)."""
        if not self.compiling:
            return
        still = []
        for request in self.compiling:
            if request.grammar.compiled:
                self.waiting.append(request)
            else:
                still.append(request)
        self.compiling = still

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.compiling)

    @property
    def num_waiting(self) -> int:
        """Requests not admitted yet (their grammar compiling, or queued)."""
        return len(self.waiting) + len(self.compiling)

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens not computed yet: queued requests and unfinished prefills."""
        queued = sum(r.num_tokens for r in [*self.waiting, *self.compiling])
        return queued + sum(
            r.num_tokens - r.num_computed_tokens for r in self.running if r.is_prefilling
        )

    @property
    def has_runnable(self) -> bool:
        """Whether a step would compute something (reservations only wait for KV)."""
        self.take_compiled()
        return any(not r.awaits_kv for r in self.running) or any(
            not r.awaits_kv for r in self.waiting
        )

    def abort(self, request_id: str) -> Request | None:
        for request in self.compiling:
            if request.request_id == request_id:
                self.compiling.remove(request)
                request.status = RequestStatus.FINISHED
                return request
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.status = RequestStatus.FINISHED
                return request
        for request in self.running:
            if request.request_id == request_id:
                self._release(request)
                return request
        return None

    def schedule(self) -> ScheduledBatch | None:
        self.take_compiled()
        return self._schedule_prefill() or self._schedule_decode()

    # ---- admission and prefill ----

    def can_admit(self, request: Request) -> bool:
        if not self.kv.can_allocate(request):
            return False
        if not self.running:
            return True  # alone it always fits: max_model_len <= pool size
        # Each request counts the slots of its own; the cached slots that requests
        # share count once, and those no request uses count as free (evictable).
        num_cached, num_unlocked = self.kv.peek_prefix(request)
        entries = [(self._remaining(r), r.num_slots - r.num_cached_slots) for r in self.running]
        entries.append((self._remaining(request), request.num_tokens - num_cached))
        shared = self.kv.num_locked_slots + num_unlocked
        return peak_tokens(entries) + shared <= self.pool.num_slots

    def _remaining(self, request: Request) -> int:
        # A request whose KV is sent elsewhere never grows here.
        return 0 if request.kv_send is not None else self.estimator.remaining(request)

    def _admit(self, request: Request) -> None:
        self.kv.allocate(request)
        request.is_prefilling = not request.awaits_kv
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if request.awaits_kv or request.queue_deadline != float("inf"):
            self._newly_admitted.append(request)
            # The queue timeout bounds the first wait only: a request paused later
            # waits again without a deadline, and is not announced twice.
            request.queue_deadline = float("inf")

    def take_admitted(self) -> list[Request]:
        """Reservations, and requests queued under a deadline, admitted since the last
        call (each once), whatever became of them since."""
        admitted, self._newly_admitted = self._newly_admitted, []
        return admitted

    def admit_waiting_reservations(self) -> None:
        """Admit the reservations that come next (they need no compute)."""
        self.take_compiled()
        while (request := self._next_admissible(reservations_only=True)) is not None:
            self.waiting.remove(request)
            self._admit(request)

    def _next_admissible(self, reservations_only: bool = False) -> Request | None:
        """The waiting request that comes next by fair share (fair_share.py) if it
        can be admitted now, pausing requests of tenants over its share to make room
        (requests of its own tenant are never paused for it); else None."""
        request = next_waiting(self.waiting, self.running)
        if request is None or (reservations_only and not request.awaits_kv):
            return None
        while not self.can_admit(request):
            victim = make_room_from(request, self.running)
            if victim is None:
                return None
            self._preempt(victim)
        return request

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_prefill_tokens
        batch = ScheduledBatch(True, [], [], [])
        for request in self.running:
            if request.is_prefilling and budget > 0:
                budget -= batch.add_chunk(request, budget)
        while budget > 0 and (request := self._next_admissible()) is not None:
            self.waiting.remove(request)
            self._admit(request)
            if request.is_prefilling:
                budget -= batch.add_chunk(request, budget)
        return batch if batch.requests else None

    # ---- decode ----

    def _schedule_decode(self) -> ScheduledBatch | None:
        decoding = [r for r in self.running if not (r.is_prefilling or r.awaits_kv)]
        while decoding and not self.kv.can_append(len(decoding)):
            # Reservations keep their slots: their KV is on its way.
            self._preempt(max(decoding, key=lambda r: r.arrival))
            decoding = [r for r in self.running if not (r.is_prefilling or r.awaits_kv)]
        if not decoding:
            return None
        positions = [r.num_computed_tokens for r in decoding]
        self.kv.append_slot(decoding)
        return ScheduledBatch(False, decoding, positions, [p + 1 for p in positions])

    def _preempt(self, request: Request) -> None:
        """Pause ``request``: free its KV and queue it first, to be recomputed later."""
        self._free_kv(request)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- results ----

    def postprocess(self, batch: ScheduledBatch, sampled: list[list[float]]) -> list[RequestOutput]:
        """Apply one step's results; ``sampled`` has one row per sampling request:
        token id, then (if asked for) its logprob, top ids and top logprobs."""
        outputs = []
        rows = iter(sampled)
        for request, end, samples in zip(batch.requests, batch.ends, batch.samples, strict=True):
            request.num_computed_tokens = end
            if not samples:
                continue
            if request.is_prefilling and request.kv_send is None:
                # The prompt's KV is whole: others may share it from now on. (KV being
                # sent keeps its slots until the send ends: caching it could move it.)
                self.kv.cache_computed(request)
            request.is_prefilling = False
            row = next(rows)
            outputs.append(
                self._accept(request, int(row[0]), unpack_logprobs(row, request.params.logprobs))
            )
        return outputs

    def complete_reservation(
        self, request: Request, first_token: int, logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        """The prompt's KV is in the reserved slots and ``first_token`` was sampled
        after it: the request joins the decode batch."""
        request.awaits_kv = False
        request.num_computed_tokens = request.num_prompt_tokens
        self.table.token_ids[request.row, request.num_prompt_tokens] = first_token
        return self._accept(request, first_token, logprobs)

    def _accept(
        self, request: Request, token: int, logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        request.output_token_ids.append(token)
        if request.grammar is not None:
            request.grammar.accept(token)
        reason = self._finish_reason(request, token)
        if reason is not None:
            self._finish(request)
        return RequestOutput(
            request.request_id,
            [token],
            logprobs,
            reason,
            request.num_prompt_tokens,
            request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        if request.kv_send is not None:
            return None  # its decode node decides when it ends
        # Stops cannot be sampled before min_new_tokens: the sampler masks them.
        if token in request.stop_token_ids:
            return FinishReason.STOP
        if request.grammar is not None and request.grammar.is_terminated:
            return FinishReason.STOP  # with ignore_eos: the grammar's own stop token
        if request.num_output_tokens >= request.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def detach(self, request: Request) -> None:
        """Take a prefilled request out of the batch but keep its KV (it is being
        sent); the caller frees it with ``kv.deallocate`` once the send is over."""
        self.running.remove(request)
        request.status = RequestStatus.FINISHED

    def expire_waiting(self, now: float) -> list[Request]:
        """Queued requests whose wait for admission ran past their deadline, removed."""
        expired = [r for r in self.waiting if r.queue_deadline <= now]
        for request in expired:
            self.waiting.remove(request)
            request.status = RequestStatus.FINISHED
        compiling = [r for r in self.compiling if r.queue_deadline <= now]
        for request in compiling:
            self.compiling.remove(request)
            request.status = RequestStatus.FINISHED
        return expired + compiling

    def fail_batch(self, batch: ScheduledBatch, exc: Exception) -> list[RequestOutput]:
        """Running ``batch`` raised ``exc``: drop all of its requests, freeing what they
        hold (a failed ``postprocess`` may have finished some already); their last
        outputs. The culprit is not isolated: rerunning the requests one by one would
        cost a step per request on a path that should never be taken."""
        ids = ", ".join(r.request_id for r in batch.requests)
        logger.error("a batch failed; failing all of its requests: %s", ids, exc_info=exc)
        error = f"internal error while running this request: {type(exc).__name__}: {exc}"
        outputs = []
        for request in batch.requests:
            if request.status is RequestStatus.RUNNING:
                self._release(request)
            request.status = RequestStatus.FINISHED
            outputs.append(
                RequestOutput(
                    request.request_id,
                    [],
                    None,
                    FinishReason.ERROR,
                    request.num_prompt_tokens,
                    request.num_output_tokens,
                    error=error,
                )
            )
        return outputs

    def _finish(self, request: Request) -> None:
        self.estimator.observe(request.num_output_tokens)
        self._release(request)

    def _release(self, request: Request) -> None:
        self._free_kv(request)
        self.running.remove(request)
        request.status = RequestStatus.FINISHED

    def _free_kv(self, request: Request) -> None:
        self.kv.deallocate(request)
        request.is_prefilling = False


def unpack_logprobs(row: list[float], wanted: int | None) -> list[TokenLogprob] | None:
    if wanted is None:
        return None
    # The batch packs as many top entries as its most demanding request asked for.
    num_top = (len(row) - 2) // 2
    top_ids, top_values = row[2 : 2 + num_top], row[2 + num_top :]
    top = tuple((int(t), v) for t, v in zip(top_ids[:wanted], top_values[:wanted], strict=True))
    return [TokenLogprob(int(row[0]), row[1], top)]
