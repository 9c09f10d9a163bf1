"""Mixtral: the Llama layout with a sparse MoE MLP in every layer."""

from typing import ClassVar

from lightpd.common.engine.models.llama import LlamaForCausalLM
from lightpd.common.engine.models.moe import sparse_mlp


class MixtralForCausalLM(LlamaForCausalLM):
    mlp_factory = staticmethod(sparse_mlp)
    # checkpoint module -> ours
    renamed_modules: ClassVar[dict[str, str]] = {"block_sparse_moe": "mlp"}
    # one expert's checkpoint projection -> (our stacked parameter, shard)
    expert_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "w1": ("w13", "gate"),
        "w3": ("w13", "up"),
        "w2": ("w2", "down"),
    }
