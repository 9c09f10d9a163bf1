"""Typed, versioned messages between the control plane and the nodes.

Every message is a msgspec Struct sent as msgpack in the first ZeroMQ frame; the
``type`` tag selects the Struct and ``version`` must equal PROTOCOL_VERSION.
Tensors (KV layers) travel as raw frames after the header. Nothing is pickled.
Decoding validates types and values (SamplingParams checks itself), so a bad
message becomes a ProtocolError that the receiver answers with an ``Error``.
"""

import msgspec

from common.sampling_params import SamplingParams

PROTOCOL_VERSION = 1
MAX_PROMPT_TOKENS = 1 << 20


class ProtocolError(ValueError):
    """A message that cannot be accepted; the text says why."""


class Message(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    version: int = PROTOCOL_VERSION


class KVLayout(msgspec.Struct, frozen=True):
    """What a KV byte stream means; sender and receiver must agree on all of it."""

    model_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def describe_mismatch(self, other: "KVLayout") -> str | None:
        diffs = [
            f"{field}: {getattr(self, field)!r} here, {getattr(other, field)!r} there"
            for field in self.__struct_fields__
            if getattr(self, field) != getattr(other, field)
        ]
        return "; ".join(diffs) or None


class TokenLogprobs(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


# ---- control plane -> decode node ----


class Reserve(Message, tag="reserve"):
    """Hold KV slots for a request's prompt; answered by Reserved once admitted."""

    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reply_to: str  # ZeroMQ endpoint that receives this request's Tokens
    kv_timeout_s: float = 30.0  # release the slots if no complete KV by then


class Reserved(Message, tag="reserved"):
    call_id: int
    request_id: str
    kv_endpoint: str
    layout: KVLayout


# ---- control plane -> prefill node ----


class KVTarget(msgspec.Struct, frozen=True):
    endpoint: str
    layout: KVLayout


class Prefill(Message, tag="prefill"):
    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # seed must be set, so decode continues the same stream
    reply_to: str
    target: KVTarget
    ack_timeout_s: float = 30.0  # free the KV if the decode node never acknowledges


class Accepted(Message, tag="accepted"):
    call_id: int
    request_id: str


# ---- prefill node -> decode node (kv socket) ----


class KVLayer(Message, tag="kv_layer"):
    """Header of one layer's K and V for positions [start, start + num_tokens);
    followed by two raw frames, K then V, each [num_tokens, num_kv_heads, head_dim]."""

    request_id: str
    layout: KVLayout
    layer: int
    start: int
    num_tokens: int


class PrefillDone(Message, tag="prefill_done"):
    """All layers sent; the first generated token."""

    request_id: str
    layout: KVLayout
    num_prompt_tokens: int
    first_token: int
    logprobs: TokenLogprobs | None = None


class KVAck(Message, tag="kv_ack"):
    request_id: str
    error: str | None = None


# ---- nodes -> control plane (reply_to) ----


class TokenEvent(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Tokens(Message, tag="tokens"):
    """One step's news for all requests of one destination."""

    node_id: str
    events: list[TokenEvent]


# ---- any -> any node ----


class Abort(Message, tag="abort"):
    request_id: str


class HealthCheck(Message, tag="health_check"):
    call_id: int


class Health(Message, tag="health"):
    call_id: int
    node_id: str
    role: str
    model: str
    layout: KVLayout
    device: str
    num_slots: int
    num_free_slots: int
    num_reserved_slots: int
    num_running: int
    num_queued: int
    num_queued_tokens: int
    tokens_per_s: float
    max_model_len: int


class Error(Message, tag="error", kw_only=True):
    call_id: int | None = None
    request_id: str | None = None
    message: str


AnyMessage = (
    Reserve
    | Reserved
    | Prefill
    | Accepted
    | KVLayer
    | PrefillDone
    | KVAck
    | Tokens
    | Abort
    | HealthCheck
    | Health
    | Error
)
_decoder = msgspec.msgpack.Decoder(AnyMessage)
_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes | memoryview) -> Message:
    """Parse one header frame; raises ProtocolError with a readable reason."""
    try:
        message = _decoder.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        version = _peek_version(frame)
        if version is not None and version != PROTOCOL_VERSION:
            raise ProtocolError(_version_error(version)) from exc
        raise ProtocolError(f"malformed message: {exc}") from exc
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(_version_error(message.version))
    if isinstance(message, Reserve | Prefill):
        _check_prompt(message.prompt_token_ids)
    return message


def _check_prompt(prompt: list[int]) -> None:
    if not prompt:
        raise ProtocolError("malformed message: the prompt is empty")
    if len(prompt) > MAX_PROMPT_TOKENS:
        raise ProtocolError(f"malformed message: prompt longer than {MAX_PROMPT_TOKENS} tokens")


def _version_error(version: object) -> str:
    return f"protocol version {version!r} is not supported; this node speaks {PROTOCOL_VERSION}"


def _peek_version(frame: bytes | memoryview) -> object:
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError):
        return None
    return raw.get("version") if isinstance(raw, dict) else None
