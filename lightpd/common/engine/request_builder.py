"""Checks a request against the model and turns it into an engine Request."""

import random
from collections.abc import Sequence

from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.request import Request, RequestError
from lightpd.common.engine.sampler import seed_to_key
from lightpd.common.wire.sampling_params import SamplingParams


class RequestBuilder:
    def __init__(self, model_config: ModelConfig, max_model_len: int, seed: int) -> None:
        self.model_config = model_config
        self.max_model_len = max_model_len
        self._seeds = random.Random(seed)
        self.num_built = 0

    def build(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        """A Request ready to queue; RequestError says why one cannot run.
        ``output_token_ids``: what it generated before it moved here (resumed)."""
        prompt = list(prompt_token_ids)
        self.validate(prompt, params)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(self.model_config.eos_token_ids)
        outputs = list(output_token_ids)
        if outputs:
            self.validate_resumed(prompt, outputs, params, stops)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(64)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            max_new_tokens=min(params.max_new_tokens, self.max_model_len - len(prompt)),
            stop_token_ids=frozenset(stops),
            rng_key=seed_to_key(seed),
            arrival=self.num_built,
            output_token_ids=outputs,
        )
        self.num_built += 1
        return request

    def validate_resumed(
        self, prompt: list[int], outputs: list[int], params: SamplingParams, stops: set[int]
    ) -> None:
        """A resumed request must still have a token to generate, here."""
        total = len(prompt) + len(outputs)
        if total >= self.max_model_len:
            raise RequestError(
                f"the resumed request holds {total} tokens, but this engine's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate"
            )
        if len(outputs) >= params.max_new_tokens:
            raise RequestError(
                f"the resumed request already has its {params.max_new_tokens} output tokens"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in outputs if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"output token id {bad} is outside the vocabulary [0, {vocab})")
        if len(outputs) > params.min_new_tokens and outputs[-1] in stops:
            raise RequestError("the resumed request already ended with a stop token")

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
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
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise RequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
