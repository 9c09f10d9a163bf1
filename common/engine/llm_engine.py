"""The in-process engine: add requests, step, read outputs. Nodes wrap this."""

import random
from collections.abc import Sequence

from common.engine.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.engine.request import FinishReason, Request, RequestError, RequestOutput
from common.engine.scheduler import Scheduler
from common.model_config import ModelConfig
from common.sampler import seed_to_key
from common.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.runner = ModelRunner(config, self.model_config)
        self.max_model_len = self.runner.max_model_len
        self.pool = self.runner.pool
        self.scheduler = Scheduler(self.pool, self.runner.table, config.max_prefill_tokens)
        self._requests: dict[str, Request] = {}
        self._seeds = random.Random(config.seed)
        self._arrivals = 0

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises RequestError (and changes nothing) if it cannot run."""
        prompt = list(prompt_token_ids)
        self._validate(request_id, prompt, params)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(self.model_config.eos_token_ids)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(64)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            max_new_tokens=min(params.max_new_tokens, self.max_model_len - len(prompt)),
            stop_token_ids=frozenset(stops),
            rng_key=seed_to_key(seed),
            arrival=self._arrivals,
        )
        self._arrivals += 1
        self._requests[request_id] = request
        self.scheduler.add(request)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise RequestError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens, but this engine's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RequestError(f"stop token id {bad} is outside the vocabulary [0, {vocab})")

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
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        outputs = self.scheduler.postprocess(batch, self.runner.run(batch))
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Run ``prompts`` to completion together; their output token ids, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"generate-{self._arrivals + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while any(i in self._requests for i in ids):
            for output in self.step():
                tokens[output.request_id] += output.new_token_ids
        return [tokens[i] for i in ids]
