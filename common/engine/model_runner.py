"""Runs a scheduled batch: builds the forward context, runs the model, samples."""

import logging

import torch

from common.context import ForwardContext, forward_context
from common.engine.config import EngineConfig
from common.engine.request import Request
from common.engine.scheduler import ScheduledBatch
from common.kv_pool import TokenKVPool
from common.loader import load_model
from common.model_config import ModelConfig, parse_dtype
from common.req_table import RequestTable
from common.sampler import Sampler, SamplingBatch

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
        self.model = load_model(config.model, model_config, self.dtype, self.device)
        num_slots = self._num_kv_slots()
        self.max_model_len = self._max_model_len(num_slots)
        self.pool = TokenKVPool(
            num_slots,
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            self.dtype,
            self.device,
        )
        # One spare column: the token sampled at the last position is written there.
        self.table = RequestTable(config.max_num_reqs, self.max_model_len + 1, self.device)
        self.sampler = Sampler(model_config.vocab_size, self.device)

    def _num_kv_slots(self) -> int:
        if self.config.num_kv_slots is not None:
            return self.config.num_kv_slots
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_SLOTS
        free, total = torch.cuda.mem_get_info(self.device)
        # Leave (1 - fraction) of the card, plus room for one prefill's activations.
        activations = 16 * self.config.max_prefill_tokens * self.model_config.hidden_size * 4
        budget = free - (1 - self.config.gpu_memory_fraction) * total - activations
        num_slots = int(budget // self.model_config.kv_bytes_per_token)
        if num_slots < 2:
            raise ValueError(
                f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free after weights)"
            )
        return num_slots

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
    def run(self, batch: ScheduledBatch) -> list[list[float]]:
        """Run ``batch`` and sample; returns one row per sampling request (one host sync)."""
        samples = batch.samples
        rows = [r.row for r in batch.requests]
        logits = self.forward(batch.is_prefill, rows, batch.starts, batch.ends, samples)
        sampling = [r for r, s in zip(batch.requests, samples, strict=True) if s]
        if not sampling:
            return []
        out = self.sampler(logits, self._sampling_batch(sampling))
        sample_rows = torch.tensor([r.row for r in sampling], device=self.device)
        sample_ends = torch.tensor([r.num_tokens for r in sampling], device=self.device)
        self.table.token_ids[sample_rows, sample_ends] = out.token_ids.int()
        return out.pack().tolist()

    @torch.inference_mode()
    def forward(
        self,
        is_prefill: bool,
        rows: list[int],
        starts: list[int],
        ends: list[int],
        want_logits: list[bool],
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
        )
        input_ids = self.table.token_ids[token_rows, positions]
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)  # (T, H)
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

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        device = self.device
        params = [r.params for r in requests]
        vocab = self.model_config.vocab_size

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        batch = SamplingBatch(
            temperatures=tensor([p.temperature for p in params], torch.float32),
            top_ks=tensor([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64),
            top_ps=tensor([p.top_p for p in params], torch.float32),
            min_ps=tensor([p.min_p for p in params], torch.float32),
            keys=tensor([r.rng_key for r in requests], torch.int64),
            steps=tensor([r.num_output_tokens for r in requests], torch.int64),
            all_greedy=all(p.is_greedy for p in params),
            uses_top_k_or_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
            uses_min_p=any(p.min_p > 0 for p in params),
            num_top_logprobs=max(wanted) if wanted else -1,
        )
        suppressed = [sorted(r.suppressed_ids) for r in requests]
        width = max(map(len, suppressed))
        if width:
            batch.suppressed_ids = tensor(
                [s + [-1] * (width - len(s)) for s in suppressed], torch.int64
            )
        if any(p.uses_penalties for p in params):
            rows = tensor([r.row for r in requests], torch.int64)
            history_lens = [r.num_tokens for r in requests]
            batch.repetition_penalties = tensor(
                [p.repetition_penalty for p in params], torch.float32
            )
            batch.presence_penalties = tensor([p.presence_penalty for p in params], torch.float32)
            batch.frequency_penalties = tensor([p.frequency_penalty for p in params], torch.float32)
            batch.token_history = self.table.token_ids[rows, : max(history_lens)]
            batch.prompt_lens = tensor([r.num_prompt_tokens for r in requests], torch.int64)
            batch.history_lens = tensor(history_lens, torch.int64)
        return batch
