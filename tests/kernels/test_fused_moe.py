import pytest
import torch

from lightpd.kernels.fused_moe import GemmTile, MoELaunch, fused_moe_reference, fused_moe_triton
from lightpd.kernels.moe_routing import (
    MoERouting,
    local_expert_map,
    max_expert_blocks,
    moe_route_reference,
    moe_routing_reference,
    moe_routing_triton,
)
from tests.kernels.helpers import DEVICE, DTYPES, assert_close

# Small enough for the interpreter; I and H are not multiples of the tiles tried.
NUM_EXPERTS, HIDDEN, INTER = 8, 80, 48
# Expert 0 takes most tokens (several blocks), experts 5-7 none unless top_k reaches them.
SKEW = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, -9.0, -9.0, -9.0])


def router_logits(num_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    logits = torch.randn(num_tokens, NUM_EXPERTS) + SKEW
    return logits.to(dtype=dtype, device=DEVICE)


def weights(num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I], scaled so that every stage is of order one."""
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, device=DEVICE) * HIDDEN**-0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, device=DEVICE) * INTER**-0.5
    return w13.to(dtype), w2.to(dtype)


def hidden_states(num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    # The first columns of a wider buffer, as a fused projection leaves them.
    wide = torch.randn(num_tokens, HIDDEN + 16, dtype=dtype, device=DEVICE)
    return wide[:, :HIDDEN]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
def test_routing_matches_reference(top_k: int, renormalize: bool) -> None:
    torch.manual_seed(0)
    logits = router_logits(37)

    routing = moe_routing_triton(logits, top_k, renormalize, NUM_EXPERTS, block_m=16)
    expected = moe_routing_reference(logits, top_k, renormalize, NUM_EXPERTS, block_m=16)

    assert torch.equal(routing.topk_ids, expected.topk_ids)
    torch.testing.assert_close(routing.topk_weights, expected.topk_weights)
    sums = routing.topk_weights.sum(dim=-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    elif top_k < NUM_EXPERTS:
        assert (sums < 1).all()
    _assert_same_layout(routing, expected, block_m=16)
    if top_k == 1:  # the skew leaves experts 5-7 without tokens, expert 0 with several blocks
        assert not torch.isin(routing.block_experts, torch.tensor([5, 6, 7], device=DEVICE)).any()
        assert int((routing.block_experts == 0).sum()) >= 2


@pytest.mark.parametrize("block_m", [16, 32])
def test_sort_with_an_expert_subset(block_m: int) -> None:
    torch.manual_seed(1)
    logits = router_logits(29)
    expert_map = local_expert_map(NUM_EXPERTS, 1, 3, DEVICE)  # experts 1-3 are local

    routing = moe_routing_triton(logits, 4, True, 3, block_m, expert_map)
    expected = moe_routing_reference(logits, 4, True, 3, block_m, expert_map)

    _assert_same_layout(routing, expected, block_m)
    # Exactly the slots routed to experts 1-3 are placed, each once.
    local_slots = torch.isin(expected.topk_ids, torch.tensor([1, 2, 3], device=DEVICE))
    placed = routing.sorted_slots[routing.sorted_slots < 29 * 4].sort().values
    assert torch.equal(placed, local_slots.view(-1).nonzero().view(-1).int())


def test_routing_shapes_depend_only_on_the_sizes() -> None:
    # CUDA graphs replay fixed shapes: every routing of one batch size fills the same
    # buffers, from all tokens on two experts to the most padded layout there is.
    torch.manual_seed(2)
    num_tokens, top_k, block_m = 20, 2, 16
    max_blocks = max_expert_blocks(num_tokens * top_k, NUM_EXPERTS, block_m)
    assert max_blocks == 10
    routings = {  # first and second choice of each token, and the blocks it fills
        "even": ([t % 8 for t in range(20)], [(t + 1) % 8 for t in range(20)], 8),
        "two experts": ([3] * 20, [4] * 20, 4),
        # 17 slots on each of experts 0 and 1, one on each other: 2 + 2 + 6 blocks.
        "worst": ([0] * 17 + [2, 4, 6], [1] * 17 + [3, 5, 7], 10),
    }
    for first, second, num_blocks in routings.values():
        logits = torch.zeros(num_tokens, NUM_EXPERTS, device=DEVICE)
        logits[range(num_tokens), first] = 9.0
        logits[range(num_tokens), second] = 8.0  # no ties: their order is unspecified
        routing = _check_layout(logits, top_k, block_m, max_blocks)
        assert int((routing.block_experts >= 0).sum()) == num_blocks
    _check_layout(router_logits(num_tokens), top_k, block_m, max_blocks)


def _check_layout(logits: torch.Tensor, top_k: int, block_m: int, max_blocks: int) -> MoERouting:
    num_tokens = logits.shape[0]
    routing = moe_routing_triton(logits, top_k, False, NUM_EXPERTS, block_m)
    assert routing.topk_weights.shape == routing.topk_ids.shape == (num_tokens, top_k)
    assert routing.sorted_slots.shape == (max_blocks * block_m,)
    assert routing.block_experts.shape == (max_blocks,)
    assert routing.num_padded_rows.shape == (1,)
    expected = moe_routing_reference(logits, top_k, False, NUM_EXPERTS, block_m)
    _assert_same_layout(routing, expected, block_m)
    return routing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_matches_reference(
    num_tokens: int, top_k: int, renormalize: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(3)
    hidden = hidden_states(num_tokens, dtype)
    logits = router_logits(num_tokens, dtype)
    w13, w2 = weights(NUM_EXPERTS, dtype)
    hidden_before = hidden.clone()

    actual = fused_moe_triton(hidden, logits, w13, w2, top_k, renormalize)

    assert actual.shape == (num_tokens, HIDDEN) and actual.dtype == dtype
    assert_close(actual, fused_moe_reference(hidden, logits, w13, w2, top_k, renormalize))
    assert torch.equal(hidden, hidden_before)


@pytest.mark.parametrize(
    "launch",
    [
        MoELaunch(16, GemmTile(16, 16), GemmTile(16, 16)),  # many N and K tiles
        MoELaunch(32, GemmTile(32, 32, 8, 2), GemmTile(64, 32)),
        MoELaunch(64, GemmTile(64, 64), GemmTile(128, 64, 8, 3)),  # one tile wider than I, H
    ],
    ids=str,
)
def test_every_launch_gives_the_same_output(launch: MoELaunch) -> None:
    torch.manual_seed(4)
    hidden = hidden_states(45, torch.float32)
    logits = router_logits(45)
    w13, w2 = weights(NUM_EXPERTS, torch.float32)

    actual = fused_moe_triton(hidden, logits, w13, w2, 3, True, launch=launch)

    assert_close(actual, fused_moe_reference(hidden, logits, w13, w2, 3, True))


def test_expert_subsets_sum_to_the_whole_layer() -> None:
    # Three ranks of an expert-parallel group, the last holding only experts that the
    # skewed router never picks at top-2: its share is zero.
    torch.manual_seed(5)
    hidden = hidden_states(23, torch.float32)
    logits = router_logits(23)
    w13, w2 = weights(NUM_EXPERTS, torch.float32)
    whole = fused_moe_reference(hidden, logits, w13, w2, 2, False)

    shares = []
    for first, num_local in ((0, 2), (2, 3), (5, 3)):
        expert_map = local_expert_map(NUM_EXPERTS, first, num_local, DEVICE)
        local = slice(first, first + num_local)
        args = (hidden, logits, w13[local], w2[local], 2, False, expert_map)
        share = fused_moe_triton(*args)
        assert_close(share, fused_moe_reference(*args))
        shares.append(share)

    assert torch.equal(shares[2], torch.zeros_like(shares[2]))
    assert_close(sum(shares), whole)


def test_an_empty_batch() -> None:
    # An expert-parallel member with no requests still runs the layer.
    w13, w2 = weights(NUM_EXPERTS, torch.float32)
    hidden, logits = hidden_states(0, torch.float32), router_logits(0)
    out = fused_moe_triton(hidden, logits, w13, w2, 2, True)
    assert out.shape == (0, HIDDEN)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_a_cuda_graph_replays_any_routing() -> None:
    # Captured once, replayed with new logits and hidden states copied in: a host sync
    # would fail the capture, and a shape that depends on the routing would go stale.
    torch.manual_seed(7)
    dtype = torch.bfloat16
    hidden, logits = hidden_states(24, dtype), router_logits(24, dtype)
    w13, w2 = weights(NUM_EXPERTS, dtype)
    fused_moe_triton(hidden, logits, w13, w2, 2, True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(hidden, logits, w13, w2, 2, True)

    for skew in (0.5, 1.0, 3.0):
        hidden.copy_(hidden_states(24, dtype))
        logits.copy_(router_logits(24, dtype) * skew)
        graph.replay()
        assert_close(out, fused_moe_reference(hidden, logits, w13, w2, 2, True))


def test_reference_is_the_mixture_of_its_experts() -> None:
    # The reference, against the definition one token and one choice at a time.
    torch.manual_seed(6)
    hidden = hidden_states(5, torch.float32)
    logits = router_logits(5)
    w13, w2 = weights(NUM_EXPERTS, torch.float32)
    probs = logits.softmax(dim=-1)

    for renormalize in (True, False):
        actual = fused_moe_reference(hidden, logits, w13, w2, 3, renormalize)
        for t in range(5):
            top = probs[t].topk(3)
            scale = top.values.sum() if renormalize else 1.0
            expected = torch.zeros(HIDDEN, device=DEVICE)
            for p, e in zip(top.values, top.indices.tolist(), strict=True):
                gate, up = (w13[e] @ hidden[t]).chunk(2)
                expected += p / scale * (w2[e] @ (torch.nn.functional.silu(gate) * up))
            assert_close(actual[t], expected)
    weights_only, _ = moe_route_reference(logits, 3, renormalize=False)
    torch.testing.assert_close(weights_only, probs.topk(3).values)


def _assert_same_layout(actual: MoERouting, expected: MoERouting, block_m: int) -> None:
    """The same blocks per expert, padding in the same rows, and the same slots in each
    expert's rows (their order within an expert is free)."""
    assert torch.equal(actual.block_experts, expected.block_experts)
    assert torch.equal(actual.num_padded_rows, expected.num_padded_rows)
    num_slots = expected.topk_ids.numel()
    assert torch.equal(actual.sorted_slots == num_slots, expected.sorted_slots == num_slots)
    row_experts = expected.block_experts.repeat_interleave(block_m).long()  # (rows,)

    def by_expert(sorted_slots: torch.Tensor) -> torch.Tensor:
        return (row_experts * (num_slots + 1) + sorted_slots).sort().values

    assert torch.equal(by_expert(actual.sorted_slots), by_expert(expected.sorted_slots))
