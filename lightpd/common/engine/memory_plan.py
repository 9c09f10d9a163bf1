"""How many KV slots fit on the GPU once everything else has been measured.

The pool gets what is left of ``gpu_memory_fraction`` of the card after the
weights (already loaded), the peak activations of the largest prefill step, the
CUDA graphs of the largest decode batch, and the sampler's working set. The two
middle terms are measured, not guessed: a prefill of ``max_prefill_tokens`` and
a graph capture run once against a scratch pool, which is freed before the real
pool is made.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The sampler holds a few fp32 (B, V) tensors at once (logits, probabilities,
# sorted copies for top-p, noise): this many.
_SAMPLER_COPIES = 8
# Headroom for the allocator's fragmentation and NCCL/cuBLAS workspaces.
_MARGIN_BYTES = 512 << 20


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    free_bytes: int  # after the weights
    prefill_peak_bytes: int
    graph_bytes: int
    sampler_bytes: int
    kv_bytes_per_token: int
    gpu_memory_fraction: float

    @property
    def kv_pool_bytes(self) -> int:
        kept_back = (1 - self.gpu_memory_fraction) * self.total_bytes
        others = self.prefill_peak_bytes + self.graph_bytes + self.sampler_bytes + _MARGIN_BYTES
        return int(self.free_bytes - kept_back - others)

    @property
    def num_kv_slots(self) -> int:
        return max(self.kv_pool_bytes // self.kv_bytes_per_token, 0)

    def describe(self) -> str:
        gib = 1 << 30
        return (
            f"GPU {self.total_bytes / gib:.1f} GiB, {self.free_bytes / gib:.1f} GiB free after "
            f"weights; prefill peak {self.prefill_peak_bytes / gib:.2f} GiB, CUDA graphs "
            f"{self.graph_bytes / gib:.2f} GiB, sampler {self.sampler_bytes / gib:.2f} GiB; "
            f"KV pool {self.kv_pool_bytes / gib:.1f} GiB = {self.num_kv_slots} tokens"
        )


def measure_peak_bytes(device: torch.device, work: Callable[[], None]) -> int:
    """Bytes the caching allocator held at the peak of ``work`` beyond what it held before."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device)
    torch.cuda.empty_cache()
    return max(peak - before, 0)


def sampler_bytes(max_batch_size: int, vocab_size: int) -> int:
    return _SAMPLER_COPIES * max_batch_size * vocab_size * 4
