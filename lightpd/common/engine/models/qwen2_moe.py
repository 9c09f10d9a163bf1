"""Qwen2-MoE (Qwen1.5-MoE): Llama attention with q/k/v biases, and sparse layers
(``decoder_sparse_step``, ``mlp_only_layers``) whose MoE block adds a shared expert
behind a sigmoid gate; the top-k probabilities are not renormalised."""

from lightpd.common.engine.models.llama import LlamaForCausalLM
from lightpd.common.engine.models.moe import GATE_UP_DOWN_EXPERTS, sparse_mlp


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    mlp_factory = staticmethod(sparse_mlp)
    expert_modules_mapping = GATE_UP_DOWN_EXPERTS
