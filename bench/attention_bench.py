"""Attention kernels on the GPU against the card's ceilings and torch SDPA, in one run.

    python3 bench/attention_bench.py    (needs CUDA)

Decode: GQA 32/8, head dim 128, bf16, KV in a token pool at shuffled slots. Bandwidth
counts the KV bytes read (plus q and out) over the median time; the ceiling is a
device-to-device copy measured here (bytes read + written), the peer is SDPA on
contiguous KV of the same shape. Prefill: causal, fresh prompts, TFLOP/s over the
causal half of the score matrix, against an 8192^3 bf16 matmul measured here.
"""

import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention_triton
from kernels.prefill_attention import prefill_attention_triton

HQ, HK, D, DTYPE = 32, 8, 128, torch.bfloat16


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / ms / 1e9  # TB/s


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    ms = median_ms(lambda: a @ b, 20)
    return 2 * 8192**3 / ms / 1e9


def pool(num_tokens: int):
    slots = torch.randperm(num_tokens * 2, device="cuda")[:num_tokens].int()
    k_cache = torch.randn(num_tokens * 2, HK, D, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    return slots, k_cache, v_cache


def decode_case(batch: int, context: int, ceiling: float) -> str:
    slots, k_cache, v_cache = pool(batch * context)
    req_to_token = slots.view(batch, context)
    rows = torch.arange(batch, device="cuda")
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    ms = median_ms(
        lambda: decode_attention_triton(
            q, k_cache, v_cache, req_to_token, rows, seq_lens, D**-0.5, context
        )
    )
    kv_bytes = 2 * batch * context * HK * D * 2 + 2 * q.numel() * 2
    ours = kv_bytes / ms / 1e9
    kc = torch.randn(batch, HK, context, D, dtype=DTYPE, device="cuda")
    vc = torch.randn_like(kc)
    q4 = q.view(batch, HQ, 1, D)
    sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
    peer = kv_bytes / sdpa_ms / 1e9
    return (
        f"| {batch} | {context} | {ms * 1e3:.0f} us | {ours:.2f} TB/s | {ours / ceiling:.0%} "
        f"| {peer:.2f} TB/s | {ours / peer:.2f}x |"
    )


def prefill_case(tokens: int, peak: float) -> str:
    slots, k_cache, v_cache = pool(tokens)
    req_to_token = slots.view(1, tokens)
    q = torch.randn(tokens, HQ, D, dtype=DTYPE, device="cuda")
    rows = torch.zeros(1, dtype=torch.int64, device="cuda")
    cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    ms = median_ms(
        lambda: prefill_attention_triton(
            q, k_cache, v_cache, req_to_token, rows, cu, lens, D**-0.5, tokens
        ),
        20,
    )
    flops = 4 * tokens * tokens * HQ * D / 2  # QK^T and PV, causal half
    ours = flops / ms / 1e9
    qc = q.transpose(0, 1).unsqueeze(0)
    kc = k_cache[slots.long()].transpose(0, 1).unsqueeze(0)
    vc = v_cache[slots.long()].transpose(0, 1).unsqueeze(0)
    sdpa_ms = median_ms(
        lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True), 20
    )
    peer = flops / sdpa_ms / 1e9
    return (
        f"| {tokens} | {ms:.2f} ms | {ours:.0f} TFLOP/s | {ours / peak:.0%} "
        f"| {peer:.0f} TFLOP/s | {ours / peer:.2f}x |"
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceiling = copy_bandwidth()
    peak = matmul_tflops()
    print(
        f"copy bandwidth (read + write): {ceiling:.2f} TB/s; bf16 matmul 8192^3: {peak:.0f} "
        "TFLOP/s\n"
    )
    print("Decode token attention, GQA 32/8, head dim 128, bf16, shuffled slots")
    print("| batch | context | time | ours | of copy bw | SDPA (contiguous KV) | ours / SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in (1, 16, 64, 256):
        for context in (512, 2048, 8192):
            print(decode_case(batch, context, ceiling), flush=True)
    print("\nPrefill attention, causal, one fresh prompt, GQA 32/8, head dim 128, bf16")
    print("| tokens | time | ours | of matmul rate | SDPA (contiguous) | ours / SDPA |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in (1024, 4096, 16384):
        print(prefill_case(tokens, peak), flush=True)


if __name__ == "__main__":
    main()
