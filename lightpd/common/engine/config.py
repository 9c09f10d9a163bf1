from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertParallelConfig:
    """This engine's place in an expert-parallel group: ``size`` engines (one per
    device), each holding 1/size of every MoE layer's experts, its own requests and KV.

    ``init`` is HOST:PORT of the group's rendezvous store, which member 0 runs; the
    members find each other there under a key derived from ``cluster_token``, so
    only fleet members join. ``host`` is the address this member's Gloo sockets
    take (the others must reach it)."""

    size: int
    rank: int
    init: str
    cluster_token: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    # A collective (an agreement or an MoE layer's exchange) that takes longer than
    # this fails the group: a member died or hangs.
    timeout_s: float = 10.0
    # How long members wait for each other to start (model loading included).
    join_timeout_s: float = 300.0
    # Decode steps replay CUDA graphs on every member together (GPUs): 1.1-1.8x the
    # eager group's speed on two H200s, but a member that dies while the others'
    # graphs wait in an exchange was seen to leave a survivor stuck after it
    # detected the failure (docs/benchmarks.md). Off: eager steps, whose failures
    # never hang.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"--ep-size must be at least 2 for a group, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"--ep-rank must be in 0..{self.size - 1}, got {self.rank}")
        host, _, port = self.init.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--ep-init must be HOST:PORT, got {self.init!r}")
        if not self.cluster_token:
            raise ValueError("an expert-parallel group needs the cluster token")
        if self.timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ValueError("expert-parallel timeouts must be positive")

    @property
    def store_address(self) -> tuple[str, int]:
        host, _, port = self.init.rpartition(":")
        return host.strip("[]"), int(port)

    def local_experts(self, num_experts: int) -> range:
        """The experts this member holds: a contiguous 1/size of them (sizes differ by
        at most one when size does not divide num_experts)."""
        if num_experts < self.size:
            raise ValueError(
                f"an expert-parallel group of {self.size} needs at least {self.size} experts "
                f"per layer; this model has {num_experts}"
            )
        first = self.rank * num_experts // self.size
        return range(first, (self.rank + 1) * num_experts // self.size)


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (in-process, or inside a node) runs its model."""

    model: str
    device: str = "auto"  # "auto": the first GPU if there is one, else the CPU
    dtype: str = "auto"  # "auto": the checkpoint's dtype
    # KV pool size in tokens. None: from free GPU memory, or 16384 on the CPU.
    num_kv_slots: int | None = None
    # Share of the whole GPU this engine may fill: weights, activations, CUDA graphs and
    # the KV pool, which gets what is left after the others are measured.
    gpu_memory_fraction: float = 0.9
    # Decode batches up to this size replay CUDA graphs (on CUDA); 0 runs eagerly.
    # Under expert parallelism the members replay graphs of the same size together.
    cuda_graph_max_batch: int = 256
    max_num_reqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_prefill_tokens: int = 8192  # prefill token budget of one step; longer prompts are chunked
    seed: int = 0  # draws the seeds of requests that bring none
    # Keep computed KV in a radix tree over token ids so that later requests with the
    # same leading tokens reuse it: a prefill computes only the uncached suffix, and a
    # reservation receives only the positions it does not hold already.
    enable_prefix_cache: bool = True
    # A member of an expert-parallel group (MoE models); None: all experts here.
    expert_parallel: ExpertParallelConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(
                f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}"
            )
        for name in ("num_kv_slots", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be at least 2, got {value}")
        if self.max_num_reqs < 1:
            raise ValueError(f"max_num_reqs must be at least 1, got {self.max_num_reqs}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(
                f"cuda_graph_max_batch must be 0 (off) or positive, got {self.cuda_graph_max_batch}"
            )
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be positive, got {self.max_prefill_tokens}")
