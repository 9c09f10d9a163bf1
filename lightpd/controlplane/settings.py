"""Control plane settings, read once from LIGHTPD_* environment variables."""

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTPD_", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections to Redis at most; a request that finds them all busy waits for one
    # (up to redis_wait_s) instead of failing, so a burst of requests queues, not errors.
    redis_max_connections: int = 64
    redis_wait_s: float = 30.0
    host: str = "127.0.0.1"
    port: int = 8000
    # The fleet's model: its tokenizer and chat template are used here, and nodes
    # serving any other model are refused.
    model: Path
    served_model_name: str | None = None
    # Comma-separated API keys; empty means the OpenAI API is open.
    api_keys: str = ""
    admin_token: str = Field(min_length=1)
    cluster_token: str = Field(min_length=1)
    node_ttl_s: float = 6.0  # a node without a heartbeat for this long is gone
    # A node whose serving loop has not gone round for this long is dead, however
    # regularly its heartbeat thread reports.
    node_stall_s: float = Field(30.0, gt=0)
    # The one place the hand-off's timeouts are set; the nodes get them in each
    # Reserve and Prefill. A request waits for a decode node's slots, in order, up
    # to queue_timeout_s, then gets a 503 with Retry-After.
    queue_timeout_s: float = Field(180.0, ge=0, le=3600)
    # At most this many requests of this control plane wait for slots at once; more
    # get a 503 with Retry-After at once.
    max_queued: int = Field(1024, ge=0)
    kv_timeout_s: float = Field(30.0, gt=0, le=600)  # admitted, until its KV is complete
    max_attempts: int = 3  # failed tries on live nodes (busy, failed hand-offs) per request
    # Prompts of which at most this many tokens are not in their decode node's prefix
    # cache are prefilled on that node, which saves the hand-off where it costs more
    # than it spares (a short prompt, or a long one whose start the node holds); 0:
    # only when no prefill node can take the request (a fleet without any is colocated). 128 from
    # the two-H200 figures (docs/benchmarks.md, issue 13): the hand-off adds 6-16 ms
    # to a first token whatever the prompt's length, while 128 tokens of an 8B model
    # take about 3.5 ms of a decode step (a 512-token prompt prefilled locally shows
    # as 57-60 ms ITL p99 at 32 req/s, 14 ms when handed off).
    local_prefill_tokens: int = Field(128, ge=0)
    # Count what a node's prefix cache holds of a prompt as work it need not do
    # (False: by load alone); a prefill node holding the most takes the request
    # unless its queue is cache_balance_tokens longer than the shortest.
    cache_aware_routing: bool = True
    cache_balance_tokens: int = Field(8192, ge=0)
    # Larger request bodies are refused (413) before they are read whole: the chat
    # template and the tokenizer take time in proportion to the body.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    # Slow clients: a request body must be whole within body_timeout_s (else 408),
    # headers within header_timeout_s of the connection's start or of the previous
    # response (else it is closed); past max_connections in all (default: the file
    # descriptor limit less 256) or max_connections_per_client from one address, a
    # new connection gets a 503 with Retry-After and is closed.
    body_timeout_s: float = Field(30.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    max_connections: int | None = Field(None, ge=1)
    max_connections_per_client: int = Field(1024, ge=1)
    # Whose prefixes a request may share (tenancy.py): "tenant" (the default), only
    # those of requests with the same API key (or the same tenant_header value, when
    # a trusted proxy names tenants), narrowed further by a request's cache_salt;
    # "fleet", every request's (cache_salt still narrows).
    prefix_cache_scope: Literal["tenant", "fleet"] = "tenant"
    tenant_header: str | None = None
    # Nodes share themselves among tenants by weight (1 unless named here, as JSON:
    # {"<API key id or tenant header value>": weight}).
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    # At most this many output tokens in one request: n (or best_of) x prompts x
    # max_tokens (without max_tokens, the model's context bounds each sequence).
    max_request_tokens: int = Field(16 * 65536, ge=1)
    # /docs, /redoc and /openapi.json map the whole API for anyone who asks: off
    # unless an operator turns them on.
    api_docs: bool = False
    # On SIGTERM or SIGINT the API refuses new requests (503 with Retry-After) and
    # those running get this long to finish; the rest then end with an error (a
    # stream with an error event and [DONE]) and are aborted on their nodes.
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600)

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a model directory (no config.json)")
        return value

    @cached_property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name

    @cached_property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
