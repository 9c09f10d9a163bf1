"""Routing of the fused MoE kernel: each token's top-k experts, and its (token, choice)
pairs, "slots" ``t * top_k + j``, placed in padded blocks of rows per expert.

Every buffer's shape depends only on (num_tokens, top_k, num_experts, block_m), so
the Triton path runs under CUDA graphs; blocks a routing leaves unused are marked
with expert -1. ``expert_map`` ([E_global] int32, the local index of each expert or
-1) keeps only this rank's experts for expert parallelism.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoERouting:
    """Where every slot goes. Shapes depend only on (T, top_k, E_local, block_m):
    see ``max_expert_blocks``."""

    topk_weights: torch.Tensor  # (T, top_k) fp32
    topk_ids: torch.Tensor  # (T, top_k) int32, global expert ids
    sorted_slots: torch.Tensor  # (max_blocks * block_m,) int32; padding rows hold T * top_k
    block_experts: torch.Tensor  # (max_blocks,) int32 local expert; -1 for unused blocks
    num_padded_rows: torch.Tensor  # (1,) int32: rows of the used blocks


def max_expert_blocks(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """The most blocks any routing of ``num_slots`` slots can fill: each expert with slots
    pads at most one partial block, and at most min(E, slots) experts have slots."""
    return num_slots // block_m + min(num_local_experts, num_slots)


def local_expert_map(
    num_experts: int, first_expert: int, num_local_experts: int, device: torch.device | str
) -> torch.Tensor:
    """The ``expert_map`` of a rank holding experts [first, first + num_local)."""
    assert first_expert >= 0 and first_expert + num_local_experts <= num_experts
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    expert_map[first_expert : first_expert + num_local_experts] = torch.arange(
        num_local_experts, dtype=torch.int32, device=device
    )
    return expert_map


# ----------------------------------------------------------------------------- reference


def moe_route_reference(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over experts, the top_k, optionally rescaled to sum to one.
    Returns (weights (T, top_k) fp32, ids (T, top_k) int32)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_routing_reference(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_local_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> MoERouting:
    """The sort in torch: slots in order within each expert (the Triton sort places
    them in any order within their expert's rows)."""
    weights, ids = moe_route_reference(router_logits, top_k, renormalize)
    num_slots = ids.numel()
    local = (ids if expert_map is None else expert_map[ids.long()]).view(-1).long()  # (T*k,)
    local = local.masked_fill(local < 0, num_local_experts)  # elsewhere sorts last
    counts = torch.bincount(local, minlength=num_local_experts + 1)[:num_local_experts]
    blocks = (counts + block_m - 1) // block_m  # (E_local,)
    block_start = torch.cumsum(blocks, 0) - blocks
    order = torch.sort(local, stable=True).indices  # slots grouped by expert
    first_of_expert = torch.cumsum(counts, 0) - counts
    sorted_local = local[order]
    is_local = sorted_local < num_local_experts
    order, sorted_local = order[is_local], sorted_local[is_local]
    rank = torch.arange(order.numel(), device=ids.device) - first_of_expert[sorted_local]
    max_blocks = max_expert_blocks(num_slots, num_local_experts, block_m)
    sorted_slots = torch.full(
        (max_blocks * block_m,), num_slots, dtype=torch.int32, device=ids.device
    )
    sorted_slots[block_start[sorted_local] * block_m + rank] = order.to(torch.int32)
    block_experts = torch.full((max_blocks,), -1, dtype=torch.int32, device=ids.device)
    used = torch.repeat_interleave(torch.arange(num_local_experts, device=ids.device), blocks)
    block_experts[: used.numel()] = used.to(torch.int32)
    num_padded_rows = (blocks.sum() * block_m).to(torch.int32).view(1)
    return MoERouting(weights, ids, sorted_slots, block_experts, num_padded_rows)


@triton.jit
def _route_kernel(
    logits_ptr,
    topk_weights_ptr,
    topk_ids_ptr,
    expert_map_ptr,
    expert_counts_ptr,
    slot_experts_ptr,
    slot_ranks_ptr,
    num_tokens,
    num_experts,
    logits_stride,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Top-k of the softmax for BLOCK_T tokens, and each slot's rank among its expert's
    slots (an atomic count: the order within an expert is arbitrary, the result not)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_batch = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(
        logits_ptr + tokens[:, None].to(tl.int64) * logits_stride + experts[None, :],
        mask=in_batch[:, None] & (experts < num_experts)[None, :],
        other=float("-inf"),
    ).to(tl.float32)  # (BLOCK_T, BLOCK_E)
    logits = tl.where(in_batch[:, None], logits, 0.0)  # rows past the batch stay finite
    exp = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = exp / tl.sum(exp, 1)[:, None]

    choices = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(logits, 1)  # (BLOCK_T,); ties go to the lower expert
        is_best = experts[None, :] == best[:, None]  # (BLOCK_T, BLOCK_E)
        weights = tl.where(
            choices[None, :] == j, tl.sum(tl.where(is_best, probs, 0.0), 1)[:, None], weights
        )
        ids = tl.where(choices[None, :] == j, best[:, None].to(tl.int32), ids)
        logits = tl.where(is_best, float("-inf"), logits)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]

    slots = tokens[:, None] * TOP_K + choices[None, :]  # (BLOCK_T, BLOCK_K)
    is_slot = in_batch[:, None] & (choices < TOP_K)[None, :]
    tl.store(topk_weights_ptr + slots, weights, mask=is_slot)
    tl.store(topk_ids_ptr + slots, ids, mask=is_slot)
    local = tl.load(expert_map_ptr + ids, mask=is_slot, other=-1) if HAS_MAP else ids
    is_local = is_slot & (local >= 0)
    rank = tl.atomic_add(expert_counts_ptr + local, 1, mask=is_local)
    tl.store(slot_experts_ptr + slots, tl.where(is_local, local, -1), mask=is_slot)
    tl.store(slot_ranks_ptr + slots, rank, mask=is_local)


@triton.jit
def _place_kernel(
    slot_experts_ptr,
    slot_ranks_ptr,
    expert_counts_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    num_padded_rows_ptr,
    num_slots,
    num_local_experts,
    max_rows,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Each program lays out the whole block table from the counts (a few hundred
    integers), then writes its BLOCK slots into their rows and marks its BLOCK rows
    that are padding."""
    experts = tl.arange(0, BLOCK_E)
    is_expert = experts < num_local_experts
    counts = tl.load(expert_counts_ptr + experts, mask=is_expert, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    block_start = block_end - blocks  # (BLOCK_E,), in blocks

    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # idx as slots: move each local slot to its expert's rows.
    slot_expert = tl.load(slot_experts_ptr + idx, mask=idx < num_slots, other=-1)
    is_local = slot_expert >= 0
    rank = tl.load(slot_ranks_ptr + idx, mask=is_local, other=0)
    of_slot = experts[None, :] == slot_expert[:, None]  # (BLOCK, BLOCK_E)
    first_row = tl.sum(tl.where(of_slot, block_start[None, :], 0), 1) * BLOCK_M
    tl.store(sorted_slots_ptr + first_row + rank, idx, mask=is_local)

    # idx as rows: a row of expert e's blocks past its count is padding, as is every
    # row of the blocks past the last expert's.
    row_block = idx // BLOCK_M
    row_expert = tl.sum(
        (is_expert[None, :] & (block_end[None, :] <= row_block[:, None])).to(tl.int32), 1
    )
    of_row = experts[None, :] == row_expert[:, None]
    row_start = tl.sum(tl.where(of_row, block_start[None, :], 0), 1) * BLOCK_M
    row_count = tl.sum(tl.where(of_row, counts[None, :], 0), 1)
    is_used = row_expert < num_local_experts
    in_table = idx < max_rows
    is_pad = in_table & (~is_used | (idx - row_start >= row_count))
    tl.store(sorted_slots_ptr + idx, tl.zeros_like(idx) + num_slots, mask=is_pad)
    tl.store(
        block_experts_ptr + row_block,
        tl.where(is_used, row_expert, -1),
        mask=in_table & (idx % BLOCK_M == 0),
    )
    if tl.program_id(0) == 0:
        tl.store(num_padded_rows_ptr, tl.sum(blocks, 0) * BLOCK_M)


def moe_routing_triton(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_local_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> MoERouting:
    """Two launches (and a memset): route and count, then place."""
    num_tokens, num_experts = router_logits.shape
    assert 1 <= top_k <= num_experts and router_logits.stride(1) == 1
    if expert_map is not None:
        assert expert_map.shape == (num_experts,) and expert_map.dtype == torch.int32
    device = router_logits.device
    num_slots = num_tokens * top_k
    max_blocks = max_expert_blocks(num_slots, num_local_experts, block_m)
    max_rows = max_blocks * block_m
    topk_weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    topk_ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    sorted_slots = torch.empty((max_rows,), dtype=torch.int32, device=device)
    block_experts = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    num_padded_rows = torch.empty((1,), dtype=torch.int32, device=device)
    routing = MoERouting(topk_weights, topk_ids, sorted_slots, block_experts, num_padded_rows)
    if num_tokens == 0:
        num_padded_rows.zero_()
        return routing
    block_e = triton.next_power_of_2(max(num_experts, num_local_experts))
    expert_counts = torch.zeros((block_e,), dtype=torch.int32, device=device)
    slot_experts = torch.empty((num_slots,), dtype=torch.int32, device=device)
    slot_ranks = torch.empty((num_slots,), dtype=torch.int32, device=device)
    block_t = min(triton.next_power_of_2(num_tokens), max(1, 2048 // block_e))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        topk_weights,
        topk_ids,
        expert_map if expert_map is not None else topk_ids,  # unread without a map
        expert_counts,
        slot_experts,
        slot_ranks,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        HAS_MAP=expert_map is not None,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=4,
    )
    block = max(16, 4096 // block_e)
    _place_kernel[(triton.cdiv(max_rows, block),)](
        slot_experts,
        slot_ranks,
        expert_counts,
        sorted_slots,
        block_experts,
        num_padded_rows,
        num_slots,
        num_local_experts,
        max_rows,
        BLOCK_M=block_m,
        BLOCK=block,
        BLOCK_E=block_e,
        num_warps=4,
    )
    return routing
