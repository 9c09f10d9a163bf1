"""Token-granular KV cache: every token of every request owns one slot per layer."""

import torch


class OutOfSlotsError(RuntimeError):
    """More slots were asked for than the pool has free."""


class TokenKVPool:
    """K and V of ``num_slots`` tokens for every layer, with a free-slot stack.

    The first ``num_free_slots`` entries of ``_free_slots`` are the free slots.
    Allocating n slots pops n from the top and freeing pushes them back: both are
    single tensor copies, whatever n is, and never touch Python per token.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"a KV pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.device = torch.device(device)
        # One slot past the free ones is never handed out: the padding entries of a
        # batch padded to a captured CUDA graph's size write their K/V there.
        self.padding_slot = num_slots
        # (L, 2, S + 1, Hk, D): one layer's K or V is one contiguous block, so a layer
        # can be sent over the wire as it is.
        self.kv_buffer = torch.zeros(
            (num_layers, 2, num_slots + 1, num_kv_heads, head_dim), dtype=dtype, device=self.device
        )
        self._free_slots = torch.arange(num_slots, dtype=torch.int32, device=self.device)
        self.num_free_slots = num_slots

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - self.num_free_slots

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.kv_buffer[layer, 0]  # (S, Hk, D)

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.kv_buffer[layer, 1]  # (S, Hk, D)

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self.num_free_slots

    def allocate(self, num_tokens: int) -> torch.Tensor:
        """Take ``num_tokens`` free slots; returns their indices, int32 [num_tokens]."""
        if not self.can_allocate(num_tokens):
            raise OutOfSlotsError(
                f"asked for {num_tokens} KV slots with {self.num_free_slots} free"
            )
        top = self.num_free_slots
        self.num_free_slots = top - num_tokens
        return self._free_slots[self.num_free_slots : top].clone()

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` to the pool. Each slot must be owned by the caller."""
        num = slots.numel()
        if self.num_free_slots + num > self.num_slots:
            raise ValueError(f"freeing {num} slots would overfill the pool: a slot was freed twice")
        self._free_slots[self.num_free_slots : self.num_free_slots + num] = slots
        self.num_free_slots += num

    def free_slots(self) -> torch.Tensor:
        """The free slot indices (a copy), for consistency checks."""
        return self._free_slots[: self.num_free_slots].clone()
