"""The fused MoE kernel against the copy bandwidth and the torch reference, in one run.

    python3 bench/moe_bench.py [--sweep]     (needs CUDA)
    python3 bench/moe_bench.py --tiny        (a smoke check on the CPU, Triton interpreted)

Mixtral-8x7B (H 4096, I 14336, 8 experts, top-2) and Qwen3-30B-A3B (H 2048, I 768,
128 experts, top-8) layer shapes, bf16, random weights and router logits, batch
1/16/64/256. Each call runs a different layer (its own weights and routing) in turn,
as a model does, so that no layer finds its experts in L2. Bandwidth counts the
bytes of the experts the batch routes to (the union of its top-k choices: w13 and w2
rows of those experts) plus hidden in and out, over the median time of one layer
replayed from a CUDA graph; the ceiling is a device-to-device copy measured here
(bytes read + written). The peer is ``fused_moe_reference`` (a loop over the experts
with tokens, as Hugging Face runs them), timed per call with its host syncs.
"""

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so before kernels/ is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightpd.kernels.fused_moe import (
    GemmTile,
    MoELaunch,
    fused_moe_reference,
    fused_moe_triton,
    moe_launch,
)
from lightpd.kernels.moe_routing import moe_route_reference


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    num_experts: int
    top_k: int
    renormalize: bool
    num_layers: int  # layers cycled through: their touched experts far exceed L2 (50 MB)


MIXTRAL = Shape("Mixtral-8x7B", 4096, 14336, 8, 2, True, 2)
QWEN3_MOE = Shape("Qwen3-30B-A3B", 2048, 768, 128, 8, True, 6)
TINY = Shape("tiny", 64, 48, 8, 2, True, 2)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn``, the device synchronized around each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median GPU time of ``fn``, replayed from a CUDA graph (no host launch latency)."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """TB/s of a large device copy, bytes read + written."""
    numel = (1 << 29) if device == "cuda" else (1 << 24)
    src = torch.randn(numel, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / ms / 1e9


class Layer:
    """One MoE layer's weights and one batch's hidden states and router logits."""

    def __init__(self, shape: Shape, batch: int, dtype: torch.dtype, device: str) -> None:
        e, h, i = shape.num_experts, shape.hidden, shape.inter
        self.w13 = torch.empty(e, 2 * i, h, dtype=dtype, device=device).normal_(0, h**-0.5)
        self.w2 = torch.empty(e, h, i, dtype=dtype, device=device).normal_(0, i**-0.5)
        self.hidden = torch.randn(batch, h, dtype=dtype, device=device)
        self.logits = torch.randn(batch, e, dtype=dtype, device=device)
        _, ids = moe_route_reference(self.logits, shape.top_k, shape.renormalize)
        self.num_touched = int(ids.unique().numel())
        weight_bytes = self.num_touched * 3 * h * i * self.w13.element_size()
        self.bytes = weight_bytes + 2 * self.hidden.numel() * self.hidden.element_size()

    def args(self, shape: Shape) -> tuple:
        return (self.hidden, self.logits, self.w13, self.w2, shape.top_k, shape.renormalize)


class Case:
    """``shape.num_layers`` layers at one batch size, run one after another."""

    def __init__(self, shape: Shape, batch: int, dtype: torch.dtype, device: str) -> None:
        self.shape, self.batch, self.device = shape, batch, device
        self.layers = [Layer(shape, batch, dtype, device) for _ in range(shape.num_layers)]
        self.bytes = sum(layer.bytes for layer in self.layers)

    def run_ours(self, launch: MoELaunch | None = None) -> None:
        for layer in self.layers:
            fused_moe_triton(*layer.args(self.shape), launch=launch)

    def run_reference(self) -> None:
        for layer in self.layers:
            fused_moe_reference(*layer.args(self.shape))

    def ours_ms(self, launch: MoELaunch | None = None) -> float:
        """Median time of one layer."""
        fn = lambda: self.run_ours(launch)
        ms = graph_ms(fn) if self.device == "cuda" else median_ms(fn, 3)
        return ms / len(self.layers)

    def reference_ms(self) -> float:
        return median_ms(self.run_reference, 10 if self.device == "cuda" else 3) / len(self.layers)

    def relative_error(self) -> float:
        """max |ours - reference| over max |reference|, on the first layer."""
        args = self.layers[0].args(self.shape)
        ours, ref = fused_moe_triton(*args).float(), fused_moe_reference(*args).float()
        return float((ours - ref).abs().max() / ref.abs().max())


def table(shape: Shape, batches: list[int], ceiling: float, dtype, device: str) -> None:
    print(
        f"\n{shape.name}: H {shape.hidden}, I {shape.inter}, {shape.num_experts} experts, "
        f"top-{shape.top_k}, {str(dtype).removeprefix('torch.')}"
    )
    print(
        "| batch | experts touched | block_m | time | ours | of copy bw | reference "
        "| ours / reference | rel. error |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in batches:
        case = Case(shape, batch, dtype, device)
        ms, ref_ms = case.ours_ms(), case.reference_ms()
        rate = case.bytes / len(case.layers) / ms / 1e9
        touched = statistics.mean(layer.num_touched for layer in case.layers)
        block_m = moe_launch(batch, shape.top_k, shape.num_experts).block_m
        print(
            f"| {batch} | {touched:.1f} | {block_m} | {ms * 1e3:.0f} us | {rate:.2f} TB/s "
            f"| {rate / ceiling:.0%} | {ref_ms * 1e3:.0f} us | {ref_ms / ms:.1f}x "
            f"| {case.relative_error():.1e} |",
            flush=True,
        )
        del case
        if device == "cuda":
            torch.cuda.empty_cache()


TILES = [
    GemmTile(n, k, w, s)
    for n, k, (w, s) in itertools.product(
        (32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (4, 5), (8, 3), (8, 4))
    )
]


def sweep(shape: Shape, batches: list[int], ceiling: float, dtype) -> None:
    """Try tiles for each GEMM in turn (gate/up with the default down, then down with
    the best gate/up), for each block_m; print the best five launches per batch."""
    for batch in batches:
        default = moe_launch(batch, shape.top_k, shape.num_experts)
        print(f"\n{shape.name} sweep, batch {batch}; default {default}")
        timed = sweep_case(Case(shape, batch, dtype, "cuda"), default)
        torch.cuda.empty_cache()
        for ms, rate, launch in timed[:5]:
            print(f"  {ms * 1e3:.0f} us, {rate:.2f} TB/s ({rate / ceiling:.0%}) {launch}")


def sweep_case(case: Case, default: MoELaunch) -> list[tuple[float, float, MoELaunch]]:
    """(ms, TB/s, launch) of each launch tried, fastest first."""
    timed: list[tuple[float, MoELaunch]] = []
    for block_m in (16, 32, 64):
        gate_up = [MoELaunch(block_m, t, default.down) for t in TILES if fits(block_m, t, 2)]
        best = min(gate_up, key=lambda launch: time_launch(case, launch, timed))
        for tile in TILES:
            if fits(block_m, tile, 1):
                time_launch(case, MoELaunch(block_m, best.gate_up, tile), timed)
    per_layer = case.bytes / len(case.layers)
    return [(ms, per_layer / ms / 1e9, launch) for ms, launch in sorted(timed, key=lambda r: r[0])]


def fits(block_m: int, tile: GemmTile, num_weight_tiles: int) -> bool:
    """Whether the pipeline's bf16 buffers fit in an H200 SM's 227 KiB of shared memory
    (the pipeliner keeps num_stages - 1 of them)."""
    stage = (block_m + num_weight_tiles * tile.block_n) * tile.block_k * 2
    return (tile.num_stages - 1) * stage <= 220 * 1024


def time_launch(case: Case, launch: MoELaunch, timed: list[tuple[float, MoELaunch]]) -> float:
    try:
        ms = case.ours_ms(launch)
    except Exception as exc:  # a tile that does not fit in shared memory
        print(f"  {launch}: {type(exc).__name__}", flush=True)
        return float("inf")
    timed.append((ms, launch))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description="Fused MoE against copy bandwidth and torch.")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke check")
    parser.add_argument("--sweep", action="store_true", help="also try launch configs (GPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("without CUDA only --tiny runs (the Triton interpreter)")
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceiling = copy_bandwidth(device)
    print(f"copy bandwidth (read + write): {ceiling:.2f} TB/s")
    if args.tiny:
        # The interpreter has no bf16 arithmetic.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        table(TINY, [1, 16], ceiling, dtype, device)
        return
    batches = [1, 16, 64, 256]
    for shape in (MIXTRAL, QWEN3_MOE):
        table(shape, batches, ceiling, torch.bfloat16, device)
    if args.sweep:
        for shape in (MIXTRAL, QWEN3_MOE):
            sweep(shape, batches, ceiling, torch.bfloat16)


if __name__ == "__main__":
    main()
