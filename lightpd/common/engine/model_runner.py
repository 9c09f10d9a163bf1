"""Runs a scheduled batch: builds the forward context, runs the model, samples."""

import logging
import os
from collections.abc import Callable

import torch

from lightpd.common.engine.config import EngineConfig, ExpertParallelConfig
from lightpd.common.engine.context import ForwardContext, forward_context
from lightpd.common.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from lightpd.common.engine.expert_parallel import ExpertParallelGroup
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.loader import load_model
from lightpd.common.engine.memory_plan import MemoryPlan, measure_peak_bytes, sampler_bytes
from lightpd.common.engine.model_config import ModelConfig, parse_dtype
from lightpd.common.engine.req_table import RequestTable
from lightpd.common.engine.sampler import Sampler
from lightpd.common.engine.sampling_inputs import SamplingInputs
from lightpd.common.engine.scheduler import ScheduledBatch
from lightpd.common.wire.identity import model_fingerprint

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_SLOTS = 16384


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} absent: {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", device.index or 0)  # memory queries need an index
    return device


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = model_config.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.expert_parallel: ExpertParallelGroup | None = None
        if config.expert_parallel is None:
            self.model = load_model(config.model, model_config, self.dtype, self.device)
        else:
            self.expert_parallel = self._load_expert_parallel(config.expert_parallel)
        self.sampler = Sampler(model_config.vocab_size, self.device)
        self.sampling_inputs = SamplingInputs(
            config.max_num_reqs, model_config.vocab_size, self.device
        )
        self.graph_max_batch = min(config.cuda_graph_max_batch, config.max_num_reqs)
        if self.expert_parallel is not None and self.device.type == "cuda":
            # The members capture, and replay, the same graphs together.
            wanted = self.graph_max_batch if self.expert_parallel.config.cuda_graphs else 0
            self.graph_max_batch = self.expert_parallel.smallest(wanted)
        use_graphs = self.device.type == "cuda" and self.graph_max_batch > 0
        num_slots = self._num_kv_slots(use_graphs)
        self.max_model_len = self._max_model_len(num_slots)
        self.pool, self.table = self._make_pool_and_table(num_slots, self.max_model_len)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = self._capture_graphs(graph_batch_sizes(self.graph_max_batch))

    def close(self) -> None:
        """Destroy the CUDA graphs now rather than whenever the runner is collected."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _load_expert_parallel(self, config: ExpertParallelConfig) -> ExpertParallelGroup:
        """Load this member's share of the experts, then meet the group (blocking until
        every member has loaded its own)."""
        group = ExpertParallelGroup(config, self.device)
        if self.device.type == "cpu":
            # Members wait on each other at every layer: threads of one spinning on
            # shared cores would starve the others, so each takes its share of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.size))
        self.model = load_model(
            self.config.model, group.shard(self.model_config), self.dtype, self.device
        )
        group.attach(self.model)
        group.join(f"model {model_fingerprint(self.config.model)} in {self.dtype}")
        return group

    def _make_pool_and_table(
        self, num_slots: int, max_model_len: int
    ) -> tuple[TokenKVPool, RequestTable]:
        mc = self.model_config
        pool = TokenKVPool(
            num_slots, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device
        )
        # One spare column: the token sampled at the last position is written there.
        table = RequestTable(self.config.max_num_reqs, max_model_len + 1, self.device)
        return pool, table

    def _capture_graphs(self, batch_sizes: list[int]) -> DecodeGraphs:
        """Decode graphs over the current pool and table, for contexts up to the table's width."""
        graphs = DecodeGraphs(
            self.model,
            self.pool,
            self.table,
            batch_sizes,
            self.table.max_context_len - 1,
            self.model_config.vocab_size,
            self.dtype,
        )
        if self.expert_parallel is None:
            graphs.capture()
        else:
            # Every member captures the same sizes, exchanges and all, in step.
            self.expert_parallel.before_abort(graphs.release)
            graphs.capture(self.expert_parallel.uniform_step)
        return graphs

    def _num_kv_slots(self, use_graphs: bool) -> int:
        if self.config.num_kv_slots is not None:
            return self.config.num_kv_slots
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_SLOTS
        plan = self._plan_memory(use_graphs)
        logger.info("memory plan: %s", plan.describe())
        if plan.num_kv_slots < 2:
            raise ValueError(f"no GPU memory left for the KV cache: {plan.describe()}")
        return plan.num_kv_slots

    def _plan_memory(self, use_graphs: bool) -> MemoryPlan:
        """Measure a full prefill step and the largest decode graph on a scratch pool."""
        free, total = torch.cuda.mem_get_info(self.device)
        num_tokens = min(self.config.max_prefill_tokens, self.model_config.max_position_embeddings)
        self.pool, self.table = self._make_pool_and_table(num_tokens, num_tokens)

        def prefill() -> None:
            if self.expert_parallel is not None:  # the group plans at once, as one step
                self.expert_parallel.agree(num_tokens)
            self.prompt_logits([[0] * num_tokens])

        def capture() -> None:
            self._capture_graphs([self.graph_max_batch])  # dropped on return

        try:
            prefill_peak = measure_peak_bytes(self.device, prefill)
            graph_bytes = measure_peak_bytes(self.device, capture) if use_graphs else 0
        finally:
            del self.pool, self.table
            torch.cuda.empty_cache()
        return MemoryPlan(
            total_bytes=total,
            free_bytes=free,
            prefill_peak_bytes=prefill_peak,
            graph_bytes=graph_bytes,
            sampler_bytes=sampler_bytes(self.config.max_num_reqs, self.model_config.vocab_size),
            # In the pool's dtype, which need not be the checkpoint's.
            kv_bytes_per_token=self._kv_bytes_per_token(),
            gpu_memory_fraction=self.config.gpu_memory_fraction,
        )

    def _kv_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * itemsize

    def _max_model_len(self, num_slots: int) -> int:
        limits = [self.model_config.max_position_embeddings, num_slots]
        if self.config.max_model_len is not None:
            limits.append(self.config.max_model_len)
        if self.model_config.sliding_window is not None:
            # Our kernels attend to the whole context; past the window that would
            # differ from the model, so the window bounds the context instead.
            limits.append(self.model_config.sliding_window)
        return min(limits)

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, kv_saved: Callable[[int], None] | None = None
    ) -> list[list[float]]:
        """Run ``batch`` and sample; returns one row per sampling request (one host sync).
        ``kv_saved(layer)`` is called right after each layer's K/V are written."""
        try:
            return self._run(batch, kv_saved)
        except Exception:
            # Copies out of the pinned sampling buffers may still be queued: they
            # must retire before the next step refills the buffers.
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            raise

    def _run(
        self, batch: ScheduledBatch, kv_saved: Callable[[int], None] | None
    ) -> list[list[float]]:
        samples = batch.samples
        rows = [r.row for r in batch.requests]
        graphs = self.graphs
        size = self._graph_size(batch.is_prefill, len(rows))
        if size is not None:
            # Every decode request samples; the graph's inputs give the rows and ends.
            logits = graphs.replay(rows, batch.ends, size)
            if self.expert_parallel is not None:
                self.expert_parallel.finish_replay()
            sample_rows, sample_ends = graphs.input_rows(len(rows))
            sampling = batch.requests
        else:
            logits = self.forward(
                batch.is_prefill, rows, batch.starts, batch.ends, samples, kv_saved
            )
            sampling = [r for r, s in zip(batch.requests, samples, strict=True) if s]
            if not sampling:
                return []
            sample_rows = torch.tensor([r.row for r in sampling], device=self.device)
            sample_ends = torch.tensor([r.num_tokens for r in sampling], device=self.device)
        out = self.sampler(logits, self.sampling_inputs.build(sampling, self.table))
        self.table.token_ids[sample_rows, sample_ends] = out.token_ids.int()
        return out.pack().tolist()

    def _graph_size(self, is_prefill: bool, num_reqs: int) -> int | None:
        """The decode graph this step replays, None to run it eagerly. In an
        expert-parallel group every member replays the same one, or none."""
        graphs = self.graphs
        group = self.expert_parallel
        if graphs is None or is_prefill:
            return None
        if group is not None:
            if not group.all_decoding:
                return None
            num_reqs = max(group.token_counts)  # a decode request is one token
        return graphs.padded_size(num_reqs) if num_reqs <= graphs.max_batch_size else None

    @torch.inference_mode()
    def forward(
        self,
        is_prefill: bool,
        rows: list[int],
        starts: list[int],
        ends: list[int],
        want_logits: list[bool],
        kv_saved: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Compute positions ``[starts[i], ends[i])`` of the requests in ``rows``,
        whose tokens and slots are already in the table; logits [N, V] of the last
        position of each request with ``want_logits``."""
        device = self.device
        rows_t = torch.tensor(rows, device=device)
        starts_t = torch.tensor(starts, device=device)
        ends_t = torch.tensor(ends, device=device)
        lens = ends_t - starts_t
        cu_seqlens = torch.nn.functional.pad(lens.cumsum(0), (1, 0))  # (B+1,)
        num_tokens = int(sum(e - s for s, e in zip(starts, ends, strict=True)))
        # (T,) the request row and position of every packed token
        token_rows = rows_t.repeat_interleave(lens, output_size=num_tokens)
        offsets = (starts_t - cu_seqlens[:-1]).repeat_interleave(lens, output_size=num_tokens)
        positions = torch.arange(num_tokens, device=device) + offsets
        ctx = ForwardContext(
            is_prefill=is_prefill,
            kv_pool=self.pool,
            req_to_token=self.table.req_to_token,
            req_indices=rows_t,
            seq_lens=ends_t,
            out_slots=self.table.req_to_token[token_rows, positions],
            max_seq_len=max(ends),
            cu_seqlens_q=cu_seqlens if is_prefill else None,
            max_seqlen_q=max(e - s for s, e in zip(starts, ends, strict=True)),
            kv_saved=kv_saved,
        )
        input_ids = self.table.token_ids[token_rows, positions]
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)  # (T, H)
        if self.expert_parallel is not None:
            self.expert_parallel.finish_step()
        # Rows of the last token of each request that wants logits, built on the host:
        # indexing with a boolean mask on the device would cost a sync.
        last_rows, end = [], 0
        for start, stop, wanted in zip(starts, ends, want_logits, strict=True):
            end += stop - start
            if wanted:
                last_rows.append(end - 1)
        return self.model.compute_logits(
            hidden[torch.tensor(last_rows, dtype=torch.long, device=device)]
        )

    @torch.inference_mode()
    def empty_step(self) -> None:
        """Expert parallelism: take part in a step of the group with no batch here,
        in the others' decode graph when they replay one."""
        size = self._graph_size(False, 0)
        if size is None:
            self.expert_parallel.empty_step()
        else:
            self.graphs.replay([], [], size)  # the padding request only
            self.expert_parallel.finish_replay()

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] at the last position of each prompt, in one packed prefill.
        Borrows rows and slots for the pass and gives them back."""
        rows = [self.table.allocate_row() for _ in prompts]
        slots = self.pool.allocate(sum(map(len, prompts)))
        try:
            offset = 0
            for row, prompt in zip(rows, prompts, strict=True):
                n = len(prompt)
                self.table.token_ids[row, :n] = torch.tensor(prompt, dtype=torch.int32)
                self.table.req_to_token[row, :n] = slots[offset : offset + n]
                offset += n
            ends = [len(p) for p in prompts]
            return self.forward(True, rows, [0] * len(prompts), ends, [True] * len(prompts))
        finally:
            self.pool.free(slots)
            for row in rows:
                self.table.free_row(row)
