"""Faults under load: node deaths, a Redis restart and a control-plane restart, all
while many greedy streams run; then what became of every stream and every slot.

    python3 -m bench.chaos [--streams 200] [--tokens 64] [--decode-nodes 3] [--rounds 1]

Starts Redis, two control planes on it, one prefill node and ``--decode-nodes``
decode nodes (a tiny random Llama on the CPU unless ``--model``), takes the text
of one uninterrupted greedy stream, then opens ``--streams`` copies of it at
once, half through each control plane. As the streamed tokens pass set shares
of the total it SIGKILLs a decode node (its streams move), SIGKILLs the prefill
node (prompts not yet handed off are retried, prefilled on decode nodes),
SIGKILLs Redis and starts it again on its data two seconds later, and SIGTERMs
the second control plane (its streams end with an error event, within its
grace) and starts it again. With ``--rounds`` above 1 the killed nodes are
replaced and it all happens again.

Every stream must end within ``--stream-timeout``, either complete (all its
tokens, the reference text exactly: migrated streams included) or with an
error event, and always with ``[DONE]``. Afterwards every live node's KV pool
must be back to its free slots, and Redis must hold no running request. The
figures print as one markdown table; the exit status is 1 if any of that fails.
The test suite runs a small round of it (tests/e2e/test_chaos.py).
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lightpd.common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import API_KEY, LocalFleet

# When each fault strikes: the share of all streamed tokens passed by then.
FAULTS = (
    (0.10, "kill a decode node"),
    (0.20, "kill the prefill node"),
    (0.30, "restart Redis"),
    (0.40, "restart a control plane"),
)
REDIS_DOWN_S = 2.0
SHUTDOWN_GRACE_S = 3.0
SETTLE_S = 10.0  # pools must be back this long after the last stream ended


@dataclass
class StreamResult:
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    error: str | None = None  # transport error or the error event's message
    ended: bool = False  # returned before the timeout

    def chunks(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line != "data: [DONE]"]

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1] == "data: [DONE]"

    @property
    def error_event(self) -> str | None:
        for chunk in self.chunks():
            if "error" in chunk:
                return chunk["error"].get("message", "")
        return None

    def text(self) -> str:
        deltas = [c["choices"][0]["delta"] for c in self.chunks() if c.get("choices")]
        return "".join(d.get("content") or "" for d in deltas)

    def num_tokens(self) -> int | None:
        usage = next((c["usage"] for c in self.chunks() if c.get("usage")), None)
        return None if usage is None else usage["completion_tokens"]


@dataclass
class ChaosReport:
    streams: int
    completed: int = 0  # every token, the reference text
    failed_with_error: int = 0  # an error event, then [DONE]
    hung: int = 0  # not ended within the bound
    cut: int = 0  # ended with neither an error event nor [DONE], or refused
    wrong: int = 0  # complete, but not the reference text or not every token
    migrated: int = 0  # moves counted by the control planes still up
    slots_leaked: int = 0  # slots still held on live nodes after SETTLE_S
    running_in_redis: int = 0
    faults: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # error message -> streams
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.hung or self.cut or self.wrong or self.slots_leaked or self.running_in_redis
        )

    def markdown(self) -> str:
        rows = [
            ("streams", self.streams),
            ("completed, equal to the uninterrupted run", self.completed),
            ("moved to another decode node", self.migrated),
            ("ended with a clear error event and [DONE]", self.failed_with_error),
            ("hung", self.hung),
            ("cut (no error event, no [DONE]) or refused", self.cut),
            ("complete but wrong text or token count", self.wrong),
            ("KV slots leaked on live nodes", self.slots_leaked),
            ("requests left running in Redis", self.running_in_redis),
            ("wall time (s)", f"{self.duration_s:.1f}"),
        ]
        lines = ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
        lines.append("")
        lines.append("Faults: " + "; ".join(self.faults))
        for message, count in sorted(self.errors.items(), key=lambda item: -item[1]):
            lines.append(f"- {count} x {message}")
        return "\n".join(lines)


class Chaos:
    def __init__(self, fleet: LocalFleet, tokens: int, timeout_s: float) -> None:
        self.fleet = fleet
        self.tokens = tokens
        self.timeout_s = timeout_s
        self.streamed = 0
        self.second = None  # the control plane that is restarted
        self.moved_before_restart = 0  # migrations it had counted when it went

    def body(self) -> dict:
        return {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Tell me about chaos."}],
            "max_tokens": self.tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def stream(self, client: httpx.AsyncClient, url: str) -> StreamResult:
        result = StreamResult()
        headers = {"Authorization": f"Bearer {API_KEY}"}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with client.stream(
                    "POST", f"{url}/v1/chat/completions", json=self.body(), headers=headers
                ) as reply:
                    result.status = reply.status_code
                    if reply.status_code != 200:
                        result.error = (await reply.aread()).decode()[:200]
                    else:
                        async for line in reply.aiter_lines():
                            if line.startswith("data: "):
                                result.lines.append(line)
                                self.streamed += 1
            result.ended = True
        except TimeoutError:
            result.error = "timed out"
        except httpx.HTTPError as exc:
            result.ended = True
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def strike(self, fault: str) -> None:
        """Carry out one fault (blocking; runs in a thread)."""
        fleet = self.fleet
        if fault in ("kill a decode node", "kill the prefill node"):
            role = "decode" if "decode" in fault else "prefill"
            nodes = fleet.admin("GET", "/admin/nodes").json()
            running = {n["node_id"]: n["stats"]["num_running"] for n in nodes}
            candidates = [n for n in live_nodes(fleet) if n.role == role]
            if candidates:  # the busiest, so that the fault hits running streams
                max(candidates, key=lambda n: running.get(n.node_id, 0)).kill()
        elif fault == "restart Redis":
            fleet.redis.kill()
            time.sleep(REDIS_DOWN_S)
            fleet.redis.start()
        elif fault == "restart a control plane":
            self.moved_before_restart += migrations(self.second.url)  # its counter resets
            self.second.stop(timeout=SHUTDOWN_GRACE_S + 15)
            fleet.more_control_planes.remove(self.second)
            self.second = fleet.add_control_plane(LIGHTPD_SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S))

    async def _strike_after(
        self, before: asyncio.Task | None, fault: str, at: float, report: ChaosReport
    ) -> None:
        if before is not None:
            await before
        started = time.monotonic()
        await asyncio.to_thread(self.strike, fault)
        took = time.monotonic() - started
        report.faults.append(f"{fault} at {at:.0%} of the tokens ({took:.1f} s)")

    async def round(self, num_streams: int, report: ChaosReport) -> list[StreamResult]:
        limits = httpx.Limits(max_connections=num_streams + 8)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            urls = [self.fleet.url, self.second.url]
            tasks = [
                asyncio.create_task(self.stream(client, urls[i % 2])) for i in range(num_streams)
            ]
            total = num_streams * (self.tokens + 2)  # data lines: tokens, usage, [DONE]
            pending = list(FAULTS)
            # Faults strike one after another, each once its share of the tokens has
            # streamed; watching goes on while one strikes (a Redis restart takes
            # seconds), so a later fault is not missed for the time an earlier took.
            striking: asyncio.Task | None = None
            while pending and not all(t.done() for t in tasks):
                share, fault = pending[0]
                if self.streamed >= share * total:
                    pending.pop(0)
                    at = self.streamed / total
                    striking = asyncio.create_task(self._strike_after(striking, fault, at, report))
                    continue
                await asyncio.sleep(0.02)
            if striking is not None:
                await striking
            report.faults += [f"{fault}: not reached" for _, fault in pending]
            return list(await asyncio.gather(*tasks))


def live_nodes(fleet: LocalFleet) -> list:
    return [n for n in fleet.nodes if n.process.poll() is None]


def reference_text(fleet: LocalFleet, chaos: Chaos) -> str:
    async def one() -> StreamResult:
        async with httpx.AsyncClient(timeout=None) as client:
            return await chaos.stream(client, fleet.url)

    result = asyncio.run(one())
    if not result.done or result.num_tokens() != chaos.tokens:
        raise RuntimeError(f"the reference stream failed: {result.error or result.lines[-3:]}")
    return result.text()


def tally(results: list[StreamResult], reference: str, tokens: int, report: ChaosReport) -> None:
    for result in results:
        message = result.error_event
        if not result.ended:
            report.hung += 1
        elif message is not None and result.done:
            report.failed_with_error += 1
            report.errors[message] = report.errors.get(message, 0) + 1
        elif not result.done or result.status != 200:
            report.cut += 1
            key = f"cut: {result.error or (result.lines[-1:] or ['no data'])[0]}"[:160]
            report.errors[key] = report.errors.get(key, 0) + 1
        elif result.text() == reference and result.num_tokens() == tokens:
            report.completed += 1
        else:
            report.wrong += 1


def settle(fleet: LocalFleet, urls: list[str], report: ChaosReport) -> None:
    """Wait for every live node to be idle, then count what is still held."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        nodes = [n for n in fleet.admin("GET", "/admin/nodes").json() if n["status"] != "dead"]
        reported = [n for n in nodes if n["stats"] is not None]  # new nodes report soon
        held = sum(n["num_slots"] - n["stats"]["num_free_slots"] for n in reported)
        held += len(nodes) - len(reported) if time.monotonic() < deadline else 0
        running = fleet.admin("GET", "/admin/requests?running=true&limit=1000").json()
        if (held == 0 and not running) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report.slots_leaked = held
    report.running_in_redis = len(running)
    report.migrated += sum(migrations(url) for url in urls)


def migrations(url: str) -> int:
    """Requests the control plane at ``url`` moved to another node so far."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in metrics.splitlines() if line.startswith("lightpd_request_migrations")]
    return sum(int(float(line.split()[-1])) for line in lines if "_total" in line)


def run(
    model: str,
    num_streams: int,
    tokens: int,
    decode_nodes: int = 3,
    rounds: int = 1,
    timeout_s: float = 120.0,
    node_args: tuple[str, ...] = ("--num-kv-slots", "16384"),
) -> ChaosReport:
    report = ChaosReport(streams=num_streams * rounds)
    settings = {"LIGHTPD_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S)}
    fleet = LocalFleet(model, node_ttl_s=2.0, node_args=node_args, settings=settings)
    started = time.monotonic()
    try:
        fleet.start(prefill=1, decode=decode_nodes)
        chaos = Chaos(fleet, tokens, timeout_s)
        chaos.second = fleet.add_control_plane(**settings)
        reference = reference_text(fleet, chaos)
        for index in range(rounds):
            if index:  # replace what the last round killed
                for role in ("prefill", "decode"):
                    alive = sum(n.role == role for n in live_nodes(fleet))
                    for _ in range({"prefill": 1, "decode": decode_nodes}[role] - alive):
                        fleet.add_node(role)
            chaos.streamed = 0
            results = asyncio.run(chaos.round(num_streams, report))
            tally(results, reference, tokens, report)
        settle(fleet, [fleet.url, chaos.second.url], report)
        report.migrated += chaos.moved_before_restart
    finally:
        report.duration_s = time.monotonic() - started
        fleet.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder; default: a tiny random Llama")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--decode-nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stream-timeout", type=float, default=120.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightpd-chaos-") as folder:
        model = args.model or str(write_tiny_checkpoint(Path(folder) / "tiny", "llama"))
        report = run(
            model, args.streams, args.tokens, args.decode_nodes, args.rounds, args.stream_timeout
        )
    print(report.markdown())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
