"""Kill a member of an expert-parallel decode group under load, through the fleet.

    python3 -m bench.serving_fleet --model DIR --devices cuda:0,cuda:1 \
        --prefill-nodes 0 --decode-nodes 2 --expert-parallel \
        --decode-args "--ep-cuda-graphs" -- python3 -m bench.ep_kill_fleet

Run by ``serving_fleet`` (it reads ``LIGHTPD_BENCH_URL`` and ``LIGHTPD_BENCH_PIDS``):
opens ``--streams`` greedy streams through the OpenAI endpoint, SIGKILLs decode
node 1 once tokens flow, and reports as JSON how every stream ended (finished, or
an error event and its text), how long after the kill the last one ended, and
whether the surviving member's process left (a group that failed serves nothing)
within ``--exit-within`` seconds. Exits 1 if a stream hung or the survivor stayed.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import httpx


async def stream(client: httpx.AsyncClient, url: str, tokens: int, ended: dict, index: int):
    body = {
        "model": (await client.get(f"{url}/v1/models")).json()["data"][0]["id"],
        "prompt": f"Stream {index}: tell me about the kernels.",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    outcome, received = "no end", 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                outcome = f"error: {chunk['error']['message']}"
                continue
            received += 1
            reason = chunk["choices"][0].get("finish_reason")
            if reason:
                outcome = reason
    ended[index] = (outcome, received, time.monotonic())


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child its parent has not reaped yet, a
    zombie, has left)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--exit-within", type=float, default=60.0)
    args = parser.parse_args()
    url = os.environ["LIGHTPD_BENCH_URL"]
    pids = dict(part.split("=") for part in os.environ["LIGHTPD_BENCH_PIDS"].split(","))
    victim, survivor = int(pids["decode1"]), int(pids["decode0"])
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}
    ended: dict[int, tuple[str, int, float]] = {}
    async with httpx.AsyncClient(headers=headers, timeout=300) as client:
        tasks = [
            asyncio.create_task(stream(client, url, args.tokens, ended, i))
            for i in range(args.streams)
        ]
        await asyncio.sleep(3.0)  # tokens flow on both members
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, pending = await asyncio.wait(tasks, timeout=180)
        for task in pending:
            task.cancel()
    while alive(survivor) and time.monotonic() - killed_at < args.exit_within:
        await asyncio.sleep(0.5)
    outcomes: dict[str, int] = {}
    for outcome, _, _ in ended.values():
        outcomes[outcome[:160]] = outcomes.get(outcome[:160], 0) + 1
    last = max((at for _, _, at in ended.values()), default=killed_at)
    report = {
        "streams": args.streams,
        "ended": len(ended),
        "hung": len(pending),
        "outcomes": outcomes,
        "last_end_after_kill_s": round(last - killed_at, 1),
        "survivor_left": not alive(survivor),
        "survivor_left_after_s": round(time.monotonic() - killed_at, 1),
    }
    print(json.dumps(report, indent=1), flush=True)
    return 0 if not pending and report["survivor_left"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
