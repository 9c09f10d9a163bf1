"""Expert-parallel decode against its roofline: the whole model on one GPU (EP 1) and
groups of N GPUs (EP N), in one run.

    python3 -m bench.ep_decode --out ep.json [--shapes mixtral-8x7b,qwen3-30b-a3b]
        [--layers 4] [--ep-sizes 1,2] [--batches 1,32,128] [--context 512] [--steps 40]
        [--eager 1,2]
    python3 -m bench.ep_decode --device cpu --tiny --out /tmp/ep.json     (a CPU try: Gloo)

For each shape it writes a checkpoint with random bf16 weights once
(``bench/serving_model.py``, kept under ``--model-root`` and reused), then for
each EP size starts one process per member on cuda:0..N-1 (or the CPU), built
as a decode node builds its engine (``EngineConfig.expert_parallel``: member 0
serves the rendezvous, NCCL exchanges between GPUs, Gloo agreements). EP 1 is a
plain engine in one process; both replay CUDA graphs, as a decode node does (a
group's members all replay the graph of the same size, its exchanges inside);
``--eager`` adds runs without graphs of the EP sizes it names. Each member takes
the same batch of requests with ``--context``-token contexts; once the agreement
shows every member decoding its whole batch, all time ``--steps``
decode steps in lockstep (the median is the step time), then run a few probe
steps that count the experts the group's tokens touch on this member and time
the exchanges (CUDA events from each collective's launch until this member's
stream may go on: the wait for the other members is in it).

Roofline of a member's step: (attention and other dense weights + the touched
experts it holds + the KV of its own requests) / the copy bandwidth measured
here; a group's is its slowest member's (they step together). The exchanges'
bytes are not in it: they are the price of the group, shown as their share.
"""

import argparse
import gc
import json
import multiprocessing
import os
import queue
import socket
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.serving_model import write_model
from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.config import ExpertParallelConfig
from lightpd.common.engine.models.moe import MoEExperts
from lightpd.common.wire.sampling_params import SamplingParams

TOKEN = "ep-decode-bench"
WARMUP_STEPS = 5
PROBE_STEPS = 3


@dataclass(frozen=True)
class Run:
    """What every member of one group (or the EP 1 engine) measures."""

    model_dir: str
    device: str  # "cuda": member i on cuda:i; "cpu": every member on the CPU
    size: int
    init: str  # the group's rendezvous, HOST:PORT
    batches: tuple[int, ...]
    context: int
    steps: int
    graphs: bool  # replay CUDA graphs, as a decode node does

    @property
    def new_tokens(self) -> int:
        # Members that finish their prompts first decode while the others prefill.
        return 64 + WARMUP_STEPS + self.steps + PROBE_STEPS


# ---- one member, in a process of its own ----


class ExchangeTimer:
    """The group's exchange collectives, each timed from its launch until this member's
    stream may go on (CUDA events; the wall clock on the CPU). It stands in for the
    group's data process group, so the engine runs exactly as it does in a node. On
    the CPU one Gloo group carries the agreements too, so their time is in it."""

    def __init__(self, group) -> None:
        self.inner = group._data
        self.cuda = group.device.type == "cuda"
        self.enabled = False
        self.spans: list[tuple] = []
        if group._control is group._data:
            group._control = self  # the group tells NCCL from Gloo by this identity
        group._data = self

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _allgather_base(self, out: torch.Tensor, send: torch.Tensor):
        return self._timed(self.inner._allgather_base, out, send)

    def _reduce_scatter_base(self, out: torch.Tensor, send: torch.Tensor):
        return self._timed(self.inner._reduce_scatter_base, out, send)

    def _timed(self, launch, *args):
        if not self.enabled:
            return launch(*args)
        start = self.mark()
        return _TimedWork(launch(*args), start, self)

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take_ms(self) -> float:
        """The spans since the last call, summed, in ms (syncs the device)."""
        spans, self.spans = self.spans, []
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in spans)
        return sum(end - start for start, end in spans) * 1e3


class _TimedWork:
    def __init__(self, work, start, timer: ExchangeTimer) -> None:
        self.work, self.start, self.timer = work, start, timer

    def wait(self):
        result = self.work.wait()
        self.timer.spans.append((self.start, self.timer.mark()))
        return result

    def is_completed(self) -> bool:
        return self.work.is_completed()


class TouchedExperts:
    """Counts, while enabled, the experts this member holds that a step's tokens (the
    whole group's, under expert parallelism) are routed to, summed over the layers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.enabled = False
        self.counts: list[int] = []  # one per MoE layer call
        self.layers = [m for m in model.modules() if isinstance(m, MoEExperts)]
        for experts in self.layers:
            experts.register_forward_pre_hook(self._hook)

    def _hook(self, experts: MoEExperts, args: tuple) -> None:
        if not self.enabled:
            return
        _, router_logits = args
        chosen = router_logits.topk(experts.top_k, dim=-1).indices.unique()
        first, num_local = experts.first_expert, experts.w13.shape[0]
        self.counts.append(int(((chosen >= first) & (chosen < first + num_local)).sum()))

    @property
    def expert_bytes(self) -> int:
        """One expert's weights (all layers have the same shape)."""
        experts = self.layers[0]
        return (experts.w13[0].numel() + experts.w2[0].numel()) * experts.w13.element_size()


def dense_bytes_read_per_step(engine: LLMEngine) -> int:
    """The weights every step reads whole: all but the experts and the embedding table
    (of which only the batch's rows are read)."""
    model = engine.runner.model
    embed = model.model.embed_tokens.weight
    experts = {id(p) for m in model.modules() if isinstance(m, MoEExperts) for p in m.parameters()}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
    tied = model.lm_head.weight is embed
    return total if tied else total - embed.numel() * embed.element_size()


def member(run: Run, rank: int, results) -> None:
    """A spawned process: one member's report, or its traceback, on ``results``."""
    try:
        results.put(measure(run, rank))
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


def measure(run: Run, rank: int) -> dict:
    if run.device == "cpu":
        # One core per member, as one device per member on GPUs (and EP 1 alike).
        torch.set_num_threads(1)
    group_config = None
    if run.size > 1:
        # Room for Triton's first compiles inside a step, while the others wait.
        group_config = ExpertParallelConfig(
            run.size,
            rank,
            run.init,
            cluster_token=TOKEN,
            timeout_s=180,
            join_timeout_s=900,
            cuda_graphs=True,  # whether they run: cuda_graph_max_batch (--eager)
        )
    max_batch = max(run.batches)
    max_model_len = run.context + run.new_tokens + 8
    engine = LLMEngine(
        EngineConfig(
            model=run.model_dir,
            device="cpu" if run.device == "cpu" else f"cuda:{rank}",
            num_kv_slots=max_batch * max_model_len,
            max_num_reqs=max_batch,
            cuda_graph_max_batch=max_batch if run.graphs else 0,
            max_model_len=max_model_len,
            expert_parallel=group_config,
        )
    )
    group = engine.expert_parallel
    timer = ExchangeTimer(group) if group is not None else None
    touched = TouchedExperts(engine.runner.model)
    report = dict(
        rank=rank,
        dense_bytes=dense_bytes_read_per_step(engine),
        expert_bytes=touched.expert_bytes,
        kv_bytes_per_token=engine.model_config.kv_bytes_per_token,
        graphs=engine.runner.graphs is not None,
        rows=[],
    )
    for batch in run.batches:
        report["rows"].append(measure_batch(engine, run, rank, batch, timer, touched))
    return report


def measure_batch(
    engine: LLMEngine,
    run: Run,
    rank: int,
    batch: int,
    timer: ExchangeTimer | None,
    touched: TouchedExperts,
) -> dict:
    """Every member runs this with the same ``batch``: the same number of steps, so
    the group stays in step."""
    group = engine.expert_parallel
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(1000 * batch + rank)
    prompts = torch.randint(0, vocab, (batch, run.context - 1), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=run.new_tokens, ignore_eos=True, temperature=0)
    ids = [f"b{batch}-m{rank}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    scheduler = engine.scheduler

    def everyone_decodes() -> bool:
        mine = not scheduler.waiting and all(r.num_output_tokens for r in scheduler.running)
        # The agreement of the step just run: every member decoded its whole batch.
        return mine and (group is None or group.token_counts == [batch] * run.size)

    prefill_steps = 0
    while not everyone_decodes():
        engine.step()
        prefill_steps += 1
        assert prefill_steps < 10_000, "the batch never got to decoding"
    for _ in range(WARMUP_STEPS):
        engine.step()
    step_ms, contexts = [], []
    for _ in range(run.steps):
        contexts.append(sum(r.num_tokens for r in scheduler.running))
        start = time.perf_counter()
        engine.step()  # ends with the sampled tokens on the host: the device is done
        step_ms.append((time.perf_counter() - start) * 1e3)
    # Probe steps: count the touched experts (a host sync per layer; run eagerly, as
    # a graph's replay runs no hooks) and time the exchanges.
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    touched.enabled, touched.counts = True, []
    if timer is not None:
        timer.enabled = True
        timer.take_ms()
    probe_ms, exchange_ms = [], []
    for _ in range(PROBE_STEPS):
        start = time.perf_counter()
        engine.step()
        probe_ms.append((time.perf_counter() - start) * 1e3)
        if timer is not None:
            exchange_ms.append(timer.take_ms())
    touched.enabled, runner.graphs = False, graphs
    if timer is not None:
        timer.enabled = False
    assert len(scheduler.running) == batch and not scheduler.waiting
    for rid in ids:  # no step: every member drops its batch at the same point
        engine.abort(rid)
    num_layers = len(touched.layers)
    return dict(
        batch=batch,
        prefill_steps=prefill_steps,
        step_ms=statistics.median(step_ms),
        step_ms_all=step_ms,
        mean_context_tokens=statistics.mean(contexts) / batch,
        kv_tokens=statistics.mean(contexts),
        touched_experts=sum(touched.counts) / PROBE_STEPS,  # over all layers, per step
        touched_experts_per_layer=sum(touched.counts) / PROBE_STEPS / max(1, num_layers),
        probe_step_ms=statistics.median(probe_ms),
        exchange_ms=statistics.median(exchange_ms) if exchange_ms else None,
    )


# ---- the runs, from the parent ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_members(run: Run, timeout_s: float) -> list[dict]:
    """Start every member of ``run``; their reports by rank (an error if one failed)."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    processes = [
        spawn.Process(target=member, args=(run, rank, results), daemon=True)
        for rank in range(run.size)
    ]
    for process in processes:
        process.start()
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < run.size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"EP {run.size}: reports from {sorted(reports)} only")
            try:
                report = results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    time.sleep(2)  # its report may still be in the pipe
                    if results.empty():
                        codes = [p.exitcode for p in processes]
                        died = f"EP {run.size}: a member died, exit codes {codes}"
                        raise RuntimeError(died) from None
                continue
            if "error" in report:
                raise RuntimeError(f"EP {run.size} member {report['rank']}:\n{report['error']}")
            reports[report["rank"]] = report
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return [reports[rank] for rank in range(run.size)]


def combine(reports: list[dict], copy_tb_s: float) -> list[dict]:
    """One row per batch for the group: its step, throughput and roofline."""
    size, rows = len(reports), []
    for i, batch in enumerate(r["batch"] for r in reports[0]["rows"]):
        members = [report["rows"][i] for report in reports]
        bytes_read = [
            report["dense_bytes"]
            + row["touched_experts"] * report["expert_bytes"]
            + row["kv_tokens"] * report["kv_bytes_per_token"]
            for report, row in zip(reports, members, strict=True)
        ]
        step_ms = max(row["step_ms"] for row in members)  # lockstep: they agree closely
        roofline_ms = max(bytes_read) / copy_tb_s / 1e9
        exchange = [row["exchange_ms"] for row in members if row["exchange_ms"] is not None]
        probe_ms = max(row["probe_step_ms"] for row in members)
        rows.append(
            dict(
                ep=size,
                batch_per_member=batch,
                step_ms=step_ms,
                member_step_ms=[row["step_ms"] for row in members],
                tok_s=size * batch / step_ms * 1e3,
                tok_s_per_gpu=batch / step_ms * 1e3,
                roofline_ms=roofline_ms,
                of_roofline=roofline_ms / step_ms,
                bytes_read_per_member=bytes_read,
                touched_experts_per_layer=[row["touched_experts_per_layer"] for row in members],
                mean_context_tokens=members[0]["mean_context_tokens"],
                exchange_ms=max(exchange) if exchange else None,
                exchange_share=max(exchange) / probe_ms if exchange else None,
                probe_step_ms=probe_ms,
                graphs=reports[0]["graphs"],
            )
        )
    return rows


def bench_model(root: Path, shape: str, layers: int, tiny: bool, device: str) -> Path:
    """The checkpoint of ``layers`` layers of ``shape`` under ``root``, written once."""
    model_dir = root / f"{shape}-{layers}l{'-tiny' if tiny else ''}"
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        # A partial folder left by a run cut short is not reused.
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        write_model(tmp, "cuda:0" if device == "cuda" else "cpu", tiny, shape, layers)
        tmp.rename(model_dir)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"wrote {model_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return model_dir


def copy_bandwidth(device: str) -> float:
    """TB/s of a large copy on ``device`` (bytes read + written)."""
    if device == "cuda":
        from bench.attention_bench import copy_bandwidth as cuda_copy_bandwidth

        return cuda_copy_bandwidth()
    src = torch.randn(1 << 24)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e12


def table(results: dict) -> str:
    lines = [
        f"copy bandwidth {results['copy_tb_s']:.2f} TB/s; {results['device_name']}; "
        f"contexts from {results['context']} tokens",
        "",
        "| shape | EP | batch / member | step ms | tok/s (group) | tok/s per GPU "
        "| roofline ms | of roofline | experts touched / layer / member "
        "| exchange ms (share) | vs EP 1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, runs in results["shapes"].items():
        ep1 = {row["batch_per_member"]: row for row in runs.get("1", {}).get("rows", [])}
        for ep, run in runs.items():
            if "error" in run:
                lines.append(f"| {shape} | {ep} | {run['error'].strip().splitlines()[-1][:120]} |")
                continue
            for row in run["rows"]:
                base = ep1.get(row["batch_per_member"])
                versus = f"{row['tok_s'] / base['tok_s']:.2f}x" if base else "-"
                exchange = "-"
                if row["exchange_ms"] is not None:
                    exchange = f"{row['exchange_ms']:.2f} ({row['exchange_share']:.0%})"
                touched = "/".join(f"{t:.1f}" for t in row["touched_experts_per_layer"])
                lines.append(
                    f"| {shape} | {ep.removesuffix('-eager')}{'' if row['graphs'] else ' eager'} "
                    f"| {row['batch_per_member']} | {row['step_ms']:.2f} | {row['tok_s']:,.0f} "
                    f"| {row['tok_s_per_gpu']:,.0f} | {row['roofline_ms']:.2f} "
                    f"| {row['of_roofline']:.0%} | {touched} | {exchange} | {versus} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU try)")
    parser.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=4, help="layers of each shape")
    parser.add_argument("--ep-sizes", default="1,2")
    parser.add_argument("--batches", default=None, help="per member; default 1,32,128")
    parser.add_argument("--context", type=int, default=None, help="default 512")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 40")
    parser.add_argument("--eager", default="", help="EP sizes to run without CUDA graphs too")
    parser.add_argument("--model-root", type=Path, default=Path("/tmp/lightpd-ep-models"))
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per EP size and shape")
    args = parser.parse_args()
    batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,32,128")).split(",")]
    context = args.context or (32 if args.tiny else 512)
    steps = args.steps or (6 if args.tiny else 40)
    ep_sizes = [int(n) for n in args.ep_sizes.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: try --device cpu --tiny")
    num_devices = torch.cuda.device_count() if args.device == "cuda" else max(ep_sizes)
    torch.manual_seed(0)
    results: dict = dict(
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        num_devices=num_devices,
        torch=torch.__version__,
        context=context,
        steps=steps,
        layers=2 if args.tiny else args.layers,
        tiny=args.tiny,
        shapes={},
    )
    results["copy_tb_s"] = copy_tb_s = copy_bandwidth(args.device)
    print(json.dumps({k: v for k, v in results.items() if k != "shapes"}), flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    for shape in args.shapes.split(","):
        layers = 2 if args.tiny else args.layers
        model_dir = bench_model(args.model_root, shape, layers, args.tiny, args.device)
        runs = results["shapes"][shape] = {}
        eager = {int(n) for n in args.eager.split(",") if n}
        modes = [(n, g) for n in ep_sizes for g in (True, False) if g or n in eager]
        for size, graphs in modes:
            key = str(size) if graphs else f"{size}-eager"
            if size > num_devices:
                runs[key] = {"error": f"needs {size} devices, {num_devices} here"}
                continue
            run = Run(
                str(model_dir),
                args.device,
                size,
                f"127.0.0.1:{free_port()}",
                tuple(batches),
                context,
                steps,
                graphs and args.device == "cuda",
            )
            started = time.perf_counter()
            try:
                reports = run_members(run, args.timeout_s)
                runs[key] = dict(run=asdict(run), rows=combine(reports, copy_tb_s))
            except RuntimeError as exc:
                runs[key] = {"error": str(exc)}
            runs[key]["wall_s"] = time.perf_counter() - started
            print(json.dumps({shape: {key: runs[key]}}), flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    results["targets"] = targets(results)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    for line in results["targets"]:
        print(f"- {line}")


def targets(results: dict) -> list[str]:
    """Issue 16's two figures, per shape."""
    lines = []
    for shape, runs in results["shapes"].items():
        ep1 = {r["batch_per_member"]: r for r in runs.get("1", {}).get("rows", [])}
        ep2 = {r["batch_per_member"]: r for r in runs.get("2", {}).get("rows", [])}
        if 32 in ep1:
            share = ep1[32]["of_roofline"]
            lines.append(
                f"{shape}: EP 1 at batch 32 at {share:.0%} of its roofline "
                f"(target 70%: {'met' if share >= 0.7 else 'missed'})"
            )
        for batch in sorted(set(ep1) & set(ep2)):
            ratio = ep2[batch]["tok_s"] / ep1[batch]["tok_s"]
            lines.append(
                f"{shape}: EP 2 gives {ratio:.2f}x EP 1's tok/s at batch {batch} per member "
                f"(target 1.7x: {'met' if ratio >= 1.7 else 'missed'})"
            )
    return lines


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
