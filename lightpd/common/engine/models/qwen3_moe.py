"""Qwen3-MoE: Qwen3 (q/k norms) with the sparse MoE MLP, top-k renormalised."""

from lightpd.common.engine.models.moe import GATE_UP_DOWN_EXPERTS, sparse_mlp
from lightpd.common.engine.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    mlp_factory = staticmethod(sparse_mlp)
    expert_modules_mapping = GATE_UP_DOWN_EXPERTS
