"""KV transfer over ZeroMQ on loopback, and the time to first token it adds.

Part 1 moves a Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, head dim 128,
bf16: 128 KiB a token) layer by layer from a pool in this process to a pool in
another, with the nodes' own gather/scatter code and frames, and reports GB/s.
Part 2 runs real prefill and decode node processes on a small random model and
compares their time to first token with the in-process engine's.

    .venv/bin/python -m bench.kv_transfer [--tokens 1024 8192] [--repeats 5]
"""

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import zmq

from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.engine.kv_transfer import gather_layer, scatter_layer
from lightpd.common.wire.auth import FleetKeys, start_authenticator

LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16


def make_pool(num_slots: int) -> TokenKVPool:
    pool = TokenKVPool(num_slots, LAYERS, KV_HEADS, HEAD_DIM, DTYPE, "cpu")
    pool.kv_buffer.normal_()
    return pool


# Part 1 runs CURVE-encrypted, as the nodes' sockets do, unless --plain.
BENCH_KEYS = FleetKeys.from_token("kv-transfer-bench")


def receiver(endpoint: str, num_slots: int, plain: bool) -> None:
    """Child process: scatter every layer it gets into shuffled slots, then ack."""
    pool = make_pool(num_slots)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    if not plain:
        auth = start_authenticator(ctx, BENCH_KEYS)
        BENCH_KEYS.serve(sock)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        identity, header = frames[0].bytes, frames[1].bytes
        if header == b"stop":
            if not plain:
                auth.stop()
            return
        num_tokens, layer, last = (int(x) for x in header.split(b","))
        slots = torch.randperm(num_slots, dtype=torch.int32)[:num_tokens]
        scatter_layer(pool, layer, slots, frames[2].buffer, frames[3].buffer)
        if last:
            sock.send_multipart([identity, b"ack"])


def transfer_throughput(token_counts: list[int], repeats: int, plain: bool) -> None:
    num_slots = max(token_counts) * 2
    port = 47000 + (int(time.time()) % 1000)
    endpoint = f"tcp://127.0.0.1:{port}"
    receive = ["--receive", endpoint, str(num_slots), *(["--plain"] if plain else [])]
    child = subprocess.Popen([sys.executable, __file__, *receive])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    if not plain:
        BENCH_KEYS.connect_as_member(sock)
    sock.connect(endpoint)
    pool = make_pool(num_slots)
    bytes_per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
    print(f"KV of a Llama-3.1-8B shape: {bytes_per_token // 1024} KiB per token", end="")
    print(", plain TCP" if plain else ", CURVE (as the nodes)")
    print("| prompt tokens | KV bytes | median time | throughput |")
    print("| --- | --- | --- | --- |")
    for num_tokens in token_counts:
        slots = torch.randperm(num_slots, dtype=torch.int32)[:num_tokens]
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            for layer in range(LAYERS):
                k, v = gather_layer(pool, layer, slots)
                header = f"{num_tokens},{layer},{int(layer == LAYERS - 1)}".encode()
                sock.send_multipart([header, k.numpy(), v.numpy()], copy=False)
            assert sock.recv() == b"ack"
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        total = num_tokens * bytes_per_token
        print(
            f"| {num_tokens} | {total / 2**20:.0f} MiB | {median * 1e3:.1f} ms "
            f"| {total / median / 1e9:.2f} GB/s |"
        )
    sock.send_multipart([b"stop", b"", b""])
    child.wait(timeout=30)


async def added_ttft(token_counts: list[int], repeats: int) -> None:
    from lightpd.common.engine import EngineConfig, LLMEngine
    from lightpd.common.tiny import write_tiny_checkpoint
    from lightpd.common.wire.sampling_params import SamplingParams
    from lightpd.controlplane.lightctl.node_process import start_node
    from lightpd.controlplane.node_client import NodeClient
    from tests.e2e import node_calls

    overrides = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(token_counts) + 64,
    )
    model = str(write_tiny_checkpoint(tempfile.mkdtemp(), "llama", overrides=overrides))
    args = ("--num-kv-slots", str(max(token_counts) * 2), "--max-prefill-tokens", "2048")
    token = secrets.token_hex(16)
    prefill = start_node("prefill", model, *args, cluster_token=token)
    decode = start_node("decode", model, *args, cluster_token=token)
    engine = LLMEngine(
        EngineConfig(
            model=model, device="cpu", num_kv_slots=max(token_counts) * 2, max_prefill_tokens=2048
        )
    )
    params = SamplingParams(temperature=0, max_new_tokens=1, seed=0)
    print("\nTime to first token, small model (4 layers, hidden 256, fp32, 8 KiB KV a token), CPU:")
    print("| prompt tokens | in-process engine | prefill node -> decode node | added |")
    print("| --- | --- | --- | --- |")
    try:
        async with NodeClient(token) as client:
            for num_tokens in token_counts:
                prompt = [(i * 7919) % 390 + 3 for i in range(num_tokens)]
                local, remote = [], []
                for r in range(repeats + 1):
                    start = time.perf_counter()
                    engine.generate([prompt], params)
                    local.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    await node_calls.generate(
                        client,
                        prefill.control,
                        decode.control,
                        f"b{num_tokens}-{r}",
                        prompt,
                        params,
                    )
                    remote.append(time.perf_counter() - start)
                a, b = statistics.median(local[1:]), statistics.median(remote[1:])
                print(
                    f"| {num_tokens} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms "
                    f"| {(b - a) * 1e3:+.0f} ms ({(b / a - 1) * 100:+.0f}%) |"
                )
    finally:
        prefill.stop()
        decode.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--receive", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        receiver(args.receive[0], int(args.receive[1]), args.plain)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    transfer_throughput(args.tokens, args.repeats, plain=True)
    transfer_throughput(args.tokens, args.repeats, plain=False)
    asyncio.run(added_ttft(args.tokens, args.repeats))


if __name__ == "__main__":
    main()
