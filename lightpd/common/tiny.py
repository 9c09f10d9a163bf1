"""Small random-weight checkpoints of real architectures, with a working tokenizer.

There is no model hub here: tests, `make run` and the benchmarks build these with
transformers itself, so our loader reads exactly what transformers writes.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")

BOS, EOS, PAD = "<|bos|>", "<|im_end|>", "<|pad|>"
# <|endoftext|>: Qwen2Tokenizer, which transformers picks for a qwen2 checkpoint, adds it
# as its unk token; in the vocabulary it has an id the model knows, as in real Qwen.
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|im_start|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = """
Disaggregated serving splits the prefill of a prompt from the decoding of its reply.
The prefill node computes the key and value cache of every layer and streams it to a
decode node, which joins the request to a running batch and emits one token per step.
Token attention keeps the cache as a pool of slots, one slot per token, so no memory
is lost to padding. The scheduler admits a request when the predicted peak of memory
fits the pool. Hello world! How are you today? The quick brown fox jumps over the lazy
dog. Tell me about large language models, GPUs, kernels, batching and latency.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . ; : ' " ? !
"""

# Shapes small enough for a CPU test, with GQA and distinct head_dim where the family has it.
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)
_FAMILIES = {
    "llama": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "mistral": dict(
        model_type="mistral", tie_word_embeddings=False, rope_theta=1e6, sliding_window=None
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, rope_theta=1e6, head_dim=32),
    # MoE: few narrow experts, top-2, so a CPU test runs every expert in milliseconds.
    "mixtral": dict(
        model_type="mixtral",
        tie_word_embeddings=False,
        rope_theta=1e6,
        intermediate_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    # Layer 1 keeps the dense MLP (mlp_only_layers); sparse layers add the shared expert.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        tie_word_embeddings=False,
        rope_theta=1e6,
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        tie_word_embeddings=False,
        rope_theta=1e6,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
}


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a small built-in corpus: any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    tie_word_embeddings: bool | None = None,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    overrides: dict | None = None,
) -> Path:
    """Write config.json, safetensors and tokenizer files of a random ``arch`` model.
    ``overrides`` changes config values (sizes, context length) for benchmarks."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    settings = {**_BASE, **_FAMILIES[arch], **(overrides or {})}
    if tie_word_embeddings is not None:
        settings["tie_word_embeddings"] = tie_word_embeddings
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Spread-out random weights, so greedy choices are not near-ties.
        for name, param in model.named_parameters():
            noise = torch.randn_like(param) * 0.1
            param.copy_(1.0 + noise if "norm" in name else noise)
    model = model.to(getattr(torch, dtype))
    shard = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
    model.save_pretrained(out, **shard)
    tokenizer.save_pretrained(out)
    # Record what was built, for people poking at the folder.
    (out / "lightpd_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "dtype": dtype}))
    return out
