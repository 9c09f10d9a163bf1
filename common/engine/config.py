from dataclasses import dataclass


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
    cuda_graph_max_batch: int = 256
    max_num_reqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_prefill_tokens: int = 8192  # prefill token budget of one step; longer prompts are chunked
    seed: int = 0  # draws the seeds of requests that bring none

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
