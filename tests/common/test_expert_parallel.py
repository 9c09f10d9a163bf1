"""Expert parallelism on the CPU: groups of real engine processes over Gloo give the
same greedy tokens as one engine holding every expert, whoever is busy or idle,
and a member that dies or hangs ends the others' requests within the bound."""

import multiprocessing
import os
import queue
import signal
import socket
import threading
import time

import pytest
import torch

from lightpd.common.engine import EngineConfig, LLMEngine, RequestError
from lightpd.common.engine.config import ExpertParallelConfig
from lightpd.common.engine.cuda_graphs import decode_step, graph_batch_sizes
from lightpd.common.engine.expert_parallel import ExpertParallelError, ExpertParallelGroup
from lightpd.common.engine.loader import load_model
from lightpd.common.engine.model_config import ModelConfig
from lightpd.common.engine.models.moe import SparseMoeBlock
from lightpd.common.wire.sampling_params import SamplingParams
from tests.common.test_engine import make_engine, random_prompts
from tests.conftest import DEVICE

TOKEN = "test-cluster-token"
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
# The group's collective timeout in these tests (on GPUs: room for Triton's first compiles).
TIMEOUT_S = 3.0 if DEVICE == "cpu" else 15.0
SPAWN = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ep_config(size: int, rank: int, port: int, **options) -> ExpertParallelConfig:
    options.setdefault("timeout_s", TIMEOUT_S)
    options.setdefault("join_timeout_s", 60.0)
    return ExpertParallelConfig(size, rank, f"127.0.0.1:{port}", cluster_token=TOKEN, **options)


# ---- one member, in a process of its own ----


class EagerGraphs:
    """The decode graphs' stand-in on the CPU: a replay runs the step eagerly at the
    graph's size, the padding request in the spare rows, as a captured step of the
    group runs (every member at that size, its exchanges taking all rows)."""

    def __init__(self, runner, max_batch_size: int) -> None:
        self.runner = runner
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.batch_sizes[-1]
        table = runner.table
        table.req_to_token[table.padding_row, 0] = runner.pool.padding_slot
        table.token_ids[table.padding_row, 0] = 0
        self.inputs = torch.empty(2, 0, dtype=torch.long)
        self.replays = 0

    def padded_size(self, num_reqs: int) -> int:
        return next(s for s in self.batch_sizes if s >= num_reqs)

    def replay(self, rows: list[int], seq_lens: list[int], size: int) -> torch.Tensor:
        runner, group = self.runner, self.runner.expert_parallel
        pad = size - len(rows)
        self.inputs = torch.tensor([rows + [runner.table.padding_row] * pad, seq_lens + [1] * pad])
        counts = group.token_counts
        with group.uniform_step(size):
            logits = decode_step(
                runner.model,
                runner.pool,
                runner.table,
                self.inputs[0],
                self.inputs[1],
                runner.table.max_context_len - 1,
            )
        group.token_counts = counts  # the step goes on as agreed
        self.replays += 1
        return logits[: len(rows)]

    def input_rows(self, num_reqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[0, :num_reqs], self.inputs[1, :num_reqs]


def member_device(rank: int) -> str:
    """One GPU per member (NCCL between them) under LIGHTPD_TEST_DEVICE=cuda; else the CPU."""
    return "cpu" if DEVICE == "cpu" else f"cuda:{rank}"


def needs_devices(size: int) -> None:
    if DEVICE != "cpu" and torch.cuda.device_count() < size:
        pytest.skip(f"a group of {size} needs {size} GPUs")


def member(
    rank: int,
    size: int,
    port: int,
    model_dir: str,
    arrivals: list[tuple[int, int, str, list[int]]],
    results,
    max_prefill_tokens: int = 16,
    die_at: int | None = None,
    death: str = "kill",
    died_at=None,
    graph_max_batch: int = 0,
) -> None:
    """Run rank ``rank`` of a group: add its requests at their steps, step with the
    group until every arrival is past and a step ran nothing anywhere (or the group
    failed), then report its tokens, errors and pool. With ``graph_max_batch``, decode
    steps that fit replay CUDA graphs (on the CPU, their eager stand-in)."""
    config = EngineConfig(
        model=model_dir,
        device=member_device(rank),
        num_kv_slots=1024,
        max_prefill_tokens=max_prefill_tokens,
        cuda_graph_max_batch=graph_max_batch,
        expert_parallel=ep_config(size, rank, port, cuda_graphs=bool(graph_max_batch)),
    )
    engine = LLMEngine(config)
    if graph_max_batch and DEVICE == "cpu":
        engine.runner.graphs = EagerGraphs(engine.runner, graph_max_batch)
    initial_free = engine.num_available_slots
    mine = [(step, rid, prompt) for step, r, rid, prompt in arrivals if r == rank]
    last_arrival = max(step for step, *_ in arrivals)
    tokens: dict[str, list[int]] = {rid: [] for _, rid, _ in mine}
    errors: dict[str, tuple[str, bool, float]] = {}
    idle_steps = 0
    step = 0
    while engine.failure is None:
        if step == die_at:
            died_at.value = time.time()
            os.kill(os.getpid(), signal.SIGKILL if death == "kill" else signal.SIGSTOP)
        for at, rid, prompt in mine:
            if at == step:
                engine.add_request(rid, prompt, GREEDY)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.error is not None:
                errors[out.request_id] = (out.error, out.retry, time.time())
        idle_steps += not engine.expert_parallel.active
        step += 1
        # The same on every member: the step count and what the group agreed.
        if step > last_arrival and not engine.expert_parallel.active:
            break
        assert step < 5000, "the group stopped making progress"
    refused = None
    try:
        engine.add_request("late", [5, 6, 7], GREEDY)
    except RequestError as exc:
        refused = str(exc)
    results.put(
        {
            "rank": rank,
            "tokens": tokens,
            "errors": errors,
            "free": engine.num_available_slots,
            "initial_free": initial_free,
            "failure": engine.failure,
            "refused": refused,
            "steps": step,
            "idle_steps": idle_steps,
            "replays": getattr(engine.runner.graphs, "replays", None),
        }
    )


def run_group(
    size: int,
    model_dir: str,
    arrivals,
    victim: int | None = None,
    die_at: int | None = None,
    death: str = "kill",
    timeout: float = 50.0,
    graph_max_batch: int = 0,
) -> dict:
    """Start ``size`` member processes; their reports by rank (``victim`` dies or
    hangs at step ``die_at`` and reports nothing), and when it did ("died_at")."""
    port = free_port()
    results = SPAWN.Queue()
    died_at = SPAWN.Value("d", 0.0)
    processes = []
    for rank in range(size):
        options = {"die_at": die_at, "death": death, "died_at": died_at} if rank == victim else {}
        options["graph_max_batch"] = graph_max_batch
        processes.append(
            SPAWN.Process(
                target=member,
                args=(rank, size, port, model_dir, arrivals, results),
                kwargs=options,
                daemon=True,
            )
        )
    for process in processes:
        process.start()
    reports = {}
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < size - (victim is not None):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the group hung: reports from {sorted(reports)} only"
            try:
                report = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            reports[report["rank"]] = report
    finally:
        for rank, process in enumerate(processes):
            process.join(timeout=0.1 if rank == victim else 5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    reports["died_at"] = died_at.value
    return reports


def reference_tokens(model_dir: str, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Greedy tokens of one engine holding every expert, all requests batched."""
    engine = make_engine(model_dir, max_prefill_tokens=16)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    tokens = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def plan(size: int, vocab: int) -> list[tuple[int, int, str, list[int]]]:
    """Arrivals (step, rank, request id, prompt): member 0 starts alone (the others
    idle, joining its exchanges), the others join later with other batch sizes;
    prompts longer than the prefill budget run in chunks beside decodes."""
    lengths = [3, 41, 12, 1, 27, 8, 33, 5, 19]
    prompts = random_prompts(lengths, vocab, seed=size)
    steps = [0, 0, 2, 6, 9, 9, 15, 16, 30]
    return [
        (step, 0 if i < 3 else 1 + i % (size - 1), f"r{i}", prompt)
        for i, (step, prompt) in enumerate(zip(steps, prompts, strict=True))
    ]


# ---- the group computes what one engine does ----


@pytest.mark.parametrize(
    ("arch", "size", "graph_max_batch"),
    [
        ("mixtral", 2, 0),
        ("qwen3_moe", 2, 0),
        ("mixtral", 3, 0),
        ("mixtral", 2, 2),
        ("qwen3_moe", 3, 2),
    ],
)
def test_group_gives_the_greedy_tokens_of_one_engine(tiny_model, arch, size, graph_max_batch):
    """With graphs, decode steps of up to ``graph_max_batch`` tokens on the busiest
    member replay the graph of that size on every member (padding rows and all), the
    larger ones run eagerly."""
    needs_devices(size)
    model_dir = tiny_model(arch)
    arrivals = plan(size, ModelConfig.from_dir(model_dir).vocab_size)
    expected = reference_tokens(model_dir, {rid: prompt for _, _, rid, prompt in arrivals})

    reports = run_group(size, model_dir, arrivals, graph_max_batch=graph_max_batch)

    for rank in range(size):
        report = reports[rank]
        assert report["failure"] is None and not report["errors"]
        for rid, tokens in report["tokens"].items():
            assert tokens == expected[rid], f"request {rid} on member {rank}"
        assert report["free"] == report["initial_free"]
    # Every member joined every step (member 0 ran alone at first: the others took
    # part with nothing of their own), and agreed on when all were idle.
    assert len({reports[r]["steps"] for r in range(size)}) == 1
    assert sum(len(reports[r]["tokens"]) for r in range(size)) == len(arrivals)
    if graph_max_batch and DEVICE == "cpu":  # every member replayed the same graphs
        assert len({reports[r]["replays"] for r in range(size)}) == 1
        assert reports[0]["replays"] > 0


# ---- failure ----


@pytest.mark.parametrize(
    ("death", "size", "graph_max_batch"),
    [("kill", 2, 8), ("kill", 3, 0), ("stop", 2, 8), ("stop", 2, 0)],
)
def test_a_member_that_dies_or_hangs_ends_the_others_requests_within_the_bound(
    tiny_model, death, size, graph_max_batch
):
    """SIGKILL (its sockets close: seen at once) or SIGSTOP (it hangs: seen at the
    collective timeout) of the last member while everyone decodes (replaying decode
    graphs, with ``graph_max_batch``)."""
    needs_devices(size)
    model_dir = tiny_model("qwen3_moe")
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    prompts = random_prompts([5, 9, 14, 3, 7, 6], vocab, seed=7)
    arrivals = [(0, i % size, f"r{i}", p) for i, p in enumerate(prompts)]
    victim = size - 1

    reports = run_group(
        size,
        model_dir,
        arrivals,
        victim=victim,
        die_at=6,
        death=death,
        graph_max_batch=graph_max_batch,
    )

    died_at = reports["died_at"]
    assert died_at > 0
    for rank in range(size - 1):
        report = reports[rank]
        assert "expert-parallel group failed" in report["failure"]
        mine = [rid for _, r, rid, _ in arrivals if r == rank]
        assert sorted(report["errors"]) == sorted(mine)  # every request ended, none hangs
        for rid, (error, retry, ended_at) in report["errors"].items():
            assert "expert-parallel group failed" in error and retry, rid
            assert 0 < len(report["tokens"][rid]) < NEW_TOKENS  # it was decoding
            # a death is seen at once, a hang at the timeout
            assert ended_at - died_at < TIMEOUT_S + 3.0, (rid, ended_at - died_at)
        assert report["free"] == report["initial_free"]
        assert "takes no more requests" in report["refused"]


# ---- who may join ----


def join_in_threads(configs: list[ExpertParallelConfig], identities: list[str]) -> list:
    """Join groups (no model: the rendezvous and the checks only) in threads; each
    member's error, or None."""
    errors: list = [None] * len(configs)

    def join(i: int) -> None:
        try:
            ExpertParallelGroup(configs[i], torch.device("cpu")).join(identities[i])
        except ExpertParallelError as exc:
            errors[i] = str(exc)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a join never ended"
    return errors


def test_members_of_another_model_are_refused_by_name():
    port = free_port()
    configs = [ep_config(2, rank, port) for rank in range(2)]
    errors = join_in_threads(configs, ["model a in float32", "model b in float32"])
    assert all(e is not None for e in errors)
    assert any("member 1 serves model b in float32, this member (rank 0)" in e for e in errors)


def test_a_process_without_the_cluster_token_cannot_join():
    port = free_port()
    member_0 = ep_config(2, 0, port, join_timeout_s=2.0)
    outsider = ExpertParallelConfig(
        2, 1, f"127.0.0.1:{port}", cluster_token="not-the-token", join_timeout_s=2.0
    )
    errors = join_in_threads([member_0, outsider], ["m", "m"])
    assert all(e is not None and "could not form the group" in e for e in errors)


# ---- the share of each member ----


def test_each_member_loads_only_its_experts_and_the_shares_sum_to_the_layer(tiny_model):
    model_dir = tiny_model("qwen3_moe")  # 8 experts: 3 members hold 2, 3 and 3
    config = ModelConfig.from_dir(model_dir)
    full = load_model(model_dir, config, torch.float32, torch.device("cpu"))
    layer = next(m for m in full.modules() if isinstance(m, SparseMoeBlock))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, config.hidden_size, generator=g)
    logits = layer.gate(hidden)
    total = torch.zeros_like(hidden)
    held = []
    for rank in range(3):
        group = ExpertParallelGroup(ep_config(3, rank, 1), torch.device("cpu"))
        model = load_model(model_dir, group.shard(config), torch.float32, torch.device("cpu"))
        experts = next(m for m in model.modules() if isinstance(m, SparseMoeBlock)).experts
        local = range(experts.first_expert, experts.first_expert + experts.w13.shape[0])
        held += list(local)
        assert torch.equal(experts.w13, layer.experts.w13[local.start : local.stop])
        assert torch.equal(experts.w2, layer.experts.w2[local.start : local.stop])
        total += experts(hidden, logits)
    assert held == list(range(config.moe.num_experts))
    assert torch.allclose(total, layer.experts(hidden, logits), atol=1e-6)


def test_expert_parallel_options_are_checked():
    with pytest.raises(ValueError, match="--ep-rank"):
        ep_config(2, 2, 1)
    with pytest.raises(ValueError, match="HOST:PORT"):
        ExpertParallelConfig(2, 0, "nohost", cluster_token=TOKEN)
    with pytest.raises(ValueError, match="cluster token"):
        ExpertParallelConfig(2, 0, "127.0.0.1:1")
    with pytest.raises(ValueError, match="at least 3 experts"):
        ep_config(3, 0, 1).local_experts(2)
    assert [list(ep_config(3, r, 1).local_experts(4)) for r in range(3)] == [[0], [1], [2, 3]]


def test_a_dense_model_cannot_share_experts(tiny_model):
    config = ModelConfig.from_dir(tiny_model("llama"))
    with pytest.raises(ValueError, match="for MoE models"):
        ExpertParallelGroup(ep_config(2, 0, 1), torch.device("cpu")).shard(config)


def test_the_loader_never_reads_other_members_experts(tiny_model, monkeypatch):
    from lightpd.common.engine import loader

    model_dir = tiny_model("mixtral")
    read: list[str] = []
    original = loader._iter_tensors

    def spy(files, device):
        for name, get in original(files, device):
            yield name, lambda name=name, get=get: read.append(name) or get()

    monkeypatch.setattr(loader, "_iter_tensors", spy)
    config = ModelConfig.from_dir(model_dir)
    group = ExpertParallelGroup(ep_config(2, 1, 1), torch.device("cpu"))
    load_model(model_dir, group.shard(config), torch.float32, torch.device("cpu"))
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts_read == {2, 3}  # of 4; member 1 holds the second half
