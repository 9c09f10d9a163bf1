"""Model registry: Hugging Face architecture name -> our module."""

from torch import nn

# Llama, Mistral and Qwen2 share one layout; they differ only in config values
# (biases, rope scaling), which the Llama modules read from ModelConfig.
_ARCHITECTURES = {
    "LlamaForCausalLM": ("lightpd.common.engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("lightpd.common.engine.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("lightpd.common.engine.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("lightpd.common.engine.models.qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("lightpd.common.engine.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("lightpd.common.engine.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("lightpd.common.engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}

SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


class UnsupportedArchitectureError(ValueError):
    pass


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    import importlib

    module_name, class_name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module_name), class_name)
