"""Typed, versioned messages between the control plane and the nodes.

Every message is a msgspec Struct sent as msgpack in the first ZeroMQ frame; the
``type`` tag selects the Struct and ``version`` must equal PROTOCOL_VERSION.
Tensors (KV layers) travel as raw frames after the header. Nothing is pickled.
Decoding validates types, values and sizes (SamplingParams checks itself), so
a bad message becomes a ProtocolError that the receiver answers with an
``Error``. Every field that arrives over the network is bounded here.

Replies and token events go back over the connection the request came in on
(the control plane's DEALER to the node's ROUTER): no message names a reply
address, so no node ever connects to an address a message gave it, except the
KV target of a Prefill, which the control plane read from the registry.
"""

from typing import Annotated

import msgspec

from lightpd.common.wire.sampling_params import SamplingParams

# 3: the Lease; a node of 3 aborts the requests of a control plane that stops
# renewing it, so it must not serve a control plane of 2, which never does.
# 4: prefix caching: Reserved says how much of the prompt the decode node holds,
# a Prefill's target sends only the rest; cache events (CacheSync, CacheEvents);
# SamplingParams.grammar (a node of 3 would ignore it and sample unconstrained).
PROTOCOL_VERSION = 4
MAX_PROMPT_TOKENS = 1 << 20
MAX_QUEUE_TIMEOUT_S = 3600.0
MAX_KV_TIMEOUT_S = 600.0

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
CallId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=64)]
Endpoint = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^tcp://[^\s/]+:[0-9]{1,5}$")]
Text = Annotated[str, msgspec.Meta(max_length=1 << 16)]
Prompt = Annotated[list[TokenId], msgspec.Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
Outputs = Annotated[tuple[TokenId, ...], msgspec.Meta(max_length=MAX_PROMPT_TOKENS)]
QueueTimeout = Annotated[float, msgspec.Meta(ge=0, le=MAX_QUEUE_TIMEOUT_S)]
KVTimeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_KV_TIMEOUT_S)]


class ProtocolError(ValueError):
    """A message that cannot be accepted; the text says why."""


class Message(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    version: int = PROTOCOL_VERSION


class KVLayout(msgspec.Struct, frozen=True):
    """What a KV byte stream means; sender and receiver must agree on all of it."""

    model_fingerprint: Annotated[str, msgspec.Meta(max_length=64)]
    dtype: Annotated[str, msgspec.Meta(max_length=16)]
    num_layers: Count
    num_kv_heads: Count
    head_dim: Count

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over every layer."""
        width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype, 1)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * width

    def describe_mismatch(self, other: "KVLayout") -> str | None:
        diffs = [
            f"{field}: {getattr(self, field)!r} here, {getattr(other, field)!r} there"
            for field in self.__struct_fields__
            if getattr(self, field) != getattr(other, field)
        ]
        return "; ".join(diffs) or None


class TokenLogprobs(msgspec.Struct, array_like=True):
    token_id: TokenId
    logprob: float
    top: Annotated[list[tuple[TokenId, float]], msgspec.Meta(max_length=20)] = []


# ---- control plane -> decode node ----


class Reserve(Message, tag="reserve"):
    """Hold KV slots for a request's prompt; answered by Reserved once admitted.

    The request waits in the node's queue, in order, for up to ``queue_timeout_s``;
    once admitted, its KV must be complete within ``kv_timeout_s``. Its KV, first
    token and abort must carry ``secret``. Its tokens go back to the sender.

    With ``prefill_here`` the decode node computes the prompt itself (no prefill
    node, or a short prompt): no KV will come, and its first token is its own.

    ``output_token_ids`` (with ``prefill_here`` only) resumes a request that
    another decode node was generating: the tokens it already streamed, which
    this node recomputes after the prompt and counts as output (the sampling
    step, penalties, max and min tokens), so the stream continues exactly."""

    call_id: CallId
    request_id: Id
    secret: Secret
    prompt_token_ids: Prompt
    params: SamplingParams
    queue_timeout_s: QueueTimeout = 180.0
    kv_timeout_s: KVTimeout = 30.0
    prefill_here: bool = False
    output_token_ids: Outputs = ()


Transport = Annotated[str, msgspec.Meta(max_length=16)]  # "zmq", "nccl" or "gloo"


class Reserved(Message, tag="reserved"):
    """Slots are held. The decode node has the KV of the prompt's first
    ``num_cached_tokens`` tokens already (its prefix cache): only the rest comes."""

    call_id: CallId
    request_id: Id
    kv_endpoint: Endpoint
    layout: KVLayout
    kv_transport: Transport = "zmq"  # how the receiver takes KV tensors
    num_cached_tokens: Count = 0

    def target(self) -> "KVTarget":
        """Where the prefill node sends this reservation's KV, and what it skips."""
        return KVTarget(self.kv_endpoint, self.layout, self.kv_transport, self.num_cached_tokens)


# ---- control plane -> prefill node ----


class KVTarget(msgspec.Struct, frozen=True):
    """Where a prompt's KV goes; the receiver holds its first ``skip_tokens``
    already (its Reserved's ``num_cached_tokens``), so they are not sent."""

    endpoint: Endpoint
    layout: KVLayout
    transport: Transport = "zmq"
    skip_tokens: Count = 0


class Prefill(Message, tag="prefill"):
    """Compute the prompt's KV and send it to ``target`` under ``secret`` (the
    reservation's); the same secret aborts it here."""

    call_id: CallId
    request_id: Id
    secret: Secret
    prompt_token_ids: Prompt
    params: SamplingParams  # seed must be set, so decode continues the same stream
    target: KVTarget
    ack_timeout_s: KVTimeout = 30.0  # free the KV if the decode node never acknowledges


class Accepted(Message, tag="accepted"):
    call_id: CallId
    request_id: Id


# ---- prefill node -> decode node (kv socket) ----


class KVLayer(Message, tag="kv_layer"):
    """Header of one layer's K and V for positions [start, start + num_tokens);
    followed by two raw frames, K then V, each [num_tokens, num_kv_heads, head_dim],
    or, with ``group_tag``, sent as one tensor [2, num_tokens, ...] over the pair's
    torch.distributed group under that tag."""

    request_id: Id
    secret: Secret
    layout: KVLayout
    layer: Count
    start: Count
    num_tokens: Count
    group_tag: Count | None = None


class KVGroupHello(Message, tag="kv_group_hello"):
    """A sender asks for a torch.distributed group (NCCL or Gloo) with the receiver;
    ``pair_id`` is secret (it was sent over CURVE) and names the group's keys."""

    pair_id: Secret
    backend: Annotated[str, msgspec.Meta(max_length=8)]


class KVGroupReady(Message, tag="kv_group_ready"):
    """The receiver is joining the group: its store listens on ``store_port``."""

    pair_id: Secret
    store_port: Count


class PrefillDone(Message, tag="prefill_done"):
    """All layers sent; the first generated token. ``num_prompt_tokens`` counts the
    positions sent (the prompt less the receiver's cached prefix)."""

    request_id: Id
    secret: Secret
    layout: KVLayout
    num_prompt_tokens: Count
    first_token: TokenId
    logprobs: TokenLogprobs | None = None
    num_cached_tokens: Count = 0  # prompt tokens the sender took from its prefix cache


class KVAck(Message, tag="kv_ack"):
    request_id: Id
    error: Text | None = None


# ---- nodes -> control plane (back over the request's own connection) ----


class TokenEvent(msgspec.Struct, kw_only=True):
    request_id: Id
    token_ids: list[TokenId] = []
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    error: Text | None = None
    # For errors before the first token: whether another node may succeed (the KV
    # transfer failed) or the request itself is at fault (it would fail anywhere).
    retry: bool = False
    num_prompt_tokens: Count = 0
    num_output_tokens: Count = 0
    num_cached_tokens: Count = 0  # prompt tokens the sender's prefix cache held


class Tokens(Message, tag="tokens"):
    """One step's news for all requests of one destination."""

    node_id: Id
    events: Annotated[list[TokenEvent], msgspec.Meta(max_length=1 << 16)]


# ---- control plane -> any node ----


class Abort(Message, tag="abort"):
    request_id: Id
    secret: Secret


class HealthCheck(Message, tag="health_check"):
    call_id: CallId


# How often a control plane renews its lease with each node it is connected to.
LEASE_RENEW_S = 1.0


class Lease(Message, tag="lease"):
    """The control plane on this connection is alive. Not answered. A node takes a
    control plane that sent nothing at all (no Lease, no other message) for its
    lease time for gone, and aborts the requests that came over its connection."""


class NodeStats(msgspec.Struct, kw_only=True):
    """A node's load, refreshed by its loop; sent in heartbeats and health answers.
    Free slots include cached KV that no request uses (it is evicted on demand)."""

    num_free_slots: Count
    num_reserved_slots: Count  # held for KV in transit
    num_running: Count
    num_queued: Count
    num_queued_tokens: Count
    tokens_per_s: float
    loop_age_s: float = 0.0  # since the serving loop last went round
    num_preemptions: Count = 0  # requests paused for KV room since the node started
    # Prefix cache: slots it holds now; prompt tokens admitted since the node
    # started, and how many of those came from the cache.
    num_cached_slots: Count = 0
    num_prompt_tokens: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 0
    num_cached_prompt_tokens: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 0


class NodeStatus(msgspec.Struct, kw_only=True):
    """A node as it describes itself: its identity (what it registers with) and its
    stats (what its heartbeats and health answers carry). The one shape of both."""

    node_id: Id
    role: Annotated[str, msgspec.Meta(max_length=16)]
    control_endpoint: Endpoint
    kv_endpoint: Endpoint | None
    model_fingerprint: Annotated[str, msgspec.Meta(max_length=64)]
    model_name: Annotated[str, msgspec.Meta(max_length=256)]
    device: Annotated[str, msgspec.Meta(max_length=64)]
    num_slots: Count
    max_model_len: Count
    kv_transport: Transport
    layout: KVLayout
    stats: NodeStats
    # Expert parallelism: the node's group (where it meets, HOST:PORT), its place in it.
    ep_group: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    ep_rank: Count = 0
    ep_size: Count = 1
    restarts: Count = 0  # times a supervisor started this node again

    def registration(self) -> dict:
        """The identity fields, as the control plane's registry takes them."""
        fields = msgspec.structs.asdict(self)
        del fields["layout"], fields["stats"]
        return fields


# ---- prefix cache events (node -> control plane) ----

BlockHash = int  # 64-bit signed (msgpack carries no wider integer)
MAX_BLOCK_HASHES = 1 << 16  # per message; a larger snapshot takes several


class CacheSync(Message, tag="cache_sync"):
    """A control plane asks for the names of every block this node's prefix cache
    holds (``common.wire.prefix_blocks``), then for news of each change."""


class CacheEvents(Message, tag="cache_events"):
    """Blocks the node's prefix cache stored and removed since its last message to
    this control plane. ``seq`` counts this node's messages to it from 0, so a gap
    says one was lost (then it asks again with CacheSync). ``reset``: the first
    message of a snapshot; forget what this node said before."""

    node_id: Id
    seq: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    reset: bool = False
    stored: Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_BLOCK_HASHES)] = []
    removed: Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_BLOCK_HASHES)] = []


class Health(Message, tag="health"):
    call_id: CallId
    status: NodeStatus


class Error(Message, tag="error", kw_only=True):
    """A refusal. ``code`` says what the caller may do: "busy" (the node's queue is
    full or the wait ran out: try elsewhere or later), "invalid" (the request
    itself is wrong: do not retry), or None (an error about the message)."""

    call_id: CallId | None = None
    request_id: Id | None = None
    code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    message: Text


AnyMessage = (
    Reserve
    | Reserved
    | Prefill
    | Accepted
    | KVLayer
    | KVGroupHello
    | KVGroupReady
    | PrefillDone
    | KVAck
    | Tokens
    | Abort
    | HealthCheck
    | Lease
    | CacheSync
    | CacheEvents
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
    return message


def _version_error(version: object) -> str:
    return f"protocol version {version!r} is not supported; this node speaks {PROTOCOL_VERSION}"


def _peek_version(frame: bytes | memoryview) -> object:
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError):
        return None
    return raw.get("version") if isinstance(raw, dict) else None
