"""A node shares itself among tenants by weight: one tenant's burst cannot keep
another's short request waiting, and nothing is lost to the pauses it takes."""

from lightpd.common.engine import EngineConfig, FinishReason
from lightpd.common.wire.sampling_params import SamplingParams
from tests.conftest import DEVICE, open_engine

ROWS = 8


def run(engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict:
    """Add each request at its step; step to the end: id -> (tokens, step finished)."""
    results: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
            results[request_id] = [[], None]
        for out in engine.step():
            results[out.request_id][0] += out.new_token_ids
            if out.finish_reason is not None:
                assert out.finish_reason == FinishReason.LENGTH, out
                results[out.request_id][1] = step
        step += 1
        assert step < 5000
    return results


def greedy(tenant: int, tokens: int, weight: float = 1.0) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_new_tokens=tokens, ignore_eos=True, tenant=tenant, tenant_weight=weight
    )


def test_a_short_request_of_another_tenant_is_not_kept_waiting(tiny_model):
    model = tiny_model("llama")
    burst = [(f"a{i}", [5 + i, 6, 7, 8], greedy(111, 60)) for i in range(3 * ROWS)]
    short = ("b", [9, 10, 11], greedy(222, 4))
    engine = open_engine(EngineConfig(model=model, device=DEVICE, max_num_reqs=ROWS))
    shared = run(engine, {0: burst, 5: [short]})
    # Alone it would wait for two waves of the burst (over 100 steps); it gets a row
    # within a step and finishes in about as many steps as it has tokens.
    assert shared["b"][1] - 5 <= 8, shared["b"][1]
    assert engine.scheduler.num_preemptions >= 1
    # Pausing changes no token: every request gives what it gives alone.
    alone = run(
        open_engine(EngineConfig(model=model, device=DEVICE, max_num_reqs=ROWS)),
        {0: [*burst, short]},
    )
    assert {k: v[0] for k, v in shared.items()} == {k: v[0] for k, v in alone.items()}
    assert engine.num_available_slots == engine.pool.num_slots


def test_one_tenant_alone_is_served_in_arrival_order_without_pauses(tiny_model):
    engine = open_engine(EngineConfig(model=tiny_model("llama"), device=DEVICE, max_num_reqs=ROWS))
    burst = [(f"a{i}", [5 + i, 6, 7], greedy(0, 20)) for i in range(2 * ROWS)]
    results = run(engine, {0: burst})
    finished = [results[f"a{i}"][1] for i in range(2 * ROWS)]
    assert finished == sorted(finished)
    assert engine.scheduler.num_preemptions == 0


def test_weights_share_rows_in_proportion(tiny_model):
    engine = open_engine(EngineConfig(model=tiny_model("llama"), device=DEVICE, max_num_reqs=ROWS))
    heavy = [(f"h{i}", [5, 6, 7 + i], greedy(1, 200, weight=3.0)) for i in range(2 * ROWS)]
    light = [(f"l{i}", [8, 9, 7 + i], greedy(2, 200, weight=1.0)) for i in range(2 * ROWS)]
    for request_id, prompt, params in heavy + light:
        engine.add_request(request_id, prompt, params)
    for _ in range(30):
        engine.step()
    running = [r.request_id[0] for r in engine.scheduler.running]
    assert running.count("h") == 3 * running.count("l") == 3 * ROWS // 4, running
    for request_id, *_ in heavy + light:
        engine.abort(request_id)
    assert engine.num_available_slots == engine.pool.num_slots
