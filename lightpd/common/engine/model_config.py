"""The parts of a Hugging Face ``config.json`` that the engine uses, checked once."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelConfigError(ValueError):
    """The model directory or its config.json cannot be served."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelConfigError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts family."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each routed expert
    renormalize: bool  # divide the top-k probabilities by their sum
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    sparse_step: int = 1  # every sparse_step-th layer is sparse ...
    dense_layers: tuple[int, ...] = ()  # ... except these, which keep the dense MLP
    # Expert parallelism: the experts this engine holds (the other members of its
    # group hold the rest); None: all of them. Set by the engine, not the checkpoint.
    local_experts: range | None = None

    def __post_init__(self) -> None:
        local = self.local_experts
        if local is not None and not (0 <= local.start < local.stop <= self.num_experts):
            raise ModelConfigError(f"local experts {local} are not within 0..{self.num_experts}")
        if not 0 < self.top_k <= self.num_experts:
            raise ModelConfigError(
                f"num_experts_per_tok ({self.top_k}) must be in 1..num_experts ({self.num_experts})"
            )
        if self.intermediate_size <= 0 or self.sparse_step <= 0:
            raise ModelConfigError("moe intermediate size and decoder_sparse_step must be positive")

    def is_sparse(self, layer_id: int) -> bool:
        return layer_id not in self.dense_layers and (layer_id + 1) % self.sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path} not found: a model directory needs config.json")
        return cls.from_dict(json.loads(path.read_text()), Path(model_dir))

    @classmethod
    def from_dict(cls, raw: dict, model_dir: Path | None = None) -> "ModelConfig":
        from lightpd.common.engine.models import (
            get_model_class,  # the registry names the architectures
        )

        archs = raw.get("architectures") or []
        if len(archs) != 1:
            raise ModelConfigError(f"config.json must name exactly one architecture, got {archs}")
        get_model_class(archs[0])  # raises with the supported list
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        # Qwen2 has q/k/v biases (and none on o_proj): Qwen2-MoE says so in
        # `qkv_bias`, Qwen2 without a flag.
        attention_bias = raw.get("attention_bias", False)
        is_qwen2 = archs[0] in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        sliding = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:
            sliding = None
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=_parse_rope(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=raw.get("qkv_bias", True) if is_qwen2 else attention_bias,
            o_proj_bias=not is_qwen2 and attention_bias,
            mlp_bias=raw.get("mlp_bias", False),
            dtype=parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            eos_token_ids=_eos_ids(raw, model_dir),
            sliding_window=sliding,
            moe=_parse_moe(raw, archs[0]),
        )


def _parse_moe(raw: dict, architecture: str) -> MoEConfig | None:
    if architecture == "MixtralForCausalLM":
        # Every layer sparse, experts as wide as `intermediate_size`, top-k always renormalised.
        return MoEConfig(
            num_experts=raw["num_local_experts"],
            top_k=raw["num_experts_per_tok"],
            intermediate_size=raw["intermediate_size"],
            renormalize=True,
        )
    if architecture in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        # transformers writes Qwen3-MoE's count as `num_local_experts`; published
        # checkpoints say `num_experts`.
        num_experts = raw.get("num_experts", raw.get("num_local_experts"))
        if not num_experts:
            return None  # no experts: every layer keeps the dense MLP
        shared = 0
        if architecture == "Qwen2MoeForCausalLM":
            shared = raw["shared_expert_intermediate_size"]
        return MoEConfig(
            num_experts=num_experts,
            top_k=raw["num_experts_per_tok"],
            intermediate_size=raw["moe_intermediate_size"],
            renormalize=raw.get("norm_topk_prob", False),
            shared_expert_intermediate_size=shared,
            sparse_step=raw.get("decoder_sparse_step", 1),
            dense_layers=tuple(raw.get("mlp_only_layers") or ()),
        )
    return None


def _parse_rope(raw: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints
    # carry `rope_theta` and an optional `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _eos_ids(raw: dict, model_dir: Path | None) -> tuple[int, ...]:
    # generation_config.json is what `generate` stops on, so it wins over config.json.
    eos = raw.get("eos_token_id")
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        gen = json.loads((model_dir / "generation_config.json").read_text())
        eos = gen.get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
