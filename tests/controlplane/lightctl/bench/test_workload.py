"""What the benchmark sends and when: workloads and arrival schedules."""

import itertools
import math
import statistics

import pytest

from lightpd.common.tiny import build_tokenizer
from lightpd.controlplane.lightctl.bench.arrivals import arrival_times
from lightpd.controlplane.lightctl.bench.workload import (
    TokenPrompts,
    WordPrompts,
    WorkloadSpec,
    build_workload,
    chat_messages,
    completion_prompt,
)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gaps_average_one_over_the_rate_and_burstiness_sets_their_spread(burstiness):
    times = arrival_times(20_000, rate=8.0, burstiness=burstiness, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.03)
    # A gamma with shape k has a squared coefficient of variation of 1 / k.
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.1)
    assert arrival_times(50, 8.0, burstiness, seed=1) == times[:50]  # same seed, same schedule


def test_bad_load_is_refused():
    with pytest.raises(ValueError, match="request rate must be positive"):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError, match="burstiness must be a positive"):
        arrival_times(3, 1.0, burstiness=-1)


def test_lengths_stay_in_range_and_the_seed_fixes_the_prompts():
    spec = WorkloadSpec(200, input_len=100, input_range=0.2, output_len=50, output_range=0.5)
    workload = build_workload(spec, WordPrompts())
    turns = [c.turns[0] for c in workload.conversations]
    assert len(turns) == 200 and workload.prefix is None
    assert all(80 <= t.input_len <= 120 and len(t.text.split()) == t.input_len for t in turns)
    assert all(25 <= t.max_tokens <= 75 for t in turns)
    assert len({t.input_len for t in turns}) > 20  # really random
    assert build_workload(spec, WordPrompts()) == workload
    other = build_workload(WorkloadSpec(200, 100, 0.2, 50, 0.5, seed=1), WordPrompts())
    assert other != workload
    warmup = build_workload(spec, WordPrompts(), warmup=True, count=3)
    assert len(warmup.conversations) == 3 and warmup.conversations[0] != workload.conversations[0]


def test_fixed_lengths_without_range():
    workload = build_workload(WorkloadSpec(10, input_len=7, output_len=3), WordPrompts())
    assert {(c.turns[0].input_len, c.turns[0].max_tokens) for c in workload.conversations} == {
        (7, 3)
    }


def test_tokenizer_prompts_are_exact_ids_without_special_tokens():
    tokenizer = build_tokenizer()
    spec = WorkloadSpec(20, input_len=30, shared_prefix_len=12)
    workload = build_workload(spec, TokenPrompts(tokenizer))
    special = set(tokenizer.all_special_ids)
    prefix = workload.prefix
    assert prefix is not None and len(prefix.token_ids) == 12
    for conversation in workload.conversations:
        turn = conversation.turns[0]
        prompt = completion_prompt(prefix, turn)
        assert len(prompt) == 42 and prompt[:12] == prefix.token_ids
        assert not special & set(prompt)
        assert turn.text == tokenizer.decode(turn.token_ids)


def test_shared_prefix_of_words_and_chat_messages_of_a_conversation():
    spec = WorkloadSpec(6, input_len=5, shared_prefix_len=4, turns=3)
    workload = build_workload(spec, WordPrompts())
    assert len(workload.conversations) == 2 and workload.num_requests == 6
    first, second, third = workload.conversations[0].turns
    assert completion_prompt(workload.prefix, first) == f"{workload.prefix.text} {first.text}"
    messages = chat_messages(workload.prefix, [(first.text, "reply one")], second)
    assert messages == [
        {"role": "system", "content": workload.prefix.text},
        {"role": "user", "content": first.text},
        {"role": "assistant", "content": "reply one"},
        {"role": "user", "content": second.text},
    ]
    assert len(chat_messages(None, [("a", "b"), ("c", "d")], third)) == 5


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_requests=0), "--num-requests must be at least 1"),
        (dict(num_requests=10, turns=3), "must be a multiple of --turns"),
        (dict(num_requests=1, input_range=1.0), r"--input-range must be in \[0, 1\)"),
        (dict(num_requests=1, output_len=0), "--output-len must be at least 1"),
        (dict(num_requests=1, shared_prefix_len=-1), "--shared-prefix-len must be >= 0"),
    ],
)
def test_bad_workload_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        WorkloadSpec(**options)
