"""The engine of every role: add requests, step, read outputs.

In process it prefills and decodes. A prefill node's engine gets requests with
a KV target: their prompts' KV goes out through the connector layer by layer,
the first token after it, and they never decode here; their KV is freed when
the receiver confirms. A decode node's engine gets reservations: once admitted
they hold slots that the connector fills, and they decode from the first token
the sender sampled; it may also take plain requests, queued like reservations
under a queue timeout, whose prompts it computes itself (local prefill). One
scheduler, one request state machine, one owner of a request's KV, whatever
the role.
"""

import logging
import time
from collections.abc import Callable, Sequence

import torch

from lightpd.common.engine.config import EngineConfig
from lightpd.common.engine.connector import KVConnector, KVDone, KVRecvSpec, KVSendSpec, LayerChunk
from lightpd.common.engine.expert_parallel import ExpertParallelError
from lightpd.common.engine.grammar import GrammarCache
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.model_runner import ModelRunner
from lightpd.common.engine.prefix_cache import PrefixCache
from lightpd.common.engine.request import (
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
)
from lightpd.common.engine.request_builder import RequestBuilder
from lightpd.common.engine.scheduler import ScheduledBatch, Scheduler
from lightpd.common.wire.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None) -> None:
        """``connector``: how prompts' KV leaves (prefill) or arrives (decode); the
        runner builds the pool, so it is attached with ``attach`` once built."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.runner = ModelRunner(config, self.model_config)
        self.max_model_len = self.runner.max_model_len
        self.pool = self.runner.pool
        self.scheduler = Scheduler(
            self.pool,
            self.runner.table,
            config.max_prefill_tokens,
            prefix_cache=PrefixCache(self.pool) if config.enable_prefix_cache else None,
        )
        self.request_builder = RequestBuilder(self.model_config, self.max_model_len, config.seed)
        self.connector = connector
        # A member of an expert-parallel group: every step is one of the group's.
        self.expert_parallel = self.runner.expert_parallel
        self._requests: dict[str, Request] = {}
        self._sending: dict[str, Request] = {}  # prompt done, KV held until the send ends
        self._admitted: list[str] = []  # reservations admitted, not yet popped
        mc = self.model_config
        self.grammars = GrammarCache(config.model, mc.vocab_size, mc.eos_token_ids)

    def close(self) -> None:
        """Let go at once of what the engine holds beyond memory: the KV connector's
        threads and sockets, the grammar compiler's thread, the CUDA graphs. Whoever
        made an engine closes it (a thread left running would touch the GPU while
        another engine captures its graphs). The engine takes no work afterwards."""
        if self.connector is not None:
            self.connector.close()
        self.grammars.close()
        self.runner.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def attach(self, connector: KVConnector) -> None:
        self.connector = connector

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        kv_target: KVSendSpec | None = None,
        queue_timeout_s: float | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request; raises RequestError (and changes nothing) if it cannot run.
        With ``kv_target``, only its prompt runs here and its KV goes there. With a
        (finite) ``queue_timeout_s`` it waits in order for at most that long
        (``expire_waiting``), and its admission is reported like a reservation's
        (``pop_admitted``). ``output_token_ids`` resumes a request generated
        elsewhere: they are computed after the prompt and count as its output
        (sampling step, penalties, token limits), so it goes on as if never moved."""
        request = self._new_request(request_id, prompt_token_ids, params, output_token_ids)
        if output_token_ids and kv_target is not None:
            raise RequestError("a resumed request is decoded where it is computed")
        if kv_target is not None:
            if self.connector is None:
                raise RequestError("this engine has no KV connector to send with")
            if not 0 <= kv_target.skip_tokens < request.num_prompt_tokens:
                raise RequestError(
                    f"the receiver cannot hold {kv_target.skip_tokens} of the prompt's "
                    f"{request.num_prompt_tokens} tokens: at least the last one is sent"
                )
            try:
                self.connector.start_send(request_id, kv_target)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            request.kv_send = kv_target
            request.num_kv_sent = kv_target.skip_tokens
        if queue_timeout_s is not None:
            request.queue_deadline = time.monotonic() + queue_timeout_s
        self._queue(request)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        kv_source: KVRecvSpec | None = None,
        queue_timeout_s: float = float("inf"),
    ) -> None:
        """Queue a request whose prompt KV is computed elsewhere. It waits in order
        for up to ``queue_timeout_s`` (``expire_waiting``); once admitted
        (``pop_admitted``) its slots are filled through the connector under
        ``kv_source``, or directly (``reserved_slots``, ``complete_reservation``)."""
        request = self._new_request(request_id, prompt_token_ids, params)
        request.awaits_kv = True
        request.kv_recv = kv_source
        request.queue_deadline = time.monotonic() + queue_timeout_s
        self._queue(request)

    def pop_admitted(self) -> list[str]:
        """Ids of reservations, and of requests queued with a queue timeout, admitted
        since the last call (each once), whatever became of them since: a request
        that prefills here may have finished in the step that admitted it."""
        self._collect_admitted()
        admitted, self._admitted = self._admitted, []
        return admitted

    def admit_reservations(self) -> None:
        """Admit queued reservations now if the pool allows, without running a step."""
        self.scheduler.admit_waiting_reservations()
        self._collect_admitted()

    def expire_waiting(self) -> list[str]:
        """Queued requests that waited past their queue timeout, now dropped; they
        held no slots."""
        expired = self.scheduler.expire_waiting(time.monotonic())
        for request in expired:
            del self._requests[request.request_id]
        return [r.request_id for r in expired]

    def _collect_admitted(self) -> None:
        for request in self.scheduler.newly_admitted:
            receives = request.awaits_kv and request.kv_recv is not None
            running = request.status is RequestStatus.RUNNING
            if receives and running and self.connector is not None:
                # The cached prefix is here already: only the rest comes.
                slots = self._uncached_prompt_slots(request)
                self.connector.start_recv(request.request_id, slots, slots.numel(), request.kv_recv)
            self._admitted.append(request.request_id)
        self.scheduler.newly_admitted.clear()

    def reserved_slots(self, request_id: str) -> torch.Tensor:
        """Slots of an admitted reservation's prompt positions that its KV must fill:
        those past its cached prefix (``cached_prefix``), int32."""
        return self._uncached_prompt_slots(self._reservation(request_id))

    def cached_prefix(self, request_id: str) -> int:
        """How many leading prompt tokens of an admitted request came from the prefix
        cache (a reservation receives KV for the rest only); 0 if it is not here."""
        request = self._requests.get(request_id)
        return 0 if request is None else request.num_prompt_cached or 0

    def _uncached_prompt_slots(self, request: Request) -> torch.Tensor:
        start = request.num_cached_slots
        return self.runner.table.req_to_token[request.row, start : request.num_prompt_tokens]

    def take_cache_events(self) -> tuple[list[int], list[int]]:
        """Names of the prefix blocks cached and evicted since the last call
        (``PrefixCache.take_block_events``); nothing without a prefix cache."""
        cache = self.scheduler.kv.prefix_cache
        return ([], []) if cache is None else cache.take_block_events()

    def cached_block_names(self) -> list[int]:
        cache = self.scheduler.kv.prefix_cache
        return [] if cache is None else cache.block_names()

    @property
    def num_available_slots(self) -> int:
        """Free slots, and cached slots that no request uses (evicted on demand)."""
        return self.scheduler.kv.num_available_slots

    def complete_reservation(
        self, request_id: str, first_token: int, logprobs: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        request = self._reservation(request_id)
        if not 0 <= first_token < self.model_config.vocab_size:
            raise RequestError(f"first token {first_token} is outside the vocabulary")
        output = self.scheduler.complete_reservation(request, first_token, logprobs)
        if output.finished:
            del self._requests[request_id]
        return output

    def _reservation(self, request_id: str) -> Request:
        """The admitted reservation ``request_id``; RequestError if there is none
        (unknown, finished, not yet admitted or already completed)."""
        request = self._requests.get(request_id)
        if request is None or not request.awaits_kv or request.row < 0:
            raise RequestError(f"request {request_id!r} holds no reservation awaiting KV")
        return request

    @property
    def num_reserved_slots(self) -> int:
        """Slots held for KV in transit: reservations awaiting it, prompts being sent."""
        running = self.scheduler.running
        awaiting = sum(r.num_slots - r.num_cached_slots for r in running if r.awaits_kv)
        return awaiting + sum(r.num_slots for r in self._sending.values())

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens not computed yet: queued requests and unfinished prefills."""
        waiting = [*self.scheduler.waiting, *self.scheduler.compiling]
        queued = sum(r.num_tokens for r in waiting)
        return queued + sum(
            r.num_tokens - r.num_computed_tokens for r in self.scheduler.running if r.is_prefilling
        )

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.compiling)

    def _new_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        """A request built and checked; it is the engine's once ``_queue``d."""
        if self.failure is not None:
            raise RequestError(f"{self.failure}; this engine takes no more requests")
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = self.request_builder.build(request_id, prompt_token_ids, params, output_token_ids)
        if params.grammar is not None:  # compiles while the request waits
            request.grammar = self.grammars.start(request_id, params.grammar, output_token_ids)
        return request

    def _queue(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its slots at once; None if it is not here."""
        request = self._drop(request_id)
        if request is None:
            return None
        return self._ended(request, FinishReason.ABORT)

    def fail(self, request_id: str, reason: str) -> RequestOutput | None:
        """End a request with an error and free its slots; None if it is not here."""
        request = self._drop(request_id)
        if request is None:
            return None
        return self._ended(request, FinishReason.ERROR, reason)

    def _drop(self, request_id: str) -> Request | None:
        """Take a request out wherever it is (queued, running, sending) and free its KV."""
        if self.connector is not None:
            self.connector.cancel(request_id)
        request = self._sending.pop(request_id, None)
        if request is not None:
            self.scheduler.kv.deallocate(request)
        else:
            request = self.scheduler.abort(request_id)
        if request is not None:
            del self._requests[request_id]
        return request

    def _ended(
        self,
        request: Request,
        reason: FinishReason,
        error: str | None = None,
        retry: bool = False,
    ) -> RequestOutput:
        return RequestOutput(
            request.request_id,
            [],
            None,
            reason,
            request.num_prompt_tokens,
            request.num_output_tokens,
            error=error,
            retry=retry,
            num_cached_tokens=request.num_prompt_cached or 0,
        )

    @property
    def has_work(self) -> bool:
        """Whether ``step`` has something to compute (transfers only wait); in an
        expert-parallel group, also while another member computes: this one joins."""
        if self.failure is not None:
            return False
        group = self.expert_parallel
        return self.scheduler.has_runnable or (group is not None and group.active)

    @property
    def failure(self) -> str | None:
        """Why this engine serves no more (its expert-parallel group failed); None while it does."""
        group = self.expert_parallel
        if group is None or group.failure is None:
            return None
        return f"the expert-parallel group failed: {group.failure}"

    def step(self) -> list[RequestOutput]:
        """Take in the connector's news, run one batch; what happened to each request.

        If running the batch raises, every request of the batch fails with
        ``FinishReason.ERROR`` and its slots are freed; requests outside the
        batch carry on. The culprit is not isolated: all of a failed batch's
        requests fail together, since rerunning them one by one would cost a
        step per request on a path that should never be taken.

        In an expert-parallel group every member steps together: the step begins
        with the group's agreement and a member without a batch joins the others'
        exchanges. If the group fails (a member died or hung), every request here
        ends with a retry-able error and the engine takes no more."""
        if self.failure is not None:
            return []
        outputs = self._without_broken_grammars(self._take_transfers())
        batch = self.scheduler.schedule()
        if self.expert_parallel is not None:
            try:
                self._join_group_step(batch)
            except ExpertParallelError as exc:
                return outputs + self._group_failed(exc)
        if batch is None:
            return outputs
        try:
            outputs += self.scheduler.postprocess(batch, self.runner.run(batch, self._saver(batch)))
        except ExpertParallelError as exc:
            return outputs + self._group_failed(exc)
        except Exception as exc:
            if self.expert_parallel is not None and not self.expert_parallel.step_done:
                # It stopped short of the step's exchanges: the others cannot go on.
                return outputs + self._group_failed(exc)
            ids = ", ".join(r.request_id for r in batch.requests)
            logger.exception("a batch failed; failing all of its requests: %s", ids)
            return outputs + self._fail(batch.requests, exc)
        outputs = self._without_broken_grammars(outputs)
        for output in outputs:
            request = self._requests.get(output.request_id)
            if output.finished:
                self._requests.pop(output.request_id, None)
            elif request is not None and request.kv_send is not None and output.new_token_ids:
                self._hand_off(request, output)
        return outputs

    def _join_group_step(self, batch: ScheduledBatch | None) -> None:
        """Agree on the step with the group; with no batch here, take part in the
        exchanges of the others' (all idle: nothing runs)."""
        num_tokens = 0
        if batch is not None:
            num_tokens = sum(e - s for s, e in zip(batch.starts, batch.ends, strict=True))
        # Decode steps of every member may replay a graph of the same size together.
        self.expert_parallel.agree(num_tokens, decoding=batch is None or not batch.is_prefill)
        if batch is None and self.expert_parallel.active:
            self.runner.empty_step()

    def _group_failed(self, exc: Exception) -> list[RequestOutput]:
        """End every request here with a retry-able error (another node can serve it),
        free all KV, and take no more: the group is torn down, never waited on."""
        self.expert_parallel.abort(f"{type(exc).__name__}: {exc}")
        reason = f"{self.failure}; the request may be retried on another node"
        outputs = []
        for request_id in list(self._requests):
            request = self._drop(request_id)
            if request is not None:
                outputs.append(self._ended(request, FinishReason.ERROR, reason, retry=True))
        if outputs:
            logger.error("ended %d requests: %s", len(outputs), reason)
        return outputs

    def _saver(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """What the runner calls after each layer's K/V of ``batch`` are written."""
        if self.connector is None or not batch.is_prefill:
            return None
        table = self.runner.table.req_to_token
        chunks = []
        for request, end in zip(batch.requests, batch.ends, strict=True):
            if request.kv_send is None or end <= request.num_kv_sent:
                continue
            # From where the last chunk ended (at first, where the receiver's cached
            # prefix ends): a cached part of the prompt goes with the first chunk
            # computed, its KV read from the cache's slots. Positions count from
            # the first one sent.
            start, skip = request.num_kv_sent, request.kv_send.skip_tokens
            slots = table[request.row, start:end]
            chunks.append(LayerChunk(request.request_id, start - skip, slots))
            request.num_kv_sent = end
        if not chunks:
            return None
        connector = self.connector
        return lambda layer: connector.save_layer(layer, chunks)

    def _hand_off(self, request: Request, output: RequestOutput) -> None:
        """The prompt is sent: send the first token; hold the KV until the send ends."""
        self.scheduler.detach(request)
        self._sending[request.request_id] = request
        self.connector.finish_send(
            request.request_id,
            request.num_prompt_tokens - request.kv_send.skip_tokens,
            output.new_token_ids[0],
            output.new_logprobs,
            request.num_prompt_cached or 0,
        )

    def _take_transfers(self) -> list[RequestOutput]:
        if self.connector is None:
            return []
        outputs = []
        for event in self.connector.poll():
            request_id = event.request_id
            if request_id in self._sending:  # a send ended: the KV is of no more use
                request = self._sending.pop(request_id)
                self.scheduler.kv.deallocate(request)
                del self._requests[request_id]
                if isinstance(event, KVDone):
                    outputs.append(self._ended(request, FinishReason.HANDED_OFF))
                else:
                    outputs.append(self._ended(request, FinishReason.ERROR, event.reason, True))
            elif isinstance(event, KVDone) and event.first_token is not None:
                try:
                    output = self.complete_reservation(
                        request_id, event.first_token, event.logprobs
                    )
                    # The prompt was computed by the sender: its cache is what saved work.
                    output.num_cached_tokens = event.num_cached_tokens
                    outputs.append(output)
                except RequestError as exc:
                    outputs += self._transfer_failed(request_id, str(exc))
            elif not isinstance(event, KVDone):
                outputs += self._transfer_failed(request_id, event.reason)
        return outputs

    def _without_broken_grammars(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Fail the requests whose grammar did not compile or refused a token; a token
        such a request took in ``outputs`` is not reported."""
        failed = self.grammars.take_failed()
        if not failed:
            return outputs
        outputs = [o for o in outputs if o.request_id not in failed]
        for request_id, reason in failed.items():
            request = self._requests.get(request_id)
            if request is not None:
                self._drop(request_id)  # wherever it is; one that ended this step holds nothing
                self._requests.pop(request_id, None)
                outputs.append(self._ended(request, FinishReason.ERROR, reason))
        return outputs

    def _transfer_failed(self, request_id: str, reason: str) -> list[RequestOutput]:
        request = self._drop(request_id)
        if request is None:
            return []
        logger.warning("request %s: %s", request_id, reason)
        return [self._ended(request, FinishReason.ERROR, reason, retry=True)]

    def _fail(self, requests: list[Request], exc: Exception) -> list[RequestOutput]:
        """End ``requests`` with an error output each, freeing whatever they hold."""
        message = f"internal error while running this request: {type(exc).__name__}: {exc}"
        outputs = []
        for request in requests:
            del self._requests[request.request_id]
            self.scheduler.fail(request)
            outputs.append(
                RequestOutput(
                    request.request_id,
                    [],
                    None,
                    FinishReason.ERROR,
                    request.num_prompt_tokens,
                    request.num_output_tokens,
                    error=message,
                )
            )
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Run ``prompts`` to completion together; their output token ids, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        first = self.request_builder.num_built
        ids = [f"generate-{first + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while any(i in self._requests for i in ids):
            for output in self.step():
                tokens[output.request_id] += output.new_token_ids
        return [tokens[i] for i in ids]
