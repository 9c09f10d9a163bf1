"""Attention kernels on the GPU against the card's ceilings and torch SDPA, in one run.

    python3 bench/attention_bench.py [--sweep]    (needs CUDA)

Decode: GQA 32/8, head dim 128, bf16, KV in a token pool at shuffled slots. Bandwidth
counts the KV bytes read (plus q and out) over the median time; the ceiling is a
device-to-device copy measured here (bytes read + written), the peer is SDPA on
contiguous KV of the same shape. Prefill: causal, fresh prompts, TFLOP/s over the
causal half of the score matrix, against an 8192^3 bf16 matmul measured here.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from lightpd.kernels.decode_attention import DecodeLaunch, decode_attention_triton, decode_launch
from lightpd.kernels.prefill_attention import PrefillLaunch, prefill_attention_triton

HQ, HK, D, DTYPE = 32, 8, 128, torch.bfloat16


def median_ms(fn, repeats: int = 50) -> float:
    """Median wall time of ``fn`` on the GPU, host launch latency included."""
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


def graph_ms(fn, calls: int = 10, repeats: int = 20) -> float:
    """Median GPU time of one ``fn`` call, replayed from a CUDA graph of ``calls`` calls,
    as the engine runs its kernels: the host's launch latency is not in it."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, repeats) / calls


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


class DecodeCase:
    """``batch`` requests of ``context`` tokens each at shuffled slots of a pool."""

    def __init__(self, batch: int, context: int) -> None:
        self.batch, self.context = batch, context
        slots, self.k_cache, self.v_cache = pool(batch * context)
        self.req_to_token = slots.view(batch, context)
        self.rows = torch.arange(batch, device="cuda")
        self.seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        self.q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
        self.bytes = 2 * batch * context * HK * D * 2 + 2 * self.q.numel() * 2  # KV + q + out

    def ours(self, launch: DecodeLaunch | None = None) -> tuple[float, float]:
        """(median ms, TB/s) of our kernel."""
        args = (self.q, self.k_cache, self.v_cache, self.req_to_token, self.rows, self.seq_lens)
        ms = graph_ms(lambda: decode_attention_triton(*args, D**-0.5, self.context, launch))
        return ms, self.bytes / ms / 1e9

    def sdpa(self) -> float:
        """TB/s of torch SDPA on contiguous KV of the same shape."""
        kc = torch.randn(self.batch, HK, self.context, D, dtype=DTYPE, device="cuda")
        vc = torch.randn_like(kc)
        q4 = self.q.view(self.batch, HQ, 1, D)
        ms = graph_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
        return self.bytes / ms / 1e9


class PrefillCase:
    """One fresh causal prompt of ``tokens`` tokens at shuffled slots of a pool."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.slots, self.k_cache, self.v_cache = pool(tokens)
        self.req_to_token = self.slots.view(1, tokens)
        self.q = torch.randn(tokens, HQ, D, dtype=DTYPE, device="cuda")
        self.rows = torch.zeros(1, dtype=torch.int64, device="cuda")
        self.cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
        self.lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
        self.flops = 4 * tokens * tokens * HQ * D / 2  # QK^T and PV, causal half

    def ours(self, launch: PrefillLaunch | None = None) -> tuple[float, float]:
        """(median ms, TFLOP/s) of our kernel."""
        args = (self.q, self.k_cache, self.v_cache, self.req_to_token, self.rows, self.cu)
        ms = median_ms(
            lambda: prefill_attention_triton(*args, self.lens, D**-0.5, self.tokens, launch),
            20,
        )
        return ms, self.flops / ms / 1e9

    def sdpa(self) -> float:
        qc = self.q.transpose(0, 1).unsqueeze(0)  # (1, Hq, T, D)
        kc = self.k_cache[self.slots.long()].transpose(0, 1).unsqueeze(0)  # (1, Hk, T, D)
        vc = self.v_cache[self.slots.long()].transpose(0, 1).unsqueeze(0)
        ms = median_ms(
            lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True),
            20,
        )
        return self.flops / ms / 1e9


def decode_row(batch: int, context: int, ceiling: float) -> str:
    case = DecodeCase(batch, context)
    ms, ours = case.ours()
    peer = case.sdpa()
    return (
        f"| {batch} | {context} | {ms * 1e3:.0f} us | {ours:.2f} TB/s | {ours / ceiling:.0%} "
        f"| {peer:.2f} TB/s | {ours / peer:.2f}x |"
    )


def prefill_row(tokens: int, peak: float) -> str:
    case = PrefillCase(tokens)
    ms, ours = case.ours()
    peer = case.sdpa()
    return (
        f"| {tokens} | {ms:.2f} ms | {ours:.0f} TFLOP/s | {ours / peak:.0%} "
        f"| {peer:.0f} TFLOP/s | {ours / peer:.2f}x |"
    )


def sweep(case: DecodeCase | PrefillCase, configs: list, unit: str, ceiling: float) -> None:
    """Time every launch of ``configs`` on ``case``; print the best five."""
    timed = []
    for launch in configs:
        try:
            timed.append((case.ours(launch)[1], launch))
        except Exception as exc:  # a tile that does not fit in shared memory
            print(f"  {launch}: {type(exc).__name__}")
    for rate, launch in sorted(timed, key=lambda r: -r[0])[:5]:
        print(f"  {rate:.2f} {unit} ({rate / ceiling:.0%}) {launch}", flush=True)


def decode_sweep(ceiling: float) -> None:
    configs = [
        DecodeLaunch(num_splits=s, block_n=n, num_warps=w, num_stages=st)
        for s, n, w, st in itertools.product((1, 2, 4, 8, 16, 32), (64, 128), (2, 4, 8), (2, 3))
    ]
    for batch, context in ((1, 2048), (16, 2048), (64, 512), (64, 2048), (256, 512), (16, 8192)):
        default = decode_launch(batch, HK, context)
        print(f"decode sweep, batch {batch}, context {context}; default {default}")
        sweep(DecodeCase(batch, context), configs, "TB/s", ceiling)


def prefill_sweep(peak: float) -> None:
    configs = [
        PrefillLaunch(block_m=m, block_n=n, num_warps=w, num_stages=st)
        for m, n, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
    ]
    print("prefill sweep, 4096 tokens")
    sweep(PrefillCase(4096), configs, "TFLOP/s", peak)


def main() -> None:
    parser = argparse.ArgumentParser(description="Attention kernels against ceilings and SDPA.")
    parser.add_argument("--sweep", action="store_true", help="also try every launch config")
    args = parser.parse_args()
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
            print(decode_row(batch, context, ceiling), flush=True)
    print("\nPrefill attention, causal, one fresh prompt, GQA 32/8, head dim 128, bf16")
    print("| tokens | time | ours | of matmul rate | SDPA (contiguous) | ours / SDPA |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in (1024, 4096, 16384):
        print(prefill_row(tokens, peak), flush=True)
    if args.sweep:
        decode_sweep(ceiling)
        prefill_sweep(peak)


if __name__ == "__main__":
    main()
