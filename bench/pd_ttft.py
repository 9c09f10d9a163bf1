"""What the KV hand-off adds to a lone request's time to first token, per transport.

    python3 -m bench.pd_ttft --model DIR [--tokens 1024 8192] [--repeats 5]
        [--prefill-device cuda:0] [--decode-device cuda:1]

Starts a prefill node and a decode node (each on its own device), and sends them
lone requests of ``--tokens`` random prompt tokens and one output token straight
through the node client (the control plane adds the same to every row, so it
is left out), timing from the Reserve to the first token; median of
``--repeats`` after one warm-up. Rows:

- nccl:  prefill node -> decode node, KV over a torch.distributed pair group;
- zmq:   the same nodes restarted with ZeroMQ frames (CURVE, through the host);
- local: the decode node prefills the prompt itself (the colocated baseline);
  the "added" column is each row's excess over it.
"""

import argparse
import asyncio
import random
import statistics
import time

from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.node_process import start_node
from lightpd.controlplane.node_client import NodeClient
from tests.e2e import node_calls

TOKEN = "pd-ttft-bench"
START_TIMEOUT_S = 900.0  # a GPU node loads weights and captures graphs


async def lone_ttft(client: NodeClient, prefill, decode, prompt, local: bool, request_id: str):
    params = SamplingParams(temperature=0, max_new_tokens=1, seed=1, ignore_eos=True)
    start = time.perf_counter()
    if local:
        client.open_stream(request_id)
        await client.reserve(decode, request_id, prompt, params, prefill_here=True)
        async for event in node_calls.events(client, request_id):
            if event.token_ids or event.finish_reason:
                break
        error, tokens = event.error, event.token_ids
    else:
        result = await node_calls.generate(client, prefill, decode, request_id, prompt, params)
        error, tokens = result.error, result.token_ids
    elapsed = time.perf_counter() - start
    if error:
        raise RuntimeError(error)
    return elapsed, tokens[0]


async def measure(args, transport: str, rows: dict, firsts: dict) -> None:
    node_args = ("--kv-transport", transport, *args.node_args.split())
    nodes = []
    try:
        for role, device in (("decode", args.decode_device), ("prefill", args.prefill_device)):
            nodes.append(
                start_node(
                    role,
                    args.model,
                    *node_args,
                    device=device,
                    timeout=START_TIMEOUT_S,
                    cluster_token=TOKEN,
                )
            )
        decode, prefill = nodes
        async with NodeClient(TOKEN) as client:
            shapes = [transport] + (["local"] if "local" not in rows else [])
            for shape in shapes:
                rng = random.Random(0)  # every path gets the same prompts
                rows[shape] = {}
                for n in args.tokens:
                    times = []
                    for r in range(args.repeats + 1):
                        prompt = [rng.randrange(10, args.vocab) for _ in range(n)]
                        local = shape == "local"
                        elapsed, token = await lone_ttft(
                            client,
                            prefill.control,
                            decode.control,
                            prompt,
                            local,
                            f"{shape}-{n}-{r}",
                        )
                        times.append(elapsed)
                        firsts.setdefault((n, r), {})[shape] = token
                    rows[shape][n] = statistics.median(times[1:])
                    print(f"{shape} {n}: {rows[shape][n] * 1e3:.2f} ms", flush=True)
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-device", default="cuda:0")
    parser.add_argument("--decode-device", default="cuda:1")
    parser.add_argument("--transports", default="nccl,zmq")
    parser.add_argument("--node-args", default="--gpu-memory-fraction 0.85")
    parser.add_argument("--vocab", type=int, default=30000, help="prompt ids are below this")
    args = parser.parse_args()
    rows: dict[str, dict[int, float]] = {}
    firsts: dict[tuple[int, int], dict[str, int]] = {}  # (tokens, repeat) -> path -> token
    for transport in args.transports.split(","):
        asyncio.run(measure(args, transport, rows, firsts))
    # The KV moved is the KV computed: every path samples the same greedy first token.
    differ = [key for key, tokens in firsts.items() if len(set(tokens.values())) > 1]
    print(f"first tokens equal on every path: {not differ} ({len(firsts)} prompts)")
    print("\n| path | " + " | ".join(f"TTFT, {n} tokens (added)" for n in args.tokens) + " |")
    print("| --- |" + " --- |" * len(args.tokens))
    base = rows["local"]
    for shape, times in rows.items():
        cells = [
            f"{times[n] * 1e3:.1f} ms ({(times[n] - base[n]) * 1e3:+.1f} ms)" for n in args.tokens
        ]
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
