"""Decode steps replayed from CUDA graphs, one graph per batch size of a ladder.

A decode step of a small batch is mostly kernel launches: an 8B model launches
about 400 kernels a step, which at several microseconds each is longer than the
step's memory traffic at batch 1. Capturing the step once per batch size and
replaying it costs one launch. A batch is padded to the next captured size with
a dummy request that owns one KV slot and attends to it; its logits are dropped.

The graph reads its inputs from two static device rows (request rows and
sequence lengths), filled by one host-to-device copy per step from pinned memory,
and gathers the token ids, positions and output slots from the request table
inside the graph, so a step costs no other copies and no host sync.
"""

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from lightpd.common.engine.context import ForwardContext, forward_context
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.req_table import RequestTable


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (and it)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


def decode_step(
    model: nn.Module,
    pool: TokenKVPool,
    table: RequestTable,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
) -> torch.Tensor:
    """Logits [B, V] of one decode token for each request in ``rows``; every input
    is read from the request table on the device, so the step can be captured."""
    positions = seq_lens - 1  # (B,) the new token sits at the last position
    ctx = ForwardContext(
        is_prefill=False,
        kv_pool=pool,
        req_to_token=table.req_to_token,
        req_indices=rows,
        seq_lens=seq_lens,
        out_slots=table.req_to_token[rows, positions],
        max_seq_len=max_seq_len,
    )
    with forward_context(ctx):
        hidden = model(table.token_ids[rows, positions], positions)  # (B, H)
    return model.compute_logits(hidden)


class DecodeGraphs:
    """Captured decode steps, one for each of ``batch_sizes`` (ascending).

    The padding request lives in the table's padding row and the pool's padding
    slot, which are never handed out. ``max_seq_len`` bounds the contexts it will
    see: the attention's grid is fixed at capture, for that bound.
    """

    def __init__(
        self,
        model: nn.Module,
        pool: TokenKVPool,
        table: RequestTable,
        batch_sizes: list[int],
        max_seq_len: int,
        vocab_size: int,
        dtype: torch.dtype,
    ) -> None:
        device = pool.device
        self.model, self.pool, self.table = model, pool, table
        self.max_seq_len = max_seq_len
        self.batch_sizes = batch_sizes
        max_batch_size = batch_sizes[-1]
        # The padding request: one token at position 0, in the pool's padding slot.
        self.dummy_row = table.padding_row
        table.req_to_token[self.dummy_row, 0] = pool.padding_slot
        table.token_ids[self.dummy_row, 0] = 0
        # (2, max_bs): request rows, then sequence lengths; padding = the dummy request.
        self.inputs = torch.tensor(
            [[self.dummy_row] * max_batch_size, [1] * max_batch_size], device=device
        )
        self._staging = torch.empty((2, max_batch_size), dtype=torch.int64, pin_memory=True)
        self.logits = torch.empty((max_batch_size, vocab_size), dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_pool = None
        # Destroys the graphs now, or at the interpreter's exit at the latest: NCCL
        # waits forever, in its abort too, to let go of a communicator while a graph
        # holding its collectives lives (expert parallelism's exchanges).
        self.release = weakref.finalize(self, _destroy, self.graphs)

    def capture(
        self, step_scope: Callable[[int], AbstractContextManager] = lambda size: nullcontext()
    ) -> None:
        """Capture every size, largest first, so that the smaller graphs reuse its memory.
        ``step_scope(size)`` is entered around each step of that size run or captured
        here (expert parallelism: a step of the group, whose members capture together)."""
        for size in reversed(self.batch_sizes):
            with step_scope(size):
                self._step(size)  # compiles kernels and picks cuBLAS algorithms outside capture
            torch.cuda.synchronize(self.pool.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA call (a KV connector's copy, a pinned
            # allocation) must not invalidate this capture, and this capture must not
            # fail theirs. torch collects garbage right before it begins; none is
            # collected during it, since freeing an old engine's graphs or memory is
            # an operation a capturing stream forbids.
            capturing = torch.cuda.graph(
                graph, pool=self.memory_pool, capture_error_mode="thread_local"
            )
            with step_scope(size), _no_garbage_collection(), capturing:
                self._step(size)
            if self.memory_pool is None:
                self.memory_pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.pool.device)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, num_reqs: int) -> int:
        return next(s for s in self.batch_sizes if s >= num_reqs)

    def replay(self, rows: list[int], seq_lens: list[int], size: int | None = None) -> torch.Tensor:
        """Logits [B, V] of one decode step of ``rows`` whose contexts end at ``seq_lens``
        (the new token included), in the graph of ``size`` (by default the smallest that
        fits). Returns a view that the next replay overwrites."""
        num_reqs = len(rows)
        size = size or self.padded_size(num_reqs)
        # The previous step's host sync has retired the copy out of this staging
        # buffer, so it can be refilled.
        staging = self._staging
        staging[0, :num_reqs] = torch.tensor(rows)
        staging[1, :num_reqs] = torch.tensor(seq_lens)
        staging[0, num_reqs:size] = self.dummy_row
        staging[1, num_reqs:size] = 1
        self.inputs[:, :size].copy_(staging[:, :size], non_blocking=True)
        self.graphs[size].replay()
        return self.logits[:num_reqs]

    def input_rows(self, num_reqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and sequence lengths of the last replay, on the device."""
        return self.inputs[0, :num_reqs], self.inputs[1, :num_reqs]

    def _step(self, size: int) -> None:
        rows, seq_lens = self.inputs[0, :size], self.inputs[1, :size]
        logits = decode_step(self.model, self.pool, self.table, rows, seq_lens, self.max_seq_len)
        self.logits[:size].copy_(logits)


@contextmanager
def _no_garbage_collection() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _destroy(graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
    for graph in graphs.values():
        graph.reset()  # a replay still running is freed when it ends
    graphs.clear()
