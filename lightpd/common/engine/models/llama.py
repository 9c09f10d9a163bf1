"""The Llama family: Llama 2/3/3.1/3.2, Mistral and Qwen2 (config-driven differences)."""

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from lightpd.common.engine.layers.attention import Attention
from lightpd.common.engine.layers.linear import PackedLinear
from lightpd.common.engine.layers.norm import RMSNorm
from lightpd.common.engine.layers.rotary import RotaryEmbedding
from lightpd.common.engine.model_config import ModelConfig
from lightpd.kernels.silu_and_mul import silu_and_mul


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = PackedLinear(
            config.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=config.qkv_bias,
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope
        )
        self.attn = Attention(layer_id, config.num_heads, config.num_kv_heads, config.head_dim)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for per-head q/k normalization (Qwen3); Llama has none."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        q, k = self.normalize_qk(q, k)
        self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # (T, Hq, D)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = PackedLinear(
            config.hidden_size, {"gate": size, "up": size}, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


# Builds the MLP of layer ``layer_id``: the hook where MoE families put their sparse block.
MLPFactory = Callable[[ModelConfig, int], nn.Module]


def dense_mlp(config: ModelConfig, layer_id: int) -> nn.Module:
    return LlamaMLP(config)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        attention_cls: type[LlamaAttention],
        mlp_factory: MLPFactory,
    ) -> None:
        super().__init__()
        self.self_attn = attention_cls(config, layer_id)
        self.mlp = mlp_factory(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add of each sub-block is fused into the norm that follows it.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, attention_cls: type[LlamaAttention], mlp_factory: MLPFactory
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attention_cls, mlp_factory)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, H)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention
    mlp_factory: MLPFactory = staticmethod(dense_mlp)
    # checkpoint projection -> (our fused module, shard)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention_cls, self.mlp_factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, H] of packed tokens; the runner picks the rows it needs logits of."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
