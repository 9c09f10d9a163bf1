"""Grammar-constrained decoding in the engine: valid output in a shared batch, and a
request's grammar state kept across the hand-off, pauses and moves."""

import json
import re
import time

import pytest

from lightpd.common.engine import EngineConfig, FinishReason, LLMEngine
from lightpd.common.engine import grammar as grammar_module
from lightpd.common.tokenizer import load_tokenizer
from lightpd.common.wire.sampling_params import GrammarSpec, SamplingParams
from tests.common.reservations import admit_reservations
from tests.conftest import DEVICE, open_engine
from tests.json_schema_check import ALL_SCHEMAS, check

# The first token decides what follows: "x" then digits, or "y" then letters. A
# matcher that forgot that token would let the rest be a whole match of its own.
FORK = "x[0-9]{5}|y[a-z]{5}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lightpd.common.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("grammar") / "m", "llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    with LLMEngine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=4096)) as engine:
        yield engine


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def params(grammar: GrammarSpec | None, seed: int, **options) -> SamplingParams:
    options.setdefault("max_new_tokens", 120)
    return SamplingParams(temperature=1.0, seed=seed, grammar=grammar, **options)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Run requests together to the end: id -> (tokens, finish reason, error)."""
    for request_id, (prompt, p) in requests.items():
        engine.add_request(request_id, prompt, p)
    results = {request_id: [[], None, None] for request_id in requests}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id][0] += out.new_token_ids
            results[out.request_id][1:] = [out.finish_reason, out.error]
    return results


def test_every_schema_reply_validates_in_a_batch_shared_with_free_requests(engine, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("Tell me about GPUs", "Hello world!", "The fox")]
    free = {f"free{s}": (prompts[s % 3], params(None, s, max_new_tokens=12)) for s in range(3)}
    alone = run(engine, free)
    requests = dict(free)
    for i, schema in enumerate(ALL_SCHEMAS):
        spec = GrammarSpec("json_schema", json.dumps(schema))
        for seed in range(5):
            requests[f"s{i}-{seed}"] = (prompts[seed % 3], params(spec, seed))
    results = run(engine, requests)
    for request_id, (tokens, reason, error) in results.items():
        if request_id.startswith("free"):
            # The masks of the others change nothing for them.
            assert tokens == alone[request_id][0]
            continue
        schema = ALL_SCHEMAS[int(request_id[1])]
        assert reason == FinishReason.STOP, (request_id, reason, error)
        assert tokens[-1] in engine.model_config.eos_token_ids
        check(tokenizer.decode(tokens, skip_special_tokens=True), schema)
    assert engine.num_available_slots == engine.pool.num_slots


def test_regex_choice_json_object_and_ebnf(engine, tokenizer):
    prompt = tokenizer.encode("Hello")
    choices = ["red", "green", 'say "hi"']
    cases = {
        "regex": (GrammarSpec("regex", FORK), lambda t: re.fullmatch(FORK, t)),
        "choice": (
            GrammarSpec("ebnf", "root ::= " + " | ".join(json.dumps(c) for c in choices)),
            lambda t: t in choices,
        ),
        "object": (GrammarSpec("json_object"), lambda t: isinstance(json.loads(t), dict)),
    }
    requests = {
        f"{name}-{seed}": (prompt, params(spec, seed, max_new_tokens=60))
        for name, (spec, _) in cases.items()
        for seed in range(4)
    }
    for request_id, (tokens, reason, _) in run(engine, requests).items():
        if reason == FinishReason.LENGTH:  # an object may run long; what stops must hold
            continue
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert reason == FinishReason.STOP and cases[request_id.split("-")[0]][1](text), text


def test_the_grammar_ends_a_request_that_ignores_eos(engine, tokenizer):
    p = params(GrammarSpec("regex", FORK), 3, ignore_eos=True)
    [(tokens, reason, _)] = run(engine, {"r": (tokenizer.encode("Hi"), p)}).values()
    assert reason == FinishReason.STOP
    assert re.fullmatch(FORK, tokenizer.decode(tokens, skip_special_tokens=True))


def test_a_reservation_continues_from_the_first_token_it_is_given(engine, tokenizer):
    """The decode side of the hand-off: the prefill node's first token advances the
    matcher before the first step (its KV does not matter to the grammar)."""
    for seed, first in enumerate(["x", "y"] * 3):
        request_id = f"handoff-{seed}"
        p = params(GrammarSpec("regex", FORK), seed)
        engine.reserve(request_id, tokenizer.encode("Hello world"), p)
        admit_reservations(engine)
        assert engine.pop_admitted() == [request_id]
        [token] = tokenizer.encode(first)
        tokens = engine.kv_handoff.complete_reservation(request_id, token).new_token_ids
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                reason = out.finish_reason
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert reason == FinishReason.STOP and re.fullmatch(FORK, text), text
        assert text.startswith(first)


def test_a_first_token_outside_the_grammar_fails_the_request_only(engine, tokenizer):
    p = params(GrammarSpec("regex", FORK), 0)
    engine.reserve("bad-first", tokenizer.encode("Hello"), p)
    admit_reservations(engine)
    engine.pop_admitted()
    engine.kv_handoff.complete_reservation("bad-first", tokenizer.encode("{")[0])
    outputs = engine.step()
    [failed] = [o for o in outputs if o.request_id == "bad-first"]
    assert failed.finish_reason == FinishReason.ERROR and failed.new_token_ids == []
    assert "does not fit the grammar" in failed.error
    assert not engine.has_unfinished()
    assert engine.num_available_slots == engine.pool.num_slots


def test_a_resumed_request_replays_its_output_into_the_matcher(engine, tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    spec = GrammarSpec("json_schema", json.dumps(ALL_SCHEMAS[0]))
    [(whole, _, _)] = run(engine, {"whole": (prompt, params(spec, 11))}).values()
    # Moved after 5 tokens: what it streamed is computed here and counted as output.
    engine.add_request("moved", prompt, params(spec, 11), output_token_ids=whole[:5])
    rest = []
    while engine.has_unfinished():
        for out in engine.step():
            rest += out.new_token_ids
    assert whole[:5] + rest == whole


def test_paused_requests_keep_their_grammar_state(model_dir, engine, tokenizer):
    small = open_engine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=200))
    # Teach the estimator that outputs are short, so it admits more than fits.
    small.generate([[5, 6, 7, 8]] * 8, SamplingParams(max_new_tokens=2))
    spec = GrammarSpec("json_schema", json.dumps(ALL_SCHEMAS[1]))
    prompts = [tokenizer.encode(t) for t in ("Tell me about GPUs and kernels", "Hello world!")]
    requests = {f"p{s}": (prompts[s % 2], params(spec, s, max_new_tokens=60)) for s in range(6)}
    paused = run(small, requests)
    assert small.scheduler.num_preemptions > 0, "the pool was meant to run out"
    # Recomputed from prompt + output, each goes on from where its matcher was.
    roomy = run(engine, requests)
    for request_id, (tokens, reason, _) in paused.items():
        assert (tokens, reason) == tuple(roomy[request_id][:2])
        if reason == FinishReason.STOP:
            check(tokenizer.decode(tokens, skip_special_tokens=True), ALL_SCHEMAS[1])
    assert small.num_available_slots == 200


def test_a_grammar_that_does_not_compile_fails_its_request_not_the_engine(engine, tokenizer):
    prompt = tokenizer.encode("Hello")
    requests = {
        "bad": (prompt, params(GrammarSpec("regex", "(ab"), 0)),
        "good": (prompt, params(None, 0, max_new_tokens=4)),
    }
    results = run(engine, requests)
    tokens, reason, error = results["bad"]
    assert reason == FinishReason.ERROR and tokens == []
    assert error.startswith("the grammar does not compile: Regex parsing error")
    assert results["good"][1] == FinishReason.LENGTH and len(results["good"][0]) == 4
    assert engine.num_available_slots == engine.pool.num_slots


def _slow_choices(seed: int) -> GrammarSpec:
    """A grammar that takes this machine seconds to compile: 150 long choices."""
    choices = [f"{seed}-{i:04d}" + "q" * 790 for i in range(150)]
    return GrammarSpec("ebnf", "root ::= " + " | ".join(json.dumps(c) for c in choices))


def test_a_grammar_that_compiles_slowly_stalls_no_step(model_dir, tokenizer):
    """A request waits for its grammar apart from the batch: the other requests run
    at once, every step stays short, and it runs once its grammar is ready."""
    with LLMEngine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=4096)) as engine:
        prompt = tokenizer.encode("Hello")
        slow = _slow_choices(1)
        engine.add_request("slow", prompt, params(slow, 1, max_new_tokens=32))
        engine.add_request("plain", prompt, params(None, 2, max_new_tokens=8))
        finished, longest_step, tokens = {}, 0.0, []
        while engine.has_unfinished():
            started = time.monotonic()
            for out in engine.step():
                if out.request_id == "slow":
                    tokens += out.new_token_ids
                if out.finish_reason is not None:
                    finished[out.request_id] = (time.monotonic(), out.finish_reason, out.error)
            longest_step = max(longest_step, time.monotonic() - started)
            time.sleep(0.001)
        assert finished["plain"][0] < finished["slow"][0]  # it did not wait for the compile
        assert finished["slow"][1:] == (FinishReason.LENGTH, None)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert re.fullmatch(r"1-0\d{3}q*", text), text  # under its grammar
        assert longest_step < 1.0, longest_step
        assert engine.num_available_slots == engine.pool.num_slots


def test_a_grammar_past_its_compile_budget_fails_only_its_request(
    model_dir, tokenizer, monkeypatch
):
    monkeypatch.setattr(grammar_module, "COMPILE_BUDGET_S", 0.2)
    with LLMEngine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=4096)) as engine:
        prompt = tokenizer.encode("Hello")
        engine.add_request("slow", prompt, params(_slow_choices(2), 1))
        engine.add_request("plain", prompt, params(None, 2, max_new_tokens=8))
        results = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finish_reason is not None:
                    results[out.request_id] = (out.finish_reason, out.error)
            time.sleep(0.01)
        assert results["plain"] == (FinishReason.LENGTH, None)
        reason, error = results["slow"]
        assert reason == FinishReason.ERROR
        assert "did not compile within 0.2 s (the compile time limit)" in error
        assert engine.num_available_slots == engine.pool.num_slots


def test_compiled_grammars_are_kept_within_a_byte_bound(model_dir, monkeypatch):
    with LLMEngine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=256)) as engine:
        cache = engine.grammars
        one = cache.compile(GrammarSpec("regex", "[a-z]{1,40}")).result()
        monkeypatch.setattr(grammar_module, "MAX_CACHED_GRAMMAR_BYTES", 3 * one.memory_size_bytes)
        for i in range(8):
            cache.compile(GrammarSpec("regex", f"[a-z]{{1,{41 + i}}}")).result()
            cache.compile(GrammarSpec("regex", "x")).result()  # settle the bound
        # The bound holds once a compile is asked for; the newest one's bytes come on top.
        assert cache.num_cached_bytes <= 4 * one.memory_size_bytes + 10_000
        assert len(cache._compiled) < 9


def test_a_grammar_past_its_memory_budget_is_stopped_and_the_next_compiles(
    model_dir, tokenizer, monkeypatch
):
    """The compile runs in a worker process, killed once it has grown past the memory
    budget; the request fails naming the limit, and the next grammar gets a new
    worker."""
    monkeypatch.setattr(grammar_module, "COMPILE_MEMORY_BYTES", 1 << 20)
    with LLMEngine(EngineConfig(model=model_dir, device=DEVICE, num_kv_slots=4096)) as engine:
        prompt = tokenizer.encode("Hello")
        big = GrammarSpec(
            "json_schema",
            json.dumps({"type": "string", "enum": [f"value-{i}" * 8 for i in range(50_000)]}),
        )
        results = run(engine, {"big": (prompt, params(big, 1))})
        reason, error = results["big"][1:]
        assert reason == FinishReason.ERROR
        assert "needed more than 1 MiB to compile (the compile memory limit)" in error
        monkeypatch.setattr(grammar_module, "COMPILE_MEMORY_BYTES", 2 << 30)
        fine = run(engine, {"fine": (prompt, params(GrammarSpec("regex", FORK), 2))})
        assert fine["fine"][1:] == [FinishReason.STOP, None]
        assert engine.num_available_slots == engine.pool.num_slots
