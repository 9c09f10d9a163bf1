"""The `lightctl bench` workload replayed into the in-process engine (no disaggregation).

    python3 -m bench.serving_engine --model DIR --rates 1 4 16 inf --num-requests 60 200 500 500 \
        --input-len 512 --output-len 128 --ignore-eos --out-dir OUT [--device cuda:0]

For each rate, the same prompts (token ids from the model's tokenizer), output
lengths and arrival times as `lightctl bench --tokenizer DIR --endpoint
completions --seed S` with the same options, so ``engine_rate{R}.json`` and a
fleet's ``fleet_rate{R}.json`` compare request by request. The engine runs in a
thread that adds arrived requests before every step; each step's outputs are
timed as they leave ``step()``, with the same metric code as the HTTP client.
The engine is loaded once for all rates.
"""

import argparse
import asyncio
import math
import queue
import threading
import time
from pathlib import Path

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.request import RequestError, RequestOutput
from lightpd.common.tokenizer import load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.bench.client import ClientConfig
from lightpd.controlplane.lightctl.bench.metrics import parse_slo, summarize
from lightpd.controlplane.lightctl.bench.plots import write_plots
from lightpd.controlplane.lightctl.bench.record import RequestRecord
from lightpd.controlplane.lightctl.bench.report import result_json, write_result
from lightpd.controlplane.lightctl.bench.runner import LoadSpec, Runner
from lightpd.controlplane.lightctl.bench.workload import TokenPrompts, WorkloadSpec, build_workload


class EngineClient:
    """Runner-compatible client whose server is an LLMEngine stepping in a thread."""

    def __init__(self, engine: LLMEngine, ignore_eos: bool, temperature: float = 0.0) -> None:
        self.engine = engine
        self.config = ClientConfig("in-process", "engine", "completions", None, ignore_eos)
        self.temperature = temperature
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join()

    async def send(
        self, record: RequestRecord, prompt: list[int], max_tokens: int
    ) -> RequestRecord:
        if not isinstance(prompt, list):
            raise TypeError("the engine takes token ids: give the workload a tokenizer")
        self._ids += 1
        request_id = f"bench-{self._ids}"
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            ignore_eos=self.config.ignore_eos,
            seed=self._ids,
        )
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        started = time.perf_counter()
        self._inbox.put((request_id, prompt, params))
        record.prompt_tokens, record.usage_reported = len(prompt), True
        try:
            while True:
                at, output = await outputs.get()
                if isinstance(output, Exception):
                    record.error = str(output)
                    return record
                if output.new_token_ids:
                    record.chunk_times_s.append(at - started)
                    record.output_tokens += len(output.new_token_ids)
                if output.error:
                    record.error = output.error
                if output.finished:
                    record.e2e_s = at - started
                    return record
        finally:
            del self._streams[request_id]

    def _deliver(self, request_id: str, at: float, output: RequestOutput | Exception) -> None:
        loop, outputs = self._streams[request_id]
        loop.call_soon_threadsafe(outputs.put_nowait, (at, output))

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            block = not engine.has_unfinished()
            while True:  # everything that arrived, waiting for the first if idle
                try:
                    item = self._inbox.get(block=block)
                except queue.Empty:
                    break
                if item is None:
                    return
                block = False
                request_id, prompt, params = item
                try:
                    engine.add_request(request_id, prompt, params)
                except RequestError as exc:
                    self._deliver(request_id, time.perf_counter(), exc)
            outputs = engine.step()
            now = time.perf_counter()
            for output in outputs:
                self._deliver(output.request_id, now, output)


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive or inf, got {text}")
    return rate


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rates", type=parse_rate, nargs="+", default=[math.inf])
    parser.add_argument("--num-requests", type=int, nargs="+", default=[100])
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--input-range", type=float, default=0.0)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-range", type=float, default=0.0)
    parser.add_argument("--shared-prefix-len", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo", help="goodput SLO in ms, as lightctl bench: ttft=300,tpot=12")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--plots", action="store_true", help="PNG plots in OUT_DIR/plots")
    parser.add_argument("--num-kv-slots", type=int)
    parser.add_argument("--max-num-reqs", type=int, default=256)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int)
    args = parser.parse_args()
    if len(args.num_requests) not in (1, len(args.rates)):
        parser.error("give one --num-requests, or one per rate")
    counts = args.num_requests * (len(args.rates) if len(args.num_requests) == 1 else 1)
    slo_ms = parse_slo(args.slo) if args.slo else None

    config = EngineConfig(
        model=args.model,
        device=args.device,
        num_kv_slots=args.num_kv_slots,
        max_num_reqs=args.max_num_reqs,
        max_prefill_tokens=args.max_prefill_tokens,
        max_model_len=args.max_model_len,
    )
    started = time.perf_counter()
    engine = LLMEngine(config)
    print(f"engine loaded in {time.perf_counter() - started:.1f} s: {config}", flush=True)
    source = TokenPrompts(load_tokenizer(args.model))
    client = EngineClient(engine, args.ignore_eos)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for rate, count in zip(args.rates, counts, strict=True):
            spec = WorkloadSpec(
                count, args.input_len, args.input_range, args.output_len, args.output_range,
                args.shared_prefix_len, 1, args.seed,
            )  # fmt: skip
            load = LoadSpec(rate, args.burstiness, args.max_concurrency, args.seed)
            runner = Runner(client, load, lambda record: None)

            async def go(runner: Runner = runner, spec: WorkloadSpec = spec) -> list:
                await runner.warm_up(build_workload(spec, source, warmup=True, count=args.warmup))
                return await runner.run(build_workload(spec, source))

            records = asyncio.run(go())
            name = f"engine_rate{rate_name(rate)}"
            config_json = {
                "label": name,
                "base_url": "in-process",
                "endpoint": "completions",
                "model": args.model,
                "request_rate": rate_name(rate),
                **{k: v for k, v in vars(args).items() if k not in ("rates", "num_requests")},
                "out_dir": str(args.out_dir),
                **{k: getattr(spec, k) for k in spec.__dataclass_fields__},
            }
            write_result(args.out_dir / f"{name}.json", result_json(config_json, records, slo_ms))
            if args.plots:
                write_plots(records, args.out_dir / "plots", name)
            s = summarize(records, slo=slo_ms)
            print(
                f"{name}: {s.num_completed}/{s.num_requests} ok in {s.duration_s:.1f} s, "
                f"{s.output_throughput:.0f} output tok/s, TTFT p50 {s.ttft_ms.p50:.1f} ms "
                f"p99 {s.ttft_ms.p99:.1f} ms, TPOT p50 {s.tpot_ms.p50:.2f} ms "
                f"p99 {s.tpot_ms.p99:.2f} ms",
                flush=True,
            )
    finally:
        client.close()


if __name__ == "__main__":
    main()
