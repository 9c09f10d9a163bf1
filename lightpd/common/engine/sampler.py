"""Batched sampling on the device with per-request, batch-independent randomness.

Each request's random draw at output step t for token v is a hash of
(seed, t, v), turned into exponential noise E; sampling ``argmax(p / E)`` draws
exactly from p (the exponential race). The same seed therefore gives the same
tokens whatever else shares the batch, and a paused request that is recomputed
later continues exactly where it was.
"""

from dataclasses import dataclass

import torch

from lightpd.common.engine.grammar import apply_token_bitmask
from lightpd.kernels.exponential_race import MASK32, exponential_race, hash32


def seed_to_key(seed: int) -> int:
    """Fold an arbitrary Python int seed into a 32-bit key."""
    low = torch.tensor(seed & MASK32, dtype=torch.int64)
    high = torch.tensor((seed >> 32) & MASK32, dtype=torch.int64)
    return int(hash32(low ^ hash32(high ^ 0x9E3779B9)))


@dataclass
class SamplingBatch:
    """Per-request sampling settings of one step, as device tensors of length B."""

    temperatures: torch.Tensor  # (B,) float32, 0 = greedy
    top_ks: torch.Tensor  # (B,) int64, vocab size when off
    top_ps: torch.Tensor  # (B,) float32
    min_ps: torch.Tensor  # (B,) float32
    keys: torch.Tensor  # (B,) int64 32-bit seed keys
    steps: torch.Tensor  # (B,) int64 output tokens so far (the RNG counter)
    all_greedy: bool
    uses_top_k_or_p: bool
    uses_min_p: bool
    num_top_logprobs: int  # -1: no logprobs wanted in this batch
    # Ids that may not be sampled yet (min_new_tokens), -1 padded: (B, S) or None.
    suppressed_ids: torch.Tensor | None = None
    # logit_bias: ids (-1 padded) and the biases added to their logits, (B, K) or None.
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # Grammars: the allowed tokens of each row, 32 to an int32 (B, ceil(V / 32)), or None.
    token_bitmask: torch.Tensor | None = None
    # Penalties: None when no request in the batch uses them.
    repetition_penalties: torch.Tensor | None = None  # (B,)
    presence_penalties: torch.Tensor | None = None  # (B,)
    frequency_penalties: torch.Tensor | None = None  # (B,)
    token_history: torch.Tensor | None = None  # (B, L) prompt + output ids
    prompt_lens: torch.Tensor | None = None  # (B,)
    history_lens: torch.Tensor | None = None  # (B,)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32, of the chosen tokens
    top_ids: torch.Tensor | None  # (B, N) int64
    top_logprobs: torch.Tensor | None  # (B, N) float32

    def pack(self) -> torch.Tensor:
        """One float32 (B, 2 + 2N) tensor, so fetching the step costs one sync.
        Token ids stay exact: fp32 holds every integer below 2**24."""
        cols = [self.token_ids.float()[:, None]]
        if self.logprobs is not None:
            cols.append(self.logprobs[:, None])
        if self.top_ids is not None:
            cols += [self.top_ids.float(), self.top_logprobs]
        return torch.cat(cols, dim=1)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Choose one token per row of ``logits`` [B, V]; no host sync."""
        logits = logits.float()
        if batch.bias_ids is not None:
            logits = self._bias(logits, batch.bias_ids, batch.bias_values)
        logprobs = logits.log_softmax(dim=-1) if batch.num_top_logprobs >= 0 else None
        if batch.repetition_penalties is not None:
            logits = self._apply_penalties(logits, batch)
        if batch.suppressed_ids is not None:
            logits = self._suppress(logits, batch.suppressed_ids)
        if batch.token_bitmask is not None:
            apply_token_bitmask(logits, batch.token_bitmask)
        tokens = logits.argmax(dim=-1)
        if not batch.all_greedy:
            sampled = self._sample(logits, batch)
            tokens = torch.where(batch.temperatures == 0, tokens, sampled)
        if logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        if batch.num_top_logprobs == 0:
            return SamplerOutput(tokens, chosen, None, None)
        top_logprobs, top_ids = logprobs.topk(batch.num_top_logprobs, dim=-1)
        return SamplerOutput(tokens, chosen, top_ids, top_logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        inv_temperatures = 1.0 / torch.where(batch.temperatures == 0, 1.0, batch.temperatures)
        if batch.uses_top_k_or_p or batch.uses_min_p:
            # The masks need the tempered distribution: apply the temperature first.
            logits = logits * inv_temperatures[:, None]
            inv_temperatures = torch.ones_like(inv_temperatures)
            if batch.uses_top_k_or_p:
                logits = _mask_top_k_top_p(logits, batch.top_ks, batch.top_ps)
            if batch.uses_min_p:
                probs = logits.softmax(dim=-1)
                floor = batch.min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
                logits = logits.masked_fill(probs < floor, float("-inf"))
        return exponential_race(logits, inv_temperatures, batch.keys, batch.steps)

    def _apply_penalties(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        vocab = self.vocab_size
        history = batch.token_history.long()  # (B, L), any L: it may exceed the vocabulary
        positions = torch.arange(history.shape[1], device=logits.device)[None, :]  # (1, L)
        # Ids outside the vocabulary cannot be penalized; they must not index out of range.
        in_history = (positions < batch.history_lens[:, None]) & (history >= 0) & (history < vocab)
        in_output = in_history & (positions >= batch.prompt_lens[:, None])
        # Padding goes to an extra column, dropped afterwards.
        ids = torch.where(in_history, history, vocab)  # (B, L)
        num_rows = logits.shape[0]
        counts = torch.zeros((num_rows, vocab + 1), device=logits.device)
        counts.scatter_add_(1, ids, in_output.float())
        counts = counts[:, :vocab]  # (B, V) times each token was generated
        seen = torch.zeros((num_rows, vocab + 1), dtype=torch.bool, device=logits.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]  # (B, V) token occurs in prompt or output
        # Repetition penalty as in transformers (CTRL paper), over prompt and output.
        rep = batch.repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        # Presence and frequency penalties as in OpenAI's API, over the output only.
        logits = logits - batch.frequency_penalties[:, None] * counts
        return logits - batch.presence_penalties[:, None] * (counts > 0).float()

    def _bias(self, logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        dump = self.vocab_size  # padding lands in an extra column, dropped after
        padded = torch.nn.functional.pad(logits, (0, 1))
        padded.scatter_add_(1, torch.where(ids >= 0, ids.long(), dump), values)
        return padded[:, :dump]

    def _suppress(self, logits: torch.Tensor, suppressed_ids: torch.Tensor) -> torch.Tensor:
        dump = self.vocab_size
        ids = torch.where(suppressed_ids >= 0, suppressed_ids.long(), dump)
        padded = torch.nn.functional.pad(logits, (0, 1))
        padded.scatter_(1, ids, float("-inf"))
        return padded[:, :dump]


def _mask_top_k_top_p(
    logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = ranks >= top_ks[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below top_p; the first always stays.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))
