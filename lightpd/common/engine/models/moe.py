"""The mixture-of-experts MLP: a router, stacked experts, and an optional shared expert.

A family picks it with ``mlp_factory = staticmethod(sparse_mlp)``; the dense
families never see this file. The routed experts are one function call,
``moe_experts`` (the fused Triton kernel, ``kernels/fused_moe.py``), in one
module, ``MoEExperts``, which expert parallelism wraps or swaps.

Expert weights are stacked per layer, whatever the checkpoint calls them:
``w13`` [E, 2I, H] holds each expert's gate rows then its up rows, ``w2``
[E, H, I] its down projection. Checkpoints store one tensor per expert and
projection; ``MoEExperts.load_expert`` copies each into its rows at load time.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lightpd.common.engine.layers.linear import default_weight_loader
from lightpd.common.engine.model_config import ModelConfig, MoEConfig
from lightpd.common.engine.models.llama import LlamaMLP
from lightpd.kernels.fused_moe import fused_moe
from lightpd.kernels.moe_routing import local_expert_map, moe_route_reference

# One expert's checkpoint projection -> (our stacked parameter, shard), for the
# families whose experts are named like the dense MLP (Qwen2-MoE, Qwen3-MoE).
GATE_UP_DOWN_EXPERTS = {
    "gate_proj": ("w13", "gate"),
    "up_proj": ("w13", "up"),
    "down_proj": ("w2", "down"),
}


def moe_experts_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]:
    sum over each token's top-k experts of weight * down(silu(gate(x)) * up(x)).

    Every expert runs on every token, and a token's weight is zero for the experts
    it was not routed to. That costs E / top_k times the routed work, but the
    shapes are fixed and nothing waits on the host (no nonzero, no per-expert
    token counts), so a decode step with it can be captured in a CUDA graph. The
    kernel does only the routed work: tokens sorted by expert, padded to its
    block size, with fixed-size buffers for the same reason.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    weights, expert_ids = moe_route_reference(router_logits, top_k, renormalize)
    # (T, E): each token's weight for every expert, zero where it was not routed
    combine = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=hidden.device)
    combine.scatter_(1, expert_ids.long(), weights)
    out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    for expert in range(num_experts):
        gate, up = F.linear(hidden, w13[expert]).chunk(2, dim=-1)  # (T, I) each
        down = F.linear(F.silu(gate) * up, w2[expert])  # (T, H)
        out += combine[:, expert, None] * down
    return out.to(hidden.dtype)


# The routed experts: the fused Triton kernel on GPUs (routing, tokens sorted by expert,
# two grouped GEMMs), its plain-PyTorch reference elsewhere. The dense reference above
# stays as the definition the tests hold both to.
moe_experts = fused_moe


class MoEExperts(nn.Module):
    """The routed experts of one layer, stacked: w13 [E, 2I, H], w2 [E, H, I].

    Under expert parallelism (``moe.local_experts``) it holds only its share, E_local
    of them, and its output is that share of the layer: tokens routed to experts held
    elsewhere contribute zero here (the group sums the members' shares,
    ``common/engine/expert_parallel.py``). The others' checkpoint tensors are skipped
    by the loader, never read."""

    def __init__(self, moe: MoEConfig, hidden_size: int) -> None:
        super().__init__()
        num_experts, inter = moe.num_experts, moe.intermediate_size
        local = moe.local_experts or range(num_experts)
        self.num_experts = num_experts
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.first_expert = local.start
        self.w13 = nn.Parameter(torch.empty(len(local), 2 * inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(len(local), hidden_size, inter))
        # (first row, rows) of each checkpoint projection inside an expert's matrix
        self.rows = {"gate": (0, inter), "up": (inter, inter), "down": (0, hidden_size)}
        # The loader expects exactly these (expert, projection) tensors for each, and
        # skips those of the experts other members hold.
        others = [e for e in range(num_experts) if e not in local]
        self.w13.shards = {(e, p) for e in local for p in ("gate", "up")}
        self.w13.skipped_shards = {(e, p) for e in others for p in ("gate", "up")}
        self.w2.shards = {(e, "down") for e in local}
        self.w2.skipped_shards = {(e, "down") for e in others}
        for param in (self.w13, self.w2):
            param.weight_loader = self.load_expert
        self.expert_map: torch.Tensor | None = None
        if len(local) < num_experts:
            self.expert_map = local_expert_map(
                num_experts, local.start, len(local), self.w13.device
            )

    def load_expert(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]
    ) -> None:
        expert, projection = shard
        start, size = self.rows[projection]
        default_weight_loader(param.data[expert - self.first_expert].narrow(0, start, size), loaded)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return moe_experts(
            hidden,
            router_logits,
            self.w13,
            self.w2,
            self.top_k,
            self.renormalize,
            self.expert_map,
        )


class SparseMoeBlock(nn.Module):
    """Router and routed experts, plus Qwen2-MoE's shared expert behind a sigmoid gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = MoEExperts(moe, config.hidden_size)
        self.shared_expert = None
        self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(config, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))  # (T, H)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out


def sparse_mlp(config: ModelConfig, layer_id: int) -> nn.Module:
    """The MLP factory of the MoE families: the sparse block on the layers the config
    makes sparse (``decoder_sparse_step``, ``mlp_only_layers``), the dense MLP elsewhere."""
    if config.moe is not None and config.moe.is_sparse(layer_id):
        return SparseMoeBlock(config)
    return LlamaMLP(config)
