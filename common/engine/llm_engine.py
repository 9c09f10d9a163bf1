"""The in-process engine: add requests, step, read outputs. Nodes wrap this."""

import logging
from collections.abc import Sequence

import torch

from common.engine.config import EngineConfig
from common.engine.model_config import ModelConfig
from common.engine.model_runner import ModelRunner
from common.engine.request import (
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    TokenLogprob,
)
from common.engine.request_builder import RequestBuilder
from common.engine.scheduler import Scheduler
from common.wire.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.runner = ModelRunner(config, self.model_config)
        self.max_model_len = self.runner.max_model_len
        self.pool = self.runner.pool
        self.scheduler = Scheduler(self.pool, self.runner.table, config.max_prefill_tokens)
        self.requests = RequestBuilder(self.model_config, self.max_model_len, config.seed)
        self._requests: dict[str, Request] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises RequestError (and changes nothing) if it cannot run."""
        self.scheduler.add(self._new_request(request_id, prompt_token_ids, params))

    def reserve(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queue a request whose prompt KV will be computed elsewhere. Once admitted
        (``pop_reserved``) its slots wait for ``write_kv`` and ``complete_reservation``."""
        request = self._new_request(request_id, prompt_token_ids, params)
        request.awaits_kv = True
        self.scheduler.add(request)

    def pop_reserved(self) -> list[str]:
        """Ids of reservations admitted since the last call: their slots are held."""
        reserved = [r.request_id for r in self.scheduler.newly_reserved if r.awaits_kv]
        self.scheduler.newly_reserved.clear()
        return reserved

    def admit_reservations(self) -> list[str]:
        """Admit queued reservations now if the pool allows, without running a step."""
        self.scheduler.admit_waiting_reservations()
        return self.pop_reserved()

    def reserved_slots(self, request_id: str) -> torch.Tensor:
        """Slots of an admitted reservation's prompt positions, int32 [num_prompt_tokens]."""
        request = self._reservation(request_id)
        return self.runner.table.req_to_token[request.row, : request.num_prompt_tokens]

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
        return sum(r.num_slots for r in self.scheduler.running if r.awaits_kv)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _new_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = self.requests.build(request_id, prompt_token_ids, params)
        self._requests[request_id] = request
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its slots at once; None if it is not here."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        del self._requests[request_id]
        return RequestOutput(
            request_id,
            [],
            None,
            FinishReason.ABORT,
            request.num_prompt_tokens,
            request.num_output_tokens,
        )

    def step(self) -> list[RequestOutput]:
        """Run one batch; what happened to each of its requests.

        If running the batch raises, every request of the batch fails with
        ``FinishReason.ERROR`` and its slots are freed; requests outside the
        batch carry on. The culprit is not isolated: all of a failed batch's
        requests fail together, since rerunning them one by one would cost a
        step per request on a path that should never be taken."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            outputs = self.scheduler.postprocess(batch, self.runner.run(batch))
        except Exception as exc:
            ids = ", ".join(r.request_id for r in batch.requests)
            logger.exception("a batch failed; failing all of its requests: %s", ids)
            return self._fail(batch.requests, exc)
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        return outputs

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
        first = self.requests.num_built
        ids = [f"generate-{first + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while any(i in self._requests for i in ids):
            for output in self.step():
                tokens[output.request_id] += output.new_token_ids
        return [tokens[i] for i in ids]
