"""Plot decode throughput against batch size beside the roofline, from engine_bench's JSON.

python3 bench/plot_decode.py RESULTS.json docs/img/decode_roofline.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Llama-3.1-8B bf16: weights read per decode step (all but the embedding table) and
# KV bytes per token; the bench's JSON gives the measured figures, these draw the line.
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
# The card's copy bandwidth as ../shared/PERF.md measured it, for a second, stricter line.
PERF_COPY_TB_S = 3.02


def main(results_path: str, out_path: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    decode = results["decode"]
    copy_bw = results["copy_tb_s"] * 1e12
    first = decode[0]
    # Recover the weight bytes from the batch-1 bound: roofline = (W + ctx * kv) / bw.
    weights = (
        first["roofline_ms"] / 1e3 * copy_bw - first["mean_context_tokens"] * KV_BYTES_PER_TOKEN
    )
    context = first["mean_context_tokens"]
    batches = list(range(1, 257))
    bound = [b / ((weights + b * context * KV_BYTES_PER_TOKEN) / copy_bw) for b in batches]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(batches, bound, color="0.4", label=f"roofline ({results['copy_tb_s']:.2f} TB/s copy)")
    strict = [t * PERF_COPY_TB_S * 1e12 / copy_bw for t in bound]
    ax.plot(batches, strict, "--", color="0.6", label=f"roofline ({PERF_COPY_TB_S} TB/s, PERF.md)")
    ax.plot(
        [d["batch"] for d in decode],
        [d["output_tok_s"] for d in decode],
        "o-",
        color="tab:blue",
        label="lightpd decode step (CUDA graphs, greedy)",
    )
    for d in decode:
        ax.annotate(
            f"{d['of_roofline']:.0%}",
            (d["batch"], d["output_tok_s"]),
            textcoords="offset points",
            xytext=(4, -12),
        )
    ax.set_xlabel("batch size (requests decoding, ~534-token contexts)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Llama-3.1-8B-shaped, bf16, {results['gpu']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
