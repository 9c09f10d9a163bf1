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
of its expert's blocks (``moe_routing.py``); the GEMM grids cover the most blocks
any routing can need and the blocks a routing leaves unused return at once.
"""

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from lightpd.kernels import use_triton
from lightpd.kernels.moe_routing import moe_route_reference, moe_routing_triton
from lightpd.kernels.silu_and_mul import silu_and_mul_reference


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
