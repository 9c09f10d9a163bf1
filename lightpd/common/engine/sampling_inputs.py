"""A step's per-request sampling settings, moved to the device without a host sync.

The settings of every sampled request go into two pinned host buffers and reach
the device in two asynchronous copies, queued behind the forward pass, so the
host builds the next inputs while the GPU still runs; a grammar's token mask
takes a third copy (``common/engine/grammar.py``). The buffers are refilled
only after the step's one host sync (fetching the sampled tokens) has retired
the copies out of them.
"""

import torch

from lightpd.common.engine.grammar import TokenBitmask
from lightpd.common.engine.req_table import RequestTable
from lightpd.common.engine.request import Request
from lightpd.common.engine.sampler import SamplingBatch


class SamplingInputs:
    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        pinned = device.type == "cuda"
        # rows: temperature, top_p, min_p / top_k, rng key, output step
        self._floats = torch.empty((3, max_num_reqs), dtype=torch.float32, pin_memory=pinned)
        self._ints = torch.empty((3, max_num_reqs), dtype=torch.int64, pin_memory=pinned)
        self.token_bitmask = TokenBitmask(max_num_reqs, vocab_size, device)

    def build(self, requests: list[Request], table: RequestTable) -> SamplingBatch:
        num = len(requests)
        params = [r.params for r in requests]
        vocab = self.vocab_size
        self._floats[:, :num] = torch.tensor(
            [
                [p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
            ]
        )
        self._ints[:, :num] = torch.tensor(
            [
                [p.top_k if p.top_k > 0 else vocab for p in params],
                [r.rng_key for r in requests],
                [r.num_output_tokens for r in requests],
            ]
        )
        floats = self._floats[:, :num].to(self.device, non_blocking=True)
        ints = self._ints[:, :num].to(self.device, non_blocking=True)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        batch = SamplingBatch(
            temperatures=floats[0],
            top_ks=ints[0],
            top_ps=floats[1],
            min_ps=floats[2],
            keys=ints[1],
            steps=ints[2],
            all_greedy=all(p.is_greedy for p in params),
            uses_top_k_or_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
            uses_min_p=any(p.min_p > 0 for p in params),
            num_top_logprobs=max(wanted) if wanted else -1,
        )
        suppressed = [sorted(r.suppressed_ids) for r in requests]
        width = max(map(len, suppressed))
        if width:
            batch.suppressed_ids = self._tensor(
                [s + [-1] * (width - len(s)) for s in suppressed], torch.int64
            )
        if any(p.logit_bias for p in params):
            width = max(len(p.logit_bias) for p in params)
            pad = [(-1, 0.0)] * width
            rows = [list(p.logit_bias) + pad[len(p.logit_bias) :] for p in params]
            batch.bias_ids = self._tensor([[t for t, _ in r] for r in rows], torch.int64)
            batch.bias_values = self._tensor([[b for _, b in r] for r in rows], torch.float32)
        if any(p.uses_penalties for p in params):
            self._add_penalties(batch, requests, table)
        # Last: the host fills the grammars' masks while the device computes.
        batch.token_bitmask = self.token_bitmask.fill(requests)
        return batch

    def _add_penalties(
        self, batch: SamplingBatch, requests: list[Request], table: RequestTable
    ) -> None:
        params = [r.params for r in requests]
        rows = self._tensor([r.row for r in requests], torch.int64)
        history_lens = [r.num_tokens for r in requests]
        batch.repetition_penalties = self._tensor(
            [p.repetition_penalty for p in params], torch.float32
        )
        batch.presence_penalties = self._tensor([p.presence_penalty for p in params], torch.float32)
        batch.frequency_penalties = self._tensor(
            [p.frequency_penalty for p in params], torch.float32
        )
        batch.token_history = table.token_ids[rows, : max(history_lens)]
        batch.prompt_lens = self._tensor([r.num_prompt_tokens for r in requests], torch.int64)
        batch.history_lens = self._tensor(history_lens, torch.int64)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
