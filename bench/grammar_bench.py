"""Structured output's cost: decode steps under a JSON schema, and grammar compile time.

    python3 bench/grammar_bench.py --out grammar.json          # an H200: Llama-3.1-8B shape
    python3 bench/grammar_bench.py --tiny                      # any machine: a tiny model

- decode: the engine's step time at batch 64 (512-token contexts) with every
  request under a JSON schema (a list of typical tool calls, long enough that
  no request ends while it is timed), against the same batch unconstrained.
  Target: at most 5% slower.
- compile: a typical tool schema (the arguments of a weather function) compiled
  cold (a fresh compiler over the 128k vocabulary) and cached (the same schema
  again), and the tokenizer's one-time preparation.

The model has random bf16 weights (``bench/engine_bench.py``'s Llama-3.1-8B shape)
and a synthetic byte-level BPE tokenizer of Llama 3's vocabulary size, since no
hub is reachable: its tokens are random merges of letters, digits and
punctuation, like a real vocabulary's in what a JSON mask must look at.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.grammar import GrammarCache
from lightpd.common.wire.sampling_params import GrammarSpec, SamplingParams

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "include": {
            "type": "array",
            "items": {"enum": ["temperature", "wind", "rain", "uv"]},
            "maxItems": 4,
        },
        "details": {
            "type": "object",
            "properties": {"hourly": {"type": "boolean"}, "lang": {"type": "string"}},
            "required": ["hourly"],
            "additionalProperties": False,
        },
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}
# What the decode batch writes: many tool calls, so no request finishes while timed.
CALLS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
    "minItems": 8,
}


def synthetic_tokenizer(out: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """A byte-level BPE of ``vocab_size`` tokens saved to ``out``: 256 bytes, random
    merges up to ``bos_id``, then special tokens (bos and eos at their ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(alphabet))}
    common = [c for c in "etaoinshrdlucmfwypvbgkjqxz" * 4 + 'ETAOINS0123456789Ġ{}[]":,._-']
    tokens, merges, rng = list(common), [], random.Random(0)
    while len(vocab) < bos_id:
        left = rng.choice(tokens) if rng.random() < 0.7 else rng.choice(common)
        right = rng.choice(common)
        if len(left) + len(right) > 12 or left + right in vocab:
            continue
        vocab[left + right] = len(vocab)
        merges.append((left, right))
        tokens.append(left + right)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [f"<|special_{i}|>" for i in range(vocab_size - bos_id)]
    specials[0], specials[eos_id - bos_id] = "<|begin_of_text|>", "<|end_of_text|>"
    backend.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=specials[0], eos_token=specials[eos_id - bos_id]
    )
    fast.save_pretrained(out)


def model_dir(tiny: bool, work: Path) -> Path:
    if tiny:
        from lightpd.common.tiny import write_tiny_checkpoint

        return write_tiny_checkpoint(work / "tiny", "llama")
    from bench.engine_bench import LLAMA_31_8B, build_model

    out = work / "llama-8b"
    build_model(out, LLAMA_31_8B["num_hidden_layers"])
    sizes = LLAMA_31_8B
    synthetic_tokenizer(out, sizes["vocab_size"], sizes["bos_token_id"], sizes["eos_token_id"])
    torch.cuda.empty_cache()
    return out


def bench_compile(model: str, vocab_size: int, eos: tuple[int, ...]) -> dict:
    cache = GrammarCache(model, vocab_size, eos)
    warm = GrammarSpec("regex", "a")
    start = time.perf_counter()
    cache.compile(warm).result()  # builds the tokenizer info and the compiler
    prepare_s = time.perf_counter() - start
    spec = GrammarSpec("json_schema", json.dumps(WEATHER))
    start = time.perf_counter()
    cache.compile(spec).result()
    cold_ms = (time.perf_counter() - start) * 1e3
    cached = []
    for _ in range(100):
        start = time.perf_counter()
        cache.compile(GrammarSpec("json_schema", json.dumps(WEATHER))).result()
        cached.append((time.perf_counter() - start) * 1e3)
    cache.close()
    result = dict(
        tokenizer_prepare_s=prepare_s,
        schema_chars=len(spec.text),
        cold_compile_ms=cold_ms,
        cached_compile_ms=statistics.median(cached),
    )
    print(json.dumps(result), flush=True)
    return result


def bench_decode(engine: LLMEngine, batch: int, context: int, steps: int, grammar) -> dict:
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, min(vocab, 32000), (batch, context - 1), generator=gen).tolist()
    # Greedy over random weights: a constrained request writes calls until max_new_tokens.
    params = SamplingParams(
        max_new_tokens=steps + 16, temperature=0, ignore_eos=grammar is None, grammar=grammar
    )
    tag = "json" if grammar else "free"
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{batch}-{i}", prompt, params)
    while engine.scheduler.waiting or any(
        r.num_output_tokens == 0 for r in engine.scheduler.running
    ):
        engine.step()  # prefill every prompt first (and compile the grammar)
    step_ms, sizes = [], []
    for _ in range(steps):
        sizes.append(len(engine.scheduler.running))
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - start) * 1e3)
    while engine.has_unfinished():
        engine.step()
    assert min(sizes) == batch, f"requests ended while timed: batch sizes {sizes}"
    steady = step_ms[5:]
    result = dict(batch=batch, grammar=tag, step_ms=statistics.median(steady), steps=len(steady))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model, CPU or GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.context, args.steps = min(args.batch, 8), min(args.context, 64), 12
    with tempfile.TemporaryDirectory() as work:
        model = str(model_dir(args.tiny, Path(work)))
        engine = LLMEngine(
            EngineConfig(
                model=model,
                device=args.device,
                max_num_reqs=max(args.batch, 8),
                cuda_graph_max_batch=max(args.batch, 8),
                num_kv_slots=None if not args.tiny else 4096,
            )
        )
        mc = engine.model_config
        results = dict(
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            model="tiny llama" if args.tiny else "Llama-3.1-8B shape, random bf16",
            vocab_size=mc.vocab_size,
            compile=bench_compile(model, mc.vocab_size, mc.eos_token_ids),
        )
        spec = GrammarSpec("json_schema", json.dumps(CALLS))
        runs = [None, spec, None, spec]  # alternate, so drift does not favour either
        decode = [bench_decode(engine, args.batch, args.context, args.steps, g) for g in runs]
        free = statistics.mean(r["step_ms"] for r in decode if r["grammar"] == "free")
        constrained = statistics.mean(r["step_ms"] for r in decode if r["grammar"] == "json")
        results["decode"] = dict(
            runs=decode,
            free_step_ms=free,
            json_step_ms=constrained,
            slowdown=constrained / free - 1,
        )
        print(json.dumps(results["decode"] | {"runs": None}), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
