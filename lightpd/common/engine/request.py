"""A request's life inside an engine, and what the engine reports about it."""

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lightpd.common.wire.messages import TokenLogprobs
from lightpd.common.wire.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lightpd.common.engine.connector import KVRecvSpec, KVSendSpec
    from lightpd.common.engine.grammar import RequestGrammar
    from lightpd.common.engine.prefix_cache import PrefixNode


class RequestError(ValueError):
    """A request the engine cannot take; the message says why. The engine carries on."""


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
    # Prefill role: the prompt's KV and first token reached their receiver; the
    # request goes on there, and nothing of it is left here.
    HANDED_OFF = "handed_off"


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens capped by the context length
    stop_token_ids: frozenset[int]
    rng_key: int
    arrival: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int = -1  # row in the request table while running
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    num_slots: int = 0  # slots held, mapped at positions [0, num_slots)
    # Prefix cache: positions [0, num_cached_slots) map to slots the cache owns, on
    # the path that ends at prefix_node (referenced while held); None: no cache used.
    # It changes as the request runs: it grows once what it computed is cached
    # (``KVManager.cache_computed``) and is 0 while it holds no slots.
    num_cached_slots: int = 0
    prefix_node: "PrefixNode | None" = None
    # Prompt tokens found in the prefix cache at its first admission, fixed from
    # then on (what ``RequestOutput.num_cached_tokens`` reports; None until then).
    num_cached_tokens: int | None = None
    is_prefilling: bool = False
    # A reservation: its prompt's KV is computed elsewhere and written into its slots
    # (under kv_recv), once admitted; it may wait in the queue until queue_deadline.
    awaits_kv: bool = False
    kv_recv: "KVRecvSpec | None" = None
    queue_deadline: float = float("inf")
    # Prefill only: the prompt's KV goes to kv_send; the request never decodes here.
    kv_send: "KVSendSpec | None" = None
    num_kv_sent: int = 0  # prompt positions handed to the connector so far
    num_preemptions: int = 0
    # Its output's grammar (params.grammar), advanced with every token it accepts.
    grammar: "RequestGrammar | None" = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def is_movable(self) -> bool:
        """Whether pausing it (freeing its KV, recomputing later) is safe: a decoding
        request, not one whose KV is on its way in or out."""
        return not (self.is_prefilling or self.awaits_kv or self.kv_send is not None)

    @property
    def suppressed_ids(self) -> frozenset[int]:
        """Tokens that may not be sampled yet: stops, until min_new_tokens are out."""
        if self.num_output_tokens < self.params.min_new_tokens:
            return self.stop_token_ids
        return frozenset()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first

    def to_wire(self) -> TokenLogprobs:
        return TokenLogprobs(self.token_id, self.logprob, [tuple(t) for t in self.top])

    @classmethod
    def from_wire(cls, logprobs: TokenLogprobs) -> "TokenLogprob":
        top = tuple((int(t), float(v)) for t, v in logprobs.top)
        return cls(logprobs.token_id, logprobs.logprob, top)


@dataclass
class RequestOutput:
    """What happened to one request in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    retry: bool = False  # an error of the KV hand-off, not of the request: others may succeed
    # Prompt tokens this engine took from its prefix cache (set on the output that
    # brings the first token, or a prefill's hand-off; 0 otherwise).
    num_cached_tokens: int = 0

    @classmethod
    def ending(
        cls, request: Request, reason: FinishReason, error: str | None = None, retry: bool = False
    ) -> "RequestOutput":
        """The last output of ``request``, which ends without a new token."""
        return cls(
            request.request_id,
            [],
            None,
            reason,
            request.num_prompt_tokens,
            request.num_output_tokens,
            error=error,
            retry=retry,
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
