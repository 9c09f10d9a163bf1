"""The engine of every role: add requests, step, read outputs.

In process it prefills and decodes. A prefill node's engine sends its requests'
prompt KV and first token to a decode node (``KVHandoff``); a decode node's
engine decodes reservations once their KV is in, and prefills plain requests
itself. One scheduler, one request state machine, one owner of a request's KV.
"""

import time
from collections.abc import Sequence
from functools import partial

from lightpd.common.engine.config import EngineConfig
from lightpd.common.engine.connector import KVConnector, KVRecvSpec, KVSendSpec
from lightpd.common.engine.expert_parallel import ExpertParallelError
from lightpd.common.engine.grammar import GrammarCache, without_broken_grammars
from lightpd.common.engine.kv_handoff import KVHandoff
from lightpd.common.engine.lockstep import Lockstep
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.model_runner import ModelRunner
from lightpd.common.engine.prefix_cache import PrefixCache
from lightpd.common.engine.request import FinishReason, Request, RequestError, RequestOutput
from lightpd.common.engine.request_builder import RequestBuilder
from lightpd.common.engine.scheduler import ScheduledBatch, Scheduler
from lightpd.common.engine.stats import EngineStats
from lightpd.common.wire.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None) -> None:
        """``connector``: how prompts' KV leaves (prefill) or arrives (decode); the
        runner builds the pool, so it is attached with ``attach`` once built."""
        self.config = config
        self.model_config = mc = ModelConfig.from_dir(config.model)
        self.runner = ModelRunner(config, mc)
        self.max_model_len = self.runner.max_model_len
        self.pool = self.runner.pool
        cache = PrefixCache(self.pool) if config.enable_prefix_cache else None
        self.scheduler = Scheduler(self.pool, self.runner.table, config.max_prefill_tokens, cache)
        self.request_builder = RequestBuilder(mc, self.max_model_len, config.seed)
        self._requests: dict[str, Request] = {}  # wherever they are; shared with the hand-off
        self.kv_handoff = KVHandoff(self.scheduler, self._requests, mc.vocab_size, connector)
        self.expert_parallel = self.runner.expert_parallel  # its group's steps are its own
        self.lockstep = Lockstep(self.expert_parallel, self.runner)
        self.grammars = GrammarCache(config.model, mc.vocab_size, mc.eos_token_ids)

    def close(self) -> None:
        """Let go at once of what the engine holds beyond memory: the KV connector's
        threads and sockets, the grammar compiler's thread, the CUDA graphs. Whoever
        made an engine closes it (a thread left running would touch the GPU while
        another engine captures its graphs). The engine takes no work afterwards."""
        self.kv_handoff.close()
        self.grammars.close()
        self.runner.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def attach(self, connector: KVConnector | None) -> None:
        self.kv_handoff.connector = connector

    @property
    def connector(self) -> KVConnector | None:
        return self.kv_handoff.connector

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
        if kv_target is not None:
            self.kv_handoff.start_send(request, kv_target)
        if queue_timeout_s is not None:
            request.queue_deadline = time.monotonic() + queue_timeout_s
        self._requests[request_id] = request
        self.scheduler.add(request)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        kv_source: KVRecvSpec | None = None,
        queue_timeout_s: float = float("inf"),
    ) -> None:
        """Queue a request whose prompt KV is computed elsewhere, in order for up to
        ``queue_timeout_s`` (``expire_waiting``); once admitted (``pop_admitted``) the
        connector fills its slots under ``kv_source`` (or ``KVHandoff`` is told)."""
        request = self._new_request(request_id, prompt_token_ids, params)
        request.awaits_kv = True
        request.kv_recv = kv_source
        request.queue_deadline = time.monotonic() + queue_timeout_s
        self._requests[request_id] = request
        self.scheduler.add(request)

    def _new_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        """A request built and checked; it is the engine's once queued."""
        if self.failure is not None:
            raise RequestError(f"{self.failure}; this engine takes no more requests")
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = self.request_builder.build(request_id, prompt_token_ids, params, output_token_ids)
        if params.grammar is not None:  # compiles while the request waits
            request.grammar = self.grammars.start(request_id, params.grammar, output_token_ids)
        return request

    def pop_admitted(self) -> list[str]:
        """Ids of reservations, and of requests queued with a queue timeout, admitted
        since the last call (each once), whatever became of them since (one that
        prefills here may have finished already); the reservations start receiving."""
        admitted = self.scheduler.take_admitted()
        self.kv_handoff.start_receives(admitted)
        return [r.request_id for r in admitted]

    def expire_waiting(self) -> list[str]:
        """Queued requests that waited past their queue timeout, now dropped (no slots held)."""
        expired = self.scheduler.expire_waiting(time.monotonic())
        for request in expired:
            del self._requests[request.request_id]
        return [r.request_id for r in expired]

    def cached_prefix(self, request_id: str) -> int:
        """How many leading prompt tokens of an admitted request came from the prefix
        cache (a reservation receives KV for the rest only); 0 if it is not here."""
        request = self._requests.get(request_id)
        return 0 if request is None else request.num_cached_tokens or 0

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

    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self.kv_handoff)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its slots at once; None if it is not here."""
        request = self.kv_handoff.drop(request_id)
        return None if request is None else RequestOutput.ending(request, FinishReason.ABORT)

    def fail(self, request_id: str, reason: str, retry: bool = False) -> RequestOutput | None:
        """End a request with an error and free its slots; None if it is not here.
        ``retry``: the fault is not the request's, another node may serve it."""
        request = self.kv_handoff.drop(request_id)
        if request is None:
            return None
        return RequestOutput.ending(request, FinishReason.ERROR, reason, retry)

    @property
    def has_work(self) -> bool:
        """Whether ``step`` has something to compute (transfers only wait); in an
        expert-parallel group, also while another member computes: this one joins."""
        return self.failure is None and (self.scheduler.has_runnable or self.lockstep.active)

    @property
    def failure(self) -> str | None:
        """Why this engine serves no more (its expert-parallel group failed); None while it does."""
        return self.lockstep.failure

    def step(self) -> list[RequestOutput]:
        """Take in the connector's news, run one batch, hand off the prompts sent; what
        happened to each request. A batch that raises fails its requests only
        (``Scheduler.fail_batch``); an expert-parallel member steps with its group."""
        if self.failure is not None:
            return []
        outputs = self._without_broken_grammars(self.kv_handoff.take_transfers())
        outputs += self._run(self.scheduler.schedule())
        if self.failure is not None:  # the group failed: every request here has ended
            return outputs
        outputs = self._without_broken_grammars(outputs)
        self.kv_handoff.hand_off(outputs)
        return self._forget_finished(outputs)

    def _run(self, batch: ScheduledBatch | None) -> list[RequestOutput]:
        try:
            self.lockstep.join(batch)
            return [] if batch is None else self._run_batch(batch)
        except ExpertParallelError as exc:
            return self.lockstep.end_all(exc, list(self._requests), partial(self.fail, retry=True))

    def _run_batch(self, batch: ScheduledBatch) -> list[RequestOutput]:
        try:
            sampled = self.runner.run(batch, self.kv_handoff.saver(batch))
            return self.scheduler.postprocess(batch, sampled)
        except ExpertParallelError:
            raise
        except Exception as exc:
            self.lockstep.check_batch_failure(exc)  # the group's failure, if it cannot go on
            for request in batch.requests:
                del self._requests[request.request_id]
            return self.scheduler.fail_batch(batch, exc)

    def _without_broken_grammars(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        failed = self.grammars.take_failed()
        return without_broken_grammars(outputs, failed, self._requests, self.kv_handoff.drop)

    def _forget_finished(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for output in outputs:
            if output.finished:
                self._requests.pop(output.request_id, None)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Run ``prompts`` to completion together; their output token ids, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"generate-{self.request_builder.num_built + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while any(i in self._requests for i in ids):
            for output in self.step():
                tokens[output.request_id] += output.new_token_ids
        return [tokens[i] for i in ids]
