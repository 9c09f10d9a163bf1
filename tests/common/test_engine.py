"""The in-process engine: continuous batching against transformers, and its bookkeeping."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightpd.common.engine import EngineConfig, FinishReason, LLMEngine, RequestError, llm_engine
from lightpd.common.wire.sampling_params import SamplingParams
from tests.common.reservations import admit_reservations, reserved_slots
from tests.conftest import DEVICE, open_engine

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def make_engine(model_dir: str, **options) -> LLMEngine:
    options.setdefault("num_kv_slots", 2048)
    return open_engine(EngineConfig(model=model_dir, device=DEVICE, **options))


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    for prompt in prompts:
        ids = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
        outs.append(ids[0, len(prompt) :].tolist())
    return outs


def run_staggered(engine: LLMEngine, prompts, params, arrivals) -> dict[str, list[int]]:
    """Add request i at step arrivals[i]; step until all finish. Returns tokens by id."""
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    step = 0
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            p = params[i] if isinstance(params, list) else params
            engine.add_request(f"r{i}", prompts[i], p)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
        assert step < 10_000, "the engine stopped making progress"
    return tokens


ARCHES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
]
LENGTHS = (3, 41, 12, 1, 27, 8, 60, 19, 33, 5)
ARRIVALS = (0, 0, 1, 3, 4, 9, 15, 16, 22, 30)  # joins while others are mid-decode


@pytest.mark.parametrize(("arch", "options"), ARCHES, ids=lambda v: str(v) if v else "")
def test_continuous_batching_matches_transformers_greedy(tiny_model, arch, options):
    model_dir = tiny_model(arch, **options)
    engine = make_engine(model_dir)
    prompts = random_prompts(LENGTHS, engine.model_config.vocab_size)
    expected = hf_greedy(model_dir, prompts)
    # A small prefill budget also makes the long prompts run in chunks.
    engine = make_engine(model_dir, max_prefill_tokens=24)
    tokens = run_staggered(engine, prompts, GREEDY, ARRIVALS)
    for i, want in enumerate(expected):
        assert tokens[f"r{i}"] == want, f"request {i} (prompt of {LENGTHS[i]} tokens)"
    assert engine.num_available_slots == engine.pool.num_slots


def test_paused_requests_resume_with_the_same_tokens(tiny_model):
    model_dir = tiny_model("llama")
    engine = make_engine(model_dir, num_kv_slots=200)
    # Teach the estimator that outputs are short, so it admits more than fits.
    engine.generate(random_prompts([4] * 8, 400, seed=1), SamplingParams(max_new_tokens=2))
    prompts = random_prompts(LENGTHS[:8], engine.model_config.vocab_size)
    sampled = [
        SamplingParams(
            temperature=0.8, seed=i, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
        for i in range(4)
    ]
    params = [GREEDY] * 4 + sampled
    tokens = run_staggered(engine, prompts, params, [0] * 8)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to run out"
    assert engine.num_available_slots == 200
    expected = hf_greedy(model_dir, prompts[:4])
    roomy = run_staggered(make_engine(model_dir), prompts, params, [0] * 8)
    for i in range(8):
        assert len(tokens[f"r{i}"]) == NEW_TOKENS
        assert tokens[f"r{i}"] == roomy[f"r{i}"], f"request {i} changed when paused"
    for i in range(4):
        assert tokens[f"r{i}"] == expected[i]


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_model):
    model_dir = tiny_model("qwen3")
    vocab = 400
    prompt = random_prompts([9], vocab, seed=2)[0]
    params = SamplingParams(
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        seed=77,
        max_new_tokens=24,
        min_new_tokens=24,
        repetition_penalty=1.1,
        presence_penalty=0.3,
    )
    alone = make_engine(model_dir).generate([prompt], params)[0]
    again = make_engine(model_dir).generate([prompt], params)[0]
    assert alone == again
    # Same request among others that sample differently and arrive at other times.
    others = random_prompts([30, 2, 14, 50], vocab, seed=3)
    other_params = [
        SamplingParams(temperature=t, seed=s, max_new_tokens=20)
        for t, s in ((0.7, 1), (1.3, None), (0.0, None), (1.0, 5))
    ]
    tokens = run_staggered(
        make_engine(model_dir), [*others, prompt], [*other_params, params], [0, 0, 2, 5, 3]
    )
    assert tokens["r4"] == alone
    # Without a seed, two requests differ (the engine seeds them itself).
    free = SamplingParams(temperature=1.0, max_new_tokens=24, min_new_tokens=24)
    a, b = make_engine(model_dir).generate([prompt, prompt], free)
    assert a != b


def test_too_long_prompt_is_refused_while_others_run(tiny_model):
    engine = make_engine(tiny_model("llama"), max_model_len=64)
    prompts = random_prompts([10, 20], 400)
    engine.add_request("ok-1", prompts[0], GREEDY)
    engine.step()
    with pytest.raises(
        RequestError, match="the prompt has 64 tokens, but this engine's context is 64 tokens"
    ):
        engine.add_request("too-long", list(range(3, 67)), GREEDY)
    with pytest.raises(RequestError, match="the prompt is empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(RequestError, match="token id 400 is outside the vocabulary"):
        engine.add_request("bad-token", [5, 400], GREEDY)
    engine.add_request("ok-2", prompts[1], SamplingParams(temperature=0, max_new_tokens=100))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["ok-1"].num_output_tokens == NEW_TOKENS
    # max_new_tokens is capped by the context: 64 - 20 prompt tokens.
    assert finished["ok-2"].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert finished["ok-2"].num_output_tokens <= 44
    assert engine.num_available_slots == engine.pool.num_slots


def test_stops_lengths_logprobs_and_eos(tiny_model):
    model_dir = tiny_model("qwen2")
    engine = make_engine(model_dir)
    prompt = random_prompts([12], 400, seed=4)[0]
    free_run = engine.generate([prompt], GREEDY)[0]
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    out_ids = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=32, stop_token_ids=(stop_at,))
    )[0]
    assert out_ids == free_run[: first + 1]  # the stop token is the last one returned

    engine.add_request("lp", prompt, SamplingParams(temperature=0, max_new_tokens=4, logprobs=3))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.new_token_ids[0] for o in outs] == free_run[:4]
    assert outs[-1].finish_reason == FinishReason.LENGTH
    for o in outs:
        [lp] = o.new_logprobs
        assert lp.token_id == o.new_token_ids[0] and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the best
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]

    eos = engine.model_config.eos_token_ids[0]
    forced = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(eos,), ignore_eos=True)
    assert len(engine.generate([prompt], forced)[0]) <= 8


def test_abort_frees_slots_at_once(tiny_model):
    engine = make_engine(tiny_model("llama"), num_kv_slots=512)
    prompts = random_prompts([30, 40], 400)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used_slots == 30 + 40 + 2 * 2
    out = engine.abort("a")
    assert out.finish_reason == FinishReason.ABORT and out.num_output_tokens == 3
    # What "a" computed may stay cached, but no request holds it: it is available.
    assert engine.num_available_slots == 512 - (40 + 2)
    assert engine.abort("a") is None
    engine.abort("b")
    assert engine.num_available_slots == 512 and not engine.has_unfinished()


def test_thousand_requests_with_random_aborts_leak_nothing(tiny_model):
    engine = make_engine(
        tiny_model("mistral"), num_kv_slots=1500, max_num_reqs=64, max_prefill_tokens=256
    )
    rng = random.Random(0)
    initial_free, initial_rows = engine.num_available_slots, engine.runner.table.num_free_rows
    live: set[str] = set()
    finished = aborted = 0
    for i in range(1000):
        prompt = [rng.randrange(3, 400) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 1.0]), seed=i, max_new_tokens=rng.randint(1, 24)
        )
        engine.add_request(f"q{i}", prompt, params)
        live.add(f"q{i}")
        if rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
            aborted += 1
        for _ in range(rng.randint(0, 2)):
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
                    finished += 1
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
    assert not live and finished + aborted == 1000
    assert engine.num_available_slots == initial_free
    # Every slot is free or cached (once), and no cached one is referenced.
    cache = engine.scheduler.kv.prefix_cache
    held = engine.pool.free_slots().tolist() + cache.cached_slots().tolist()
    assert sorted(held) == list(range(1500))
    assert not any(cache.ref_counts())
    assert engine.runner.table.num_free_rows == initial_rows


@pytest.mark.parametrize("kind", ["repetition", "presence", "frequency"])
def test_penalties_run_past_the_vocabulary_size(tiny_model, kind):
    model_dir = tiny_model("llama")
    engine = make_engine(model_dir)
    vocab = engine.model_config.vocab_size
    penalty = {
        "repetition": {"repetition_penalty": 1.3},
        "presence": {"presence_penalty": 0.5},
        "frequency": {"frequency_penalty": 0.4},
    }[kind]
    long_output = SamplingParams(
        temperature=0, max_new_tokens=vocab + 20, min_new_tokens=vocab + 20, **penalty
    )
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=vocab + 20, **penalty)
    long_prompt = SamplingParams(temperature=0, max_new_tokens=8, min_new_tokens=8, **penalty)
    prompts = random_prompts([10, 30, vocab + 50], vocab)
    initial_free, initial_rows = engine.num_available_slots, engine.runner.table.num_free_rows
    finished = {}
    for i, params in enumerate((long_output, sampled, long_prompt)):
        engine.add_request(f"r{i}", prompts[i], params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["r0"].finish_reason == FinishReason.LENGTH
    assert finished["r0"].num_output_tokens == vocab + 20
    assert finished["r1"].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert finished["r2"].num_output_tokens == 8
    assert engine.num_available_slots == initial_free
    assert engine.runner.table.num_free_rows == initial_rows
    if kind == "repetition":
        # transformers penalizes the same prompt + output tokens.
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        want = hf.generate(
            torch.tensor([prompts[2]]),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            repetition_penalty=1.3,
        )[0, len(prompts[2]) :].tolist()
        assert engine.generate([prompts[2]], long_prompt)[0] == want


def run_collecting(engine: LLMEngine, prompts, params, arrivals) -> dict[str, list]:
    """Like run_staggered, but every output of each request, in order."""
    outputs = {f"r{i}": [] for i in range(len(prompts))}
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    step = 0
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(f"r{i}", prompts[i], params)
        for out in engine.step():
            outputs[out.request_id].append(out)
        step += 1
        assert step < 10_000, "the engine stopped making progress"
    return outputs


def test_a_failing_batch_fails_only_its_requests(tiny_model, monkeypatch, caplog):
    model_dir = tiny_model("llama")
    prompts = random_prompts([12, 20, 7], 400, seed=5)
    arrivals = [0, 3, 0]  # r1's prompt runs alone, while the others decode
    expected = run_staggered(make_engine(model_dir), prompts, GREEDY, arrivals)
    engine = make_engine(model_dir)
    initial_free, initial_rows = engine.num_available_slots, engine.runner.table.num_free_rows
    run = engine.runner.run

    def faulty_run(batch, kv_saved=None):
        if any(r.request_id == "r1" for r in batch.requests):
            raise RuntimeError("injected fault")
        return run(batch, kv_saved)

    monkeypatch.setattr(engine.runner, "run", faulty_run)
    outputs = run_collecting(engine, prompts, GREEDY, arrivals)
    [failed] = outputs["r1"]
    assert failed.finish_reason == FinishReason.ERROR and failed.new_token_ids == []
    assert failed.error == "internal error while running this request: RuntimeError: injected fault"
    for rid in ("r0", "r2"):
        assert [t for o in outputs[rid] for t in o.new_token_ids] == expected[rid]
        assert outputs[rid][-1].finish_reason == FinishReason.LENGTH
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "injected fault" in str(logged[0].exc_info[1])
    assert engine.num_available_slots == initial_free
    assert engine.runner.table.num_free_rows == initial_rows
    # The failed id is free again, and the engine still serves it.
    monkeypatch.setattr(engine.runner, "run", run)
    engine.add_request("r1", prompts[1], GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert engine.num_available_slots == initial_free


def test_a_failed_decode_batch_fails_all_of_its_requests(tiny_model, monkeypatch):
    model_dir = tiny_model("llama")
    engine = make_engine(model_dir)
    initial_free = engine.num_available_slots
    prompts = random_prompts([9, 15], 400, seed=6)
    engine.add_request("short", prompts[0], SamplingParams(temperature=0, max_new_tokens=3))
    engine.add_request("long", prompts[1], GREEDY)
    for _ in range(2):
        engine.step()
    run = engine.runner.run

    def short_result(batch):
        # One row too few: "short" takes its last token and finishes, then "long" finds none.
        return run(batch)[:-1]

    monkeypatch.setattr(engine.runner, "run", short_result)
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {"short", "long"}
    assert all(o.finish_reason == FinishReason.ERROR for o in outputs)
    assert all(o.error.startswith("internal error while running this request: ") for o in outputs)
    assert not engine.has_unfinished() and engine.num_available_slots == initial_free
    monkeypatch.setattr(engine.runner, "run", run)
    assert engine.generate([prompts[1]], GREEDY) == make_engine(model_dir).generate(
        [prompts[1]], GREEDY
    )


def test_bad_reservation_calls_are_refused_per_request(tiny_model):
    engine = make_engine(tiny_model("llama"))
    initial_free = engine.num_available_slots
    prompt = random_prompts([10], 400, seed=7)[0]
    params = SamplingParams(temperature=0, max_new_tokens=4)
    engine.reserve("x", prompt, params)
    admit_reservations(engine)
    assert engine.pop_admitted() == ["x"]
    handoff = engine.kv_handoff
    with pytest.raises(RequestError, match="'nope' holds no reservation"):
        reserved_slots(engine, "nope")
    with pytest.raises(RequestError, match="'nope' holds no reservation"):
        handoff.complete_reservation("nope", 5)
    for bad in (400, -1):
        with pytest.raises(RequestError, match=f"first token {bad} is outside the vocabulary"):
            handoff.complete_reservation("x", bad)
    assert len(reserved_slots(engine, "x")) == 10  # the refusals changed nothing
    first = handoff.complete_reservation("x", 5)
    assert first.new_token_ids == [5] and not first.finished
    with pytest.raises(RequestError, match="'x' holds no reservation"):
        handoff.complete_reservation("x", 5)
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(RequestError, match="'x' holds no reservation"):
        handoff.complete_reservation("x", 5)
    assert engine.num_available_slots == initial_free


class FakeClock:
    """Stands in for the engine's ``time`` module, so queue deadlines pass on demand."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_a_local_request_admission_is_reported_once_even_when_paused(tiny_model, monkeypatch):
    # A decode node's plain request (it prefills here): queued under a timeout,
    # its admission is reported once; paused and resumed later, it is neither
    # reported again nor expired, though its queue timeout has long passed.
    clock = FakeClock()
    monkeypatch.setattr(llm_engine, "time", clock)
    model_dir = tiny_model("llama")
    engine = make_engine(model_dir, num_kv_slots=200)
    engine.generate(random_prompts([4] * 8, 400, seed=1), SamplingParams(max_new_tokens=2))
    prompts = random_prompts(LENGTHS[:8], engine.model_config.vocab_size)
    params = [
        SamplingParams(
            temperature=0.8, seed=i, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
        for i in range(8)
    ]
    ids = [f"r{i}" for i in range(8)]
    for request_id, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(request_id, prompt, p, queue_timeout_s=5.0)
    assert engine.pop_admitted() == []  # queued, not admitted yet
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reported: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        reported += engine.pop_admitted()
        if len(reported) == len(ids):
            clock.now = 100.0  # every first wait is over: its deadline no longer applies
        assert engine.expire_waiting() == []
    assert sorted(reported) == ids
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to run out"
    assert engine.num_available_slots == 200
    assert [tokens[i] for i in ids] == make_engine(model_dir).generate(prompts, params)


def test_a_local_request_past_its_queue_timeout_is_expired_holding_nothing(tiny_model, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(llm_engine, "time", clock)
    engine = make_engine(tiny_model("llama"), num_kv_slots=64)
    big, late = random_prompts([40, 30], 400, seed=3)
    engine.add_request("big", big, SamplingParams(temperature=0, max_new_tokens=16))
    engine.add_request("late", late, GREEDY, queue_timeout_s=5.0)
    engine.step()  # "big" runs; "late" does not fit beside it
    assert engine.pop_admitted() == []
    assert engine.expire_waiting() == []  # not yet past its deadline
    free = engine.num_available_slots
    clock.now = 6.0
    assert engine.expire_waiting() == ["late"]
    assert engine.num_available_slots == free  # it held nothing, and gave nothing back
    assert engine.stats().num_queued == 0 and engine.abort("late") is None
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"big"} and outputs[-1].finished
    assert engine.pop_admitted() == [] and engine.expire_waiting() == []
    assert engine.num_available_slots == 64
    engine.add_request("late", late, GREEDY, queue_timeout_s=5.0)  # its id is free again
    engine.step()
    assert engine.pop_admitted() == ["late"]


def run_one(engine: LLMEngine, request_id: str, prompt, params, outputs=()) -> list[int]:
    engine.add_request(request_id, prompt, params, output_token_ids=outputs)
    tokens: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens += output.new_token_ids
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True),
        SamplingParams(
            temperature=1.0,
            top_p=0.9,
            seed=7,
            max_new_tokens=20,
            min_new_tokens=12,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.4,
        ),
    ],
    ids=["greedy", "seeded-with-penalties"],
)
def test_a_resumed_request_continues_exactly_where_it_stopped(tiny_model, params):
    # Migration resubmits prompt + the tokens already streamed: the continuation must
    # be what the uninterrupted request would have produced (same random stream
    # position, penalties over the whole history, the same token budget).
    engine = make_engine(tiny_model("llama"))
    prompt = random_prompts([9], engine.model_config.vocab_size)[0]
    whole = run_one(engine, "whole", prompt, params)
    for cut in (1, 7, len(whole) - 1):
        rest = run_one(engine, f"resumed-{cut}", prompt, params, whole[:cut])
        assert whole[:cut] + rest == whole, cut
    assert engine.num_available_slots == 2048


def test_a_resumed_request_that_cannot_go_on_is_refused(tiny_model):
    engine = make_engine(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    with pytest.raises(RequestError, match="already has its 4 output tokens"):
        engine.add_request("done", [5, 6], params, output_token_ids=[7, 8, 9, 10])
    with pytest.raises(RequestError, match="output token id 999999 is outside"):
        engine.add_request("bad", [5, 6], params, output_token_ids=[999999])
    assert not engine.has_unfinished()


def test_logit_bias_steers_greedy_decoding_and_bad_ids_are_refused(tiny_model):
    engine = make_engine(tiny_model("llama"))
    prompt = random_prompts([6], engine.model_config.vocab_size)[0]
    plain = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    unbiased = run_one(engine, "plain", prompt, plain)
    forced = SamplingParams(
        temperature=0, max_new_tokens=5, ignore_eos=True, logit_bias=((11, 100.0),)
    )
    assert run_one(engine, "forced", prompt, forced) == [11] * 5
    banned = SamplingParams(
        temperature=0, max_new_tokens=5, ignore_eos=True, logit_bias=((unbiased[0], -100.0),)
    )
    assert run_one(engine, "banned", prompt, banned)[0] != unbiased[0]
    vocab = engine.model_config.vocab_size
    bad = SamplingParams(temperature=0, logit_bias=((vocab, 1.0),))
    with pytest.raises(RequestError, match=f"logit_bias token id {vocab} is outside"):
        engine.add_request("bad", prompt, bad)
    with pytest.raises(ValueError, match="logit_bias values must be in"):
        SamplingParams(logit_bias=((1, 101.0),))
