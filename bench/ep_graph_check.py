"""Self-check of expert-parallel decode under CUDA graphs: an EP 2 group replaying
decode graphs gives the greedy tokens of one engine holding every expert (EP 1),
and a member that dies while the other replays fails the group within the bound.

    python3 -m bench.ep_graph_check --out check.json [--shape qwen3-30b-a3b] [--layers 4]
        [--runs ep1,ep2-graphs,ep2-graphs-kill,ep2-eager]
    python3 -m bench.ep_graph_check --device cpu --tiny --out /tmp/check.json   (no graphs)

The model is bench.ep_decode's (random weights, written under ``--model-root`` once
and reused), run in float32 so that the group's sums, taken in another order than
one engine's, do not flip greedy choices. The runs, each of the same requests:

- ep1: one engine on cuda:0 with graphs, every request at once: the reference;
- ep2-graphs: the group with graphs, its KV pool planned from free memory (the
  plan's prefill and graph capture are steps of the group, run together);
- ep2-graphs-kill: the same, but member 1 SIGKILLs itself at its 3rd decode step,
  after the step's agreement: member 0's replay waits on it, so it must fail the group
  (``--kill-timeout-s``), end every request and return (an abort with graphs alive
  would hang in NCCL);
- ep2-eager: the group without graphs, to tell a graph bug from the group's sums.

Load is uneven: member 0 takes five requests while member 1 idles (it replays
member 0's graph with the padding request only), then member 1 prefills a long
prompt in chunks (eager steps among member 0's decodes) and decodes it beside
member 0's, and at the end each decodes one request, alone for a while. Writes
each run's tokens and, per member, its replays (those with no request of its own
apart) and eager steps; exits 1 unless ep2-graphs gives ep1's tokens, replays on
both members (padding-only ones too) and ep2-graphs-kill fails in time.
"""

import argparse
import faulthandler
import json
import multiprocessing
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.ep_decode import bench_model, free_port
from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.config import ExpertParallelConfig
from lightpd.common.engine.expert_parallel import TEARDOWN_WAIT_S
from lightpd.common.wire.sampling_params import SamplingParams

TOKEN = "ep-graph-check"
# (step, rank, prompt length, new tokens) of each request, "r0", "r1", ...
ARRIVALS = [
    (0, 0, 5, 24),
    (0, 0, 17, 24),
    (0, 0, 33, 20),
    (0, 0, 9, 24),
    (0, 0, 60, 16),
    (3, 1, 700, 16),  # three chunks of MAX_PREFILL_TOKENS
    (40, 1, 12, 12),
    (41, 0, 3, 16),
]
MAX_PREFILL_TOKENS = 256
GRAPH_MAX_BATCH = 8


@dataclass(frozen=True)
class Run:
    model_dir: str
    size: int
    graphs: bool
    plan: bool  # KV pool from free memory (a memory plan), else a fixed one
    timeout_s: float  # the group's collective bound
    kill_at: int | None = None  # member 1 dies instead of its replay number kill_at


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for _, _, n, _ in ARRIVALS]


def member(run: Run, rank: int, init: str, died_at, results) -> None:
    # A member stuck past the run's bound prints where (every thread) and exits.
    faulthandler.dump_traceback_later(run.timeout_s + 60, exit=True)
    try:
        results.put(run_member(run, rank, init, died_at))
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


def run_member(run: Run, rank: int, init: str, died_at) -> dict:
    """One engine (EP 1: every request at once) or one member of the group, to the end."""
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    group = None
    if run.size > 1:
        group = ExpertParallelConfig(
            run.size,
            rank,
            init,
            cluster_token=TOKEN,
            timeout_s=run.timeout_s,
            join_timeout_s=600,
            cuda_graphs=run.graphs,
        )
    engine = LLMEngine(
        EngineConfig(
            model=run.model_dir,
            device=device,
            dtype="float32",
            num_kv_slots=None if run.plan else 8192,
            max_num_reqs=16,
            max_model_len=1024,
            max_prefill_tokens=MAX_PREFILL_TOKENS,
            cuda_graph_max_batch=GRAPH_MAX_BATCH if run.graphs else 0,
            expert_parallel=group,
        )
    )
    runner = engine.runner
    counts = dict(replays=0, padding_replays=0, eager_decodes=0, eager_empty_steps=0, prefills=0)

    decode_steps = [0]

    def decode_step_begins() -> None:
        """Member 1 of a kill run dies at its kill_at-th decode step, after the
        agreement: the other member goes on into the step's exchanges alone."""
        decode_steps[0] += 1
        if rank == 1 and decode_steps[0] == run.kill_at:
            died_at.value = time.time()
            os.kill(os.getpid(), signal.SIGKILL)

    if runner.graphs is not None:
        replay = runner.graphs.replay

        def counted_replay(rows, seq_lens, size=None):
            decode_step_begins()
            counts["replays"] += 1
            counts["padding_replays"] += not rows
            return replay(rows, seq_lens, size)

        runner.graphs.replay = counted_replay
    forward = runner.forward

    def counted_forward(is_prefill, *args, **kwargs):
        if not is_prefill:
            decode_step_begins()
        counts["prefills" if is_prefill else "eager_decodes"] += 1
        return forward(is_prefill, *args, **kwargs)

    runner.forward = counted_forward
    if engine.expert_parallel is not None:
        empty_step = engine.expert_parallel.empty_step

        def counted_empty_step():
            decode_step_begins()
            counts["eager_empty_steps"] += 1
            empty_step()

        engine.expert_parallel.empty_step = counted_empty_step
    all_prompts = prompts(engine.model_config.vocab_size)
    mine = [
        (0 if run.size == 1 else step, f"r{i}", all_prompts[i], new)
        for i, (step, r, _, new) in enumerate(ARRIVALS)
        if run.size == 1 or r == rank
    ]
    # The members stop at the same step: past every arrival, once the group idles.
    last_arrival = max(step for step, *_ in ARRIVALS) if run.size > 1 else 0
    tokens: dict[str, list[int]] = {rid: [] for _, rid, _, _ in mine}
    errors: dict[str, str] = {}
    step = 0
    started = time.perf_counter()
    while engine.failure is None:
        for at, rid, prompt, new in mine:
            if at == step:
                params = SamplingParams(temperature=0, max_new_tokens=new, min_new_tokens=new)
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.error is not None:
                errors[out.request_id] = out.error
        step += 1
        active = engine.has_unfinished() if group is None else engine.expert_parallel.active
        if step > last_arrival and not active:
            break
        assert step < 2000, "no progress"
    return dict(
        rank=rank,
        tokens=tokens,
        errors=errors,
        failure=engine.failure,
        failed_after_death_s=time.time() - died_at.value if died_at.value else None,
        steps=step,
        wall_s=time.perf_counter() - started,
        num_kv_slots=engine.pool.num_slots,
        graph_sizes=None if runner.graphs is None else runner.graphs.batch_sizes,
        **counts,
    )


def run_members(run: Run, timeout_s: float) -> dict:
    """Every member's report by rank (the one killed reports nothing), or an "error"."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    died_at = spawn.Value("d", 0.0)
    init = f"127.0.0.1:{free_port()}"
    processes = [
        spawn.Process(target=member, args=(run, rank, init, died_at, results), daemon=True)
        for rank in range(run.size)
    ]
    for process in processes:
        process.start()
    expected = [r for r in range(run.size) if not (run.kill_at and r == 1)]
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not all(r in reports for r in expected):  # a dying member may report too
            if time.monotonic() > deadline:
                return {"error": f"timed out; reports from {sorted(reports)} only"}
            try:
                report = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r in expected if processes[r].exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(2)
                    if results.empty():
                        return {"error": f"member {dead} died: {[p.exitcode for p in processes]}"}
                continue
            if "error" in report:
                return {"error": f"member {report['rank']}:\n{report['error']}"}
            reports[report["rank"]] = report
    finally:
        for process in processes:
            process.join(timeout=20)  # a member that hangs at exit shows as killed (-9)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return {
        "members": [reports[r] for r in expected],
        "exit_codes": [p.exitcode for p in processes],
    }


def compare(reference: dict[str, list[int]], result: dict) -> dict:
    """Requests whose tokens differ from the reference's, with the first position where."""
    if "error" in result:
        return {"ok": False, "error": result["error"]}
    tokens = {rid: t for m in result["members"] for rid, t in m["tokens"].items()}
    differ = {}
    for rid, expected in reference.items():
        got = tokens.get(rid, [])
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None
            )
            differ[rid] = dict(first_difference=at, got=len(got), expected=len(expected))
    failures = [m["failure"] for m in result["members"] if m["failure"]]
    return {"ok": not differ and not failures, "differ": differ, "failures": failures}


def judge_kill(result: dict, timeout_s: float) -> dict:
    """Member 0 failed the group within the bound (the collective's timeout, then at
    most TEARDOWN_WAIT_S for the group's teardown) and ended every request of its own."""
    if "error" in result:
        return {"ok": False, "error": result["error"]}
    report = result["members"][0]
    mine = {f"r{i}" for i, (_, r, _, _) in enumerate(ARRIVALS) if r == 0}
    started = {rid for rid, t in report["tokens"].items() if t}
    after = report["failed_after_death_s"]
    ok = (
        report["failure"] is not None
        and after is not None
        and after < timeout_s + TEARDOWN_WAIT_S + 5
        and set(report["errors"]) == started & mine
        and all("retried" in e for e in report["errors"].values())
    )
    return {
        "ok": ok,
        "failure": report["failure"],
        "failed_after_death_s": after,
        "ended": sorted(report["errors"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU try)")
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model-root", type=Path, default=Path("/tmp/lightpd-ep-models"))
    parser.add_argument("--runs", default="ep1,ep2-graphs,ep2-graphs-kill,ep2-eager")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per run")
    parser.add_argument("--kill-timeout-s", type=float, default=10.0)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error("needs 2 GPUs: try --device cpu --tiny")
    layers = 2 if args.tiny else args.layers
    model_dir = str(bench_model(args.model_root, args.shape, layers, args.tiny, args.device))
    # Room for Triton's first compiles inside a step, while the other member waits.
    runs = {
        "ep1": Run(model_dir, 1, True, False, 120),
        "ep2-graphs": Run(model_dir, 2, True, True, 120),
        "ep2-graphs-kill": Run(model_dir, 2, True, False, args.kill_timeout_s, kill_at=3),
        "ep2-eager": Run(model_dir, 2, False, False, 120),
    }
    names = args.runs.split(",")
    results: dict = dict(model=model_dir, torch=torch.__version__, runs={})
    verdict: dict = {}
    for name in names:
        started = time.perf_counter()
        result = results["runs"][name] = run_members(runs[name], args.timeout_s)
        result["wall_s"] = time.perf_counter() - started
        print(f"{name}: {result['wall_s']:.0f} s", flush=True)
        verdict.setdefault("exit_codes", {})[name] = result.get("exit_codes")
        if name == "ep2-graphs-kill":
            verdict[name] = judge_kill(result, args.kill_timeout_s)
        elif name != "ep1" and "ep1" in results["runs"]:
            ep1 = results["runs"]["ep1"]
            reference = ep1["members"][0]["tokens"] if "members" in ep1 else {}
            verdict[name] = compare(reference, result) if reference else {"ok": False}
        if name == "ep2-graphs" and "members" in result and args.device == "cuda":
            members = result["members"]
            verdict["replays"] = [m["replays"] for m in members]
            verdict["padding_replays"] = [m["padding_replays"] for m in members]
            verdict["graphs_used"] = all(r > 0 for r in verdict["replays"])
        results["verdict"] = verdict
        args.out.write_text(json.dumps(results, indent=1))
    for name, result in results["runs"].items():
        print(name, result.get("error", "").strip()[-2000:])
        for m in result.get("members", []):
            keys = ("replays", "padding_replays", "eager_decodes", "eager_empty_steps", "prefills")
            print(" ", m["rank"], {k: m[k] for k in keys}, f"kv slots {m['num_kv_slots']}")
    wanted = [n for n in ("ep2-graphs", "ep2-graphs-kill") if n in names]
    ok = all(verdict.get(n, {}).get("ok") for n in wanted) and verdict.get("graphs_used", True)
    verdict["ok"] = ok
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(verdict, indent=1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
