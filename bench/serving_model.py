"""A Llama-3.1-8B-shaped checkpoint with random bf16 weights and a full-vocabulary tokenizer.

    python3 -m bench.serving_model --out DIR [--device cuda:0] [--small]
        [--shape qwen3-30b-a3b --layers 4]

The fleet needs a tokenizer whose vocabulary covers every id the model can emit
(the control plane detokenizes each one), and there is no hub here. So the
tokenizer is a word-level one with one word per id ("w0", "w1", ...; decoding
joins them with spaces), the special tokens of common.tiny and its chat
template. The weights are transformers' own random initialization, made on
``--device`` (fast on a GPU) and saved as safetensors shards. ``--small`` writes
a 2-layer model of the same family for trying the scripts on a CPU. ``--shape``
picks another of bench.engine_bench's SHAPES (the MoE ones), ``--layers`` fewer
layers of it.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from bench.engine_bench import SHAPES
from lightpd.common.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

SMALL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=16384,
)
# --small of an MoE shape: few narrow experts as well.
SMALL_EXPERTS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One whitespace-separated word per id; the special tokens take the last ids."""
    num_words = vocab_size - len(SPECIAL_TOKENS)
    vocab = {f"w{i}": i for i in range(num_words)}
    vocab |= {token: num_words + j for j, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_model(
    out: Path,
    device: str,
    small: bool = False,
    shape_name: str = "llama-8b",
    num_layers: int | None = None,
) -> Path:
    model_type, sizes = SHAPES[shape_name]
    shape = {**sizes, **({**SMALL, **SMALL_EXPERTS.get(model_type, {})} if small else {})}
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    tokenizer = word_tokenizer(shape["vocab_size"])
    shape |= dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(model_type, **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), torch.no_grad():
            model = AutoModelForCausalLM.from_config(config)  # transformers' random init
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    (out / "lightpd_bench_model.json").write_text(
        json.dumps({"name": shape_name, "shape": shape, "random": True})
    )
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="2 layers, hidden 256 (CPU tries)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape has")
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(f"{args.out} already holds a model; kept", flush=True)
        return
    started = time.perf_counter()
    write_model(args.out, args.device, args.small, args.shape, args.layers)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(
        f"wrote {'a small ' if args.small else ''}{args.shape}-shaped random bf16 model "
        f"({size / 2**30:.2f} GiB) to {args.out} in {time.perf_counter() - started:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
