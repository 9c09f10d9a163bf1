"""Fused mixture-of-experts MLP: softmax top-k routing, tokens sorted by expert, two
grouped GEMMs (gate/up with SiLU-and-mul, then down), and the weighted combine.

Weights, as the model blocks stack them at load time:
  w13 [E, 2I, H]: rows [0, I) the gate projection, rows [I, 2I) the up projection;
  w2  [E, H, I]: the down projection.

Expert parallelism: with ``expert_map`` ([E_global] int32, the local index of each
expert or -1), w13 and w2 hold only this rank's experts and the result is this
rank's share: tokens routed to experts held elsewhere contribute zero, so the
shares of all ranks sum to the whole layer.

The Triton path never syncs with the host and every shape it allocates depends only
on (num_tokens, top_k, num_experts, block_m), so decode runs under CUDA graphs:
each (token, choice) pair, a "slot" ``t * top_k + j``, is placed in a padded row
of its expert's blocks; the GEMM grids cover the most blocks any routing can need
and the blocks a routing leaves unused return at once.
"""

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels import use_triton
from kernels.silu_and_mul import silu_and_mul_reference


@dataclass(frozen=True)
class GemmTile:
    """The tile of one grouped GEMM over N (output columns) and K, and its launch."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoELaunch:
    """Rows per expert block (also the padding unit of the sort), and each GEMM's tile."""

    block_m: int
    gate_up: GemmTile
    down: GemmTile


def moe_launch(
    num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype = torch.bfloat16
) -> MoELaunch:
    """A launch for this batch: decode-sized batches take 16-row blocks so padding wastes
    little, larger ones wider blocks so each expert's weights are read fewer times.
    Four-byte dtypes take half the K depth, so that a tile holds as many bytes.

    Starting points for an H200 in bf16, not tuned yet (bench/moe_bench.py --sweep):
    left to do are per-shape tables, split-K for the down GEMM at batch 1 (Mixtral
    launches only 2 x H / block_n programs there), grouped program order for L2
    reuse in prefill, and unmasked loads when H and I divide the tiles.
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        launch = MoELaunch(16, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))
    elif rows_per_expert <= 48:
        launch = MoELaunch(32, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))
    else:
        launch = MoELaunch(64, GemmTile(64, 64, 4, 4), GemmTile(128, 64, 8, 3))
    if dtype.itemsize == 4:
        launch = MoELaunch(
            launch.block_m,
            replace(launch.gate_up, block_k=launch.gate_up.block_k // 2),
            replace(launch.down, block_k=launch.down.block_k // 2),
        )
    return launch


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


def fused_moe_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE MLP of hidden [T, H] by a loop over the experts that have tokens, as
    Hugging Face computes it. Roundings follow the kernel: the activation and each
    weighted expert output in hidden's dtype, the sum over choices in fp32."""
    weights, ids = moe_route_reference(router_logits, top_k, renormalize)
    local = ids if expert_map is None else expert_map[ids.long()]  # (T, k)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in local.unique().tolist():
        if expert < 0:
            continue  # held by another rank
        tokens, choices = (local == expert).nonzero(as_tuple=True)
        act = silu_and_mul_reference(hidden[tokens] @ w13[expert].t())  # (n, I)
        expert_out = (act @ w2[expert].t()).float() * weights[tokens, choices, None]  # (n, H)
        out.index_add_(0, tokens, expert_out.to(hidden.dtype).float())
    return out.to(hidden.dtype)


# ----------------------------------------------------------------------------- Triton


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


@triton.jit
def _gate_up_kernel(
    hidden_ptr,
    w13_ptr,
    act_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    num_slots,
    top_k,
    hidden_size,
    inter_size,
    hidden_stride,
    w13_expert_stride,
    w13_row_stride,
    act_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """act[row, n] = silu(x @ gate[:, n]) * (x @ up[:, n]) for one block of one expert's
    rows and BLOCK_N columns of I; x is the hidden state of the row's token."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert < 0:
        return  # past the blocks this routing uses
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    is_slot = slots < num_slots  # padding rows read zeros
    tokens = (slots // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < inter_size
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + tokens[:, None] * hidden_stride + ks[None, :]  # (BLOCK_M, BLOCK_K)
    gate_ptrs = (
        w13_ptr
        + expert.to(tl.int64) * w13_expert_stride
        + cols[None, :].to(tl.int64) * w13_row_stride
        + ks[:, None]
    )  # (BLOCK_K, BLOCK_N)
    up_ptrs = gate_ptrs + inter_size * w13_row_stride
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        in_k = ks < hidden_size - k0
        x = tl.load(x_ptrs, mask=is_slot[:, None] & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & in_cols[None, :]
        gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    # Rounded as the unfused model rounds: gate_up in the weights' dtype, silu in fp32
    # rounded back, then the product.
    dtype = act_ptr.dtype.element_ty
    g = acc_gate.to(dtype).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(dtype) * acc_up.to(dtype)
    tl.store(
        act_ptr + rows[:, None].to(tl.int64) * act_stride + cols[None, :],
        act,
        mask=in_cols[None, :],
    )


@triton.jit
def _down_kernel(
    act_ptr,
    w2_ptr,
    slot_out_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    topk_weights_ptr,
    num_slots,
    hidden_size,
    inter_size,
    act_stride,
    w2_expert_stride,
    w2_row_stride,
    slot_out_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """slot_out[slot, n] = weight[slot] * (act[row] @ down[:, n]), written at the slot's
    own row so that the combine is a fixed-order sum over each token's choices."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    is_slot = slots < num_slots
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    # Padding rows of act hold zeros (the gate/up kernel wrote every row of a used block).
    a_ptrs = act_ptr + rows[:, None].to(tl.int64) * act_stride + ks[None, :]
    w_ptrs = (
        w2_ptr
        + expert.to(tl.int64) * w2_expert_stride
        + cols[None, :].to(tl.int64) * w2_row_stride
        + ks[:, None]
    )  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        in_k = ks < inter_size - k0
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    weight = tl.load(topk_weights_ptr + slots, mask=is_slot, other=0.0)
    out = (acc * weight[:, None]).to(slot_out_ptr.dtype.element_ty)
    tl.store(
        slot_out_ptr + slots[:, None].to(tl.int64) * slot_out_stride + cols[None, :],
        out,
        mask=is_slot[:, None] & in_cols[None, :],
    )


def fused_moe_triton(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    expert_map: torch.Tensor | None = None,
    launch: MoELaunch | None = None,
) -> torch.Tensor:
    """``launch`` overrides the heuristic one (for benchmarks and tests)."""
    num_tokens, hidden_size = hidden.shape
    num_local_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    num_experts = router_logits.shape[1]
    assert router_logits.shape[0] == num_tokens and two_inter == 2 * inter_size
    assert w13.shape == (num_local_experts, 2 * inter_size, hidden_size)
    assert w2.shape == (num_local_experts, hidden_size, inter_size)
    assert hidden.dtype == w13.dtype == w2.dtype
    assert hidden.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    assert expert_map is not None or num_experts == num_local_experts
    launch = launch or moe_launch(num_tokens, top_k, num_local_experts, hidden.dtype)
    routing = moe_routing_triton(
        router_logits, top_k, renormalize, num_local_experts, launch.block_m, expert_map
    )
    # One row per slot, in hidden's dtype; rows of slots held elsewhere stay zero.
    alloc = torch.empty if expert_map is None else torch.zeros
    slot_out = alloc((num_tokens * top_k, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return slot_out
    max_blocks = routing.block_experts.shape[0]
    act = torch.empty(
        (max_blocks * launch.block_m, inter_size), dtype=hidden.dtype, device=hidden.device
    )
    # fp32 inputs get exact products (no TF32) so that they match the reference.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    tile = launch.gate_up
    _gate_up_kernel[(max_blocks, triton.cdiv(inter_size, tile.block_n))](
        hidden,
        w13,
        act,
        routing.sorted_slots,
        routing.block_experts,
        num_tokens * top_k,
        top_k,
        hidden_size,
        inter_size,
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        BLOCK_M=launch.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        DOT_PRECISION=precision,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    tile = launch.down
    _down_kernel[(max_blocks, triton.cdiv(hidden_size, tile.block_n))](
        act,
        w2,
        slot_out,
        routing.sorted_slots,
        routing.block_experts,
        routing.topk_weights,
        num_tokens * top_k,
        hidden_size,
        inter_size,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        slot_out.stride(0),
        BLOCK_M=launch.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        DOT_PRECISION=precision,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    # The combine: each token's choices summed in order (fp32 inside torch's sum).
    return slot_out.view(num_tokens, top_k, hidden_size).sum(dim=1)


def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE MLP of hidden [T, H] given router_logits [T, E] (any float dtype):
    softmax over all E experts, the top_k, renormalised to sum to one if asked, and
    ``sum_j weight_j * down_e(silu(gate_e(x)) * up_e(x))`` for each token. With
    ``expert_map`` (see ``local_expert_map``), only this rank's experts contribute."""
    impl = fused_moe_triton if use_triton(hidden) else fused_moe_reference
    return impl(hidden, router_logits, w13, w2, top_k, renormalize, expert_map)
