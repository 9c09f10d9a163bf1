"""How one request wants its tokens chosen; validated where it is made."""

from typing import Annotated, Literal

import msgspec

INT32_LIMIT = 1 << 31
SEED_LIMIT = 1 << 63
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API allows
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar: far below a message's limit


class GrammarSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on the output, compiled by each node that samples the request
    (``lightpd/common/grammar_build.py`` says what each kind means).

    ``json_schema``: ``text`` is a JSON Schema; ``json_object``: any JSON object
    (``text`` empty); ``regex``; ``ebnf`` (xgrammar's EBNF, rule ``root``);
    ``structural_tag``: xgrammar's structural tag, as JSON."""

    kind: Literal["json_schema", "json_object", "regex", "ebnf", "structural_tag"]
    text: Annotated[str, msgspec.Meta(max_length=MAX_GRAMMAR_CHARS)] = ""

    def __post_init__(self) -> None:
        if self.kind == "json_object" and self.text:
            raise ValueError("a json_object grammar takes no text")
        if self.kind != "json_object" and not self.text:
            raise ValueError(f"a {self.kind} grammar needs its text")


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI-style sampling settings plus the usual vLLM/SGLang extras.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 disables top-k.
    ``logprobs``: None returns none, 0 the chosen token's, N also the top N.
    ``seed`` makes the request's random choices depend on nothing else.
    ``logit_bias``: (token id, bias in [-100, 100]) pairs added to the logits
    before anything else (penalties, masks, temperature), as OpenAI's API does.
    ``grammar``: only tokens that keep the output within it may be sampled, and
    the request stops once the grammar is complete.
    ``cache_namespace``: the prefix cache's namespace the request reads and fills
    (the control plane derives it from the tenant and ``cache_salt``); prefixes are
    shared only within one. 0: the fleet-wide namespace.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: GrammarSpec | None = None
    cache_namespace: int = 0  # a signed 64-bit name, as msgpack carries it
    # Whose request it is, and the tenant's weight: a node shares itself among
    # tenants by weight (engine/fair_share.py). 0: the one tenant of an open API.
    tenant: int = 0
    tenant_weight: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (
                self.max_new_tokens >= 1,
                f"max_new_tokens must be at least 1, got {self.max_new_tokens}",
            ),
            (
                0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}",
            ),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (
                0 < self.tenant_weight <= 1e6,
                f"tenant_weight must be in (0, 1e6], got {self.tenant_weight}",
            ),
            (
                self.top_k == -1 or self.top_k >= 0,
                f"top_k must be -1, 0 or positive, got {self.top_k}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
            (
                self.max_new_tokens < INT32_LIMIT and self.top_k < INT32_LIMIT,
                f"max_new_tokens and top_k must be below {INT32_LIMIT}",
            ),
            (
                self.seed is None or -SEED_LIMIT <= self.seed < SEED_LIMIT,
                f"seed must be a 64-bit signed integer, got {self.seed}",
            ),
            (
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}",
            ),
            (
                all(0 <= t < INT32_LIMIT for t in self.stop_token_ids),
                f"stop_token_ids must be in [0, {INT32_LIMIT})",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(self.logit_bias)}",
            ),
            (
                all(0 <= t < INT32_LIMIT for t, _ in self.logit_bias),
                f"logit_bias token ids must be in [0, {INT32_LIMIT})",
            ),
            (
                all(-100 <= b <= 100 for _, b in self.logit_bias),
                "logit_bias values must be in [-100, 100]",
            ),
            (
                # Holding back the stop tokens could leave a complete grammar nothing to allow.
                self.grammar is None or self.min_new_tokens == 0,
                "min_new_tokens cannot be combined with a grammar",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
