"""Bodies of the node and admin APIs."""

from typing import Literal

from pydantic import BaseModel, Field

NodeRole = Literal["prefill", "decode"]
# "migrating": draining, and its running requests are moved to other nodes now.
NodeStatus = Literal["ready", "draining", "migrating", "dead"]


class NodeRegistration(BaseModel):
    node_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    role: NodeRole
    control_endpoint: str = Field(pattern=r"^tcp://[^\s]+:\d+$")
    kv_endpoint: str | None = Field(default=None, pattern=r"^tcp://[^\s]+:\d+$")
    model_fingerprint: str = Field(max_length=64)
    model_name: str = Field(max_length=256)
    device: str = Field(max_length=64)
    num_slots: int = Field(ge=1)
    max_model_len: int = Field(ge=2)
    kv_transport: str = Field("zmq", max_length=16)  # how it takes KV tensors
    # Expert parallelism: the group a decode node belongs to (its rendezvous
    # HOST:PORT) and its place in it; none for a node holding every expert.
    ep_group: str | None = Field(None, max_length=256)
    ep_rank: int = Field(0, ge=0)
    ep_size: int = Field(1, ge=1)
    restarts: int = Field(0, ge=0)  # times a supervisor started this node again


class NodeStats(BaseModel):
    num_free_slots: int = Field(ge=0)
    num_reserved_slots: int = Field(ge=0)
    num_running: int = Field(ge=0)
    num_queued: int = Field(ge=0)
    num_queued_tokens: int = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    loop_age_s: float = Field(0.0, ge=0)  # since the serving loop last went round
    num_preemptions: int = Field(0, ge=0)  # since the node started
    # Prefix cache: slots it holds; prompt tokens admitted since the node started,
    # and how many of those it found cached.
    num_cached_slots: int = Field(0, ge=0)
    num_prompt_tokens: int = Field(0, ge=0)
    num_cached_prompt_tokens: int = Field(0, ge=0)

    @property
    def cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens that came from the prefix cache."""
        return (
            self.num_cached_prompt_tokens / self.num_prompt_tokens
            if self.num_prompt_tokens
            else 0.0
        )


class NodeJoin(NodeRegistration):
    """A registration as a node sends it: with the secret of its session, which
    its heartbeats present (kept hashed, never shown)."""

    session: str = Field(min_length=16, max_length=64)


class NodePublic(NodeRegistration):
    status: NodeStatus
    stats: NodeStats | None = None
    registered_at: float
    last_heartbeat: float


class HeartbeatReply(BaseModel):
    status: NodeStatus
    heartbeat_s: float


RequestState = Literal[
    "queued", "prefilling", "transferring", "decoding", "finished", "failed", "aborted"
]


class TimelineStep(BaseModel):
    state: RequestState
    at: float  # Unix time the request entered the state


class RequestPublic(BaseModel):
    """A request as the admin API shows it: where it is, where it ran, what it cost."""

    request_id: str
    state: RequestState
    timeline: list[TimelineStep]
    prompt_tokens: int = 0
    max_tokens: int | None = None
    output_tokens: int | None = None
    prefill_node: str | None = None
    decode_node: str | None = None
    attempts: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None
