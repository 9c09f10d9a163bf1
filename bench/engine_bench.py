"""The engine on a GPU against the card's ceilings and Hugging Face ``generate``, in one run.

    python3 bench/engine_bench.py --out results.json [--only decode,prefill,offline,hf]

Builds a Llama-3.1-8B-shaped model with random bf16 weights on the GPU, saves it
as safetensors, and measures (each part can be picked with ``--only``):

- decode: the engine's step time at batch 1/32/128/256 with 512-token contexts,
  beside the roofline bound (weights + KV bytes over the copy bandwidth measured
  here), and the graph replay alone (the GPU's share of the step);
- prefill: one prompt of 1k-8k tokens, tokens/s and MFU against the bf16 matmul
  rate measured here;
- offline: 512 prompts of 512 random tokens generating 128 each, output tok/s;
- hf: transformers ``generate`` with a static cache on the same weights and prompts.
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from bench.attention_bench import copy_bandwidth, matmul_tflops, median_ms
from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.wire.sampling_params import SamplingParams

LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


# Qwen3-30B-A3B's shape: 128 experts of width 768, 8 routed per token (renormalised).
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# Mixtral-8x7B's shape: 8 experts of width 14336, 2 routed per token.
MIXTRAL_8X7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SHAPES = {
    "llama-8b": ("llama", LLAMA_31_8B),
    "qwen3-30b-a3b": ("qwen3_moe", QWEN3_30B_A3B),
    "mixtral-8x7b": ("mixtral", MIXTRAL_8X7B),
}


def build_model(out: Path, num_layers: int, shape: str = "llama-8b") -> torch.nn.Module:
    """A random bf16 model of ``shape`` (see SHAPES) on the GPU, also saved to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, sizes = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **{**sizes, "num_hidden_layers": num_layers})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if not (out / "config.json").is_file():
        model.save_pretrained(out, max_shard_size="5GB")
    return model


def weight_bytes_read_per_step(engine: LLMEngine) -> int:
    """Every parameter is read once per decode step except the embedding table,
    of which only the batch's rows are read."""
    model = engine.runner.model
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.lm_head.weight is embed
    return total if tied else total - embed.numel() * embed.element_size()


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=gen).tolist()


def bench_decode(
    engine: LLMEngine, copy_bw: float, batches: list[int], context: int, temperature: float = 0.0
) -> list:
    """Steady-state decode steps of ``batch`` requests whose contexts start at ``context``;
    greedy, or sampled at ``temperature`` over the whole vocabulary."""
    runner, results = engine.runner, []
    weights = weight_bytes_read_per_step(engine)
    kv_per_token = engine.model_config.kv_bytes_per_token
    for batch in batches:
        prompts = random_prompts(batch, context - 1, engine.model_config.vocab_size, batch)
        params = SamplingParams(max_new_tokens=64, ignore_eos=True, temperature=temperature)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"decode-{batch}-{temperature}-{i}", prompt, params)
        while engine.scheduler.waiting or any(
            r.num_output_tokens == 0 for r in engine.scheduler.running
        ):
            engine.step()  # prefill every prompt first
        step_ms, contexts = [], []
        for _ in range(40):
            contexts.append(sum(r.num_tokens for r in engine.scheduler.running))
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - start) * 1e3)
        # The forward pass alone, replayed on the same requests: the GPU's share of a step.
        running = engine.scheduler.running
        rows, ends = [r.row for r in running], [r.num_tokens for r in running]
        forward_ms = median_ms(lambda rows=rows, ends=ends: runner.graphs.replay(rows, ends), 20)
        while engine.has_unfinished():
            engine.step()
        steady = step_ms[5:]
        median_step = statistics.median(steady)
        mean_context = statistics.mean(contexts[5:])
        bound_ms = (weights + mean_context * kv_per_token) / copy_bw / 1e9
        results.append(
            dict(
                batch=batch,
                temperature=temperature,
                mean_context_tokens=mean_context / batch,
                step_ms=median_step,
                forward_ms=forward_ms,
                host_ms=median_step - forward_ms,
                roofline_ms=bound_ms,
                of_roofline=bound_ms / median_step,
                output_tok_s=batch / median_step * 1e3,
                roofline_tok_s=batch / bound_ms * 1e3,
            )
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def model_flops(engine: LLMEngine, num_tokens: int) -> float:
    """Matmul FLOPs of one prompt: 2 per weight per token (embedding lookups excluded,
    the head on the last token only) plus causal attention (QK^T and PV)."""
    mc, model = engine.model_config, engine.runner.model
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    head = model.lm_head.weight.numel()
    attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * num_tokens * num_tokens / 2
    return 2 * layer_params * num_tokens + 2 * head + attention


def bench_prefill(engine: LLMEngine, peak_tflops: float, lengths: list[int]) -> list:
    results = []
    for length in lengths:
        [prompt] = random_prompts(1, length, engine.model_config.vocab_size, length)
        ms = median_ms(lambda prompt=prompt: engine.runner.prompt_logits([prompt]), 10)
        tflops = model_flops(engine, length) / ms / 1e9
        results.append(
            dict(
                tokens=length,
                ms=ms,
                tok_s=length / ms * 1e3,
                tflops=tflops,
                mfu=tflops / peak_tflops,
            )
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def bench_offline(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0)
    engine.generate(prompts[:8], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    num_out = sum(map(len, outputs))
    assert num_out == len(prompts) * new_tokens, num_out
    result = dict(prompts=len(prompts), output_tokens=num_out, s=seconds, tok_s=num_out / seconds)
    print(json.dumps(result), flush=True)
    return result


def bench_hf(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, batch: int) -> dict:
    """transformers ``generate``, greedy, static cache, ``batch`` prompts at a time."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(chunk: list[list[int]], max_new: int) -> torch.Tensor:
        ids = torch.tensor(chunk, device="cuda")
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            cache_implementation="static",
        )

    with torch.inference_mode():
        run(prompts[:batch], new_tokens)  # warm up (and compile, if it does) at full shape
        torch.cuda.synchronize()
        start = time.perf_counter()
        num_out = 0
        for i in range(0, len(prompts), batch):
            out = run(prompts[i : i + batch], new_tokens)
            num_out += (out.shape[1] - len(prompts[0])) * out.shape[0]
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = dict(prompts=len(prompts), batch=batch, output_tokens=num_out, s=seconds)
    result["tok_s"] = num_out / seconds
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama-8b-random"))
    parser.add_argument("--only", default="hf,decode,prefill,offline")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--hf-batch", type=int, default=128)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    torch.manual_seed(0)
    results: dict = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    results["copy_tb_s"] = copy_bw = copy_bandwidth()
    results["matmul_tflops"] = peak = matmul_tflops()
    print(json.dumps(results), flush=True)
    hf_model = build_model(args.model_dir, args.layers, args.shape)
    prompts = random_prompts(args.num_prompts, 512, SHAPES[args.shape][1]["vocab_size"], 0)
    if "hf" in parts:
        results["hf_generate_static"] = bench_hf(hf_model, prompts, 128, args.hf_batch)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    if parts & {"decode", "prefill", "offline"}:
        start = time.perf_counter()
        engine = LLMEngine(
            EngineConfig(
                model=str(args.model_dir),
                device="cuda",
                max_num_reqs=512,
                cuda_graph_max_batch=512,
                max_model_len=16384,
            )
        )
        results["engine_start_s"] = time.perf_counter() - start
        results["kv_slots"] = engine.runner.pool.num_slots
        print(json.dumps({k: results[k] for k in ("engine_start_s", "kv_slots")}), flush=True)
        if "decode" in parts:
            results["decode"] = bench_decode(engine, copy_bw, [1, 32, 128, 256], 512)
            results["decode_sampled"] = bench_decode(engine, copy_bw, [1, 128], 512, 1.0)
        if "prefill" in parts:
            results["prefill"] = bench_prefill(engine, peak, [1024, 2048, 4096, 8192])
        if "offline" in parts:
            results["offline"] = bench_offline(engine, prompts, 128)
    if "hf_generate_static" in results and "offline" in results:
        results["offline_vs_hf"] = (
            results["offline"]["tok_s"] / results["hf_generate_static"]["tok_s"]
        )
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
