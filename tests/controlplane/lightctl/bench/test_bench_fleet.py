"""`lightctl bench` as a user runs it, against a real fleet of CPU processes."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.e2e.fleet import API_KEY, LocalFleet

LIGHTCTL = os.path.join(os.path.dirname(sys.executable), "lightctl")


@pytest.fixture(scope="module")
def fleet(tiny_model):
    fleet = LocalFleet(tiny_model("llama")).start()
    yield fleet
    fleet.stop()


def bench(fleet: LocalFleet, *args: str) -> subprocess.CompletedProcess:
    command = [LIGHTCTL, "bench", "--base-url", f"{fleet.url}/v1", "--api-key", API_KEY, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_random_prompts_at_once_and_at_a_rate_then_compared(fleet, tmp_path):
    common = ["--num-requests", "12", "--output-len", "8", "--ignore-eos", "--tokenizer"]
    common += [fleet.model, "--input-len", "24", "--input-range", "0.5", "--plots", str(tmp_path)]
    at_once = bench(
        fleet, *common, "--warmup", "2", "--slo", "ttft=60000,tpot=60000", "--label", "burst",
        "--out", str(tmp_path / "burst.json"),
    )  # fmt: skip
    assert at_once.returncode == 0, at_once.stderr
    assert "TTFT p99 (ms)" in at_once.stdout and "12/12 done" in at_once.stdout
    paced = bench(
        fleet, *common, "--request-rate", "20", "--max-concurrency", "4", "--label", "paced",
        "--out", str(tmp_path / "paced.json"),
    )  # fmt: skip
    assert paced.returncode == 0, paced.stderr

    for name, rate in (("burst", "inf"), ("paced", 20.0)):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        summary, requests = result["summary"], result["requests"]
        assert result["config"]["request_rate"] == rate
        assert (summary["num_completed"], summary["num_errors"]) == (12, 0)
        assert len(requests) == 12
        for r in requests:
            # --ignore-eos: exactly the tokens asked for; token-id prompts: exact lengths.
            assert r["output_tokens"] == r["planned_output_tokens"] == 8
            assert r["prompt_tokens"] == r["planned_prompt_tokens"]
            assert 12 <= r["prompt_tokens"] <= 36
            assert 0 < r["chunk_times_s"][0] < r["e2e_s"]
        assert summary["total_output_tokens"] == 96
        assert summary["ttft_ms"]["p50"] < summary["e2e_ms"]["p50"]
        for plot in ("latency_cdf", "throughput"):
            assert (tmp_path / f"{name}_{plot}.png").read_bytes()[:4] == b"\x89PNG"
    burst = json.loads((tmp_path / "burst.json").read_text())
    assert burst["summary"]["num_good"] == 12  # generous SLO: all requests are good
    paced_requests = json.loads((tmp_path / "paced.json").read_text())["requests"]
    assert max(r["scheduled_s"] for r in paced_requests) > 0.1  # spread out, not all at once

    compared = bench(fleet, "--compare", str(tmp_path / "burst.json"), str(tmp_path / "paced.json"))
    assert compared.returncode == 0, compared.stderr
    assert "A: burst" in compared.stdout and "B: paced" in compared.stdout
    assert "TPOT p90 (ms)" in compared.stdout


def test_multi_turn_chat_replays_the_replies(fleet, tmp_path):
    out = tmp_path / "chat.json"
    run = bench(
        fleet, "--endpoint", "chat", "--num-requests", "9", "--turns", "3", "--input-len", "6",
        "--output-len", "5", "--ignore-eos", "--shared-prefix-len", "4", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["summary"]["num_errors"] == 0
    requests = result["requests"]
    for conversation in range(3):
        turns = [r for r in requests if r["conversation"] == conversation]
        assert [r["turn"] for r in turns] == [0, 1, 2]
        assert all(r["output_tokens"] == 5 for r in turns)
        for earlier, later in itertools.pairwise(turns):
            # The next turn holds the whole previous one: its prompt, reply and a new message.
            assert later["prompt_tokens"] > earlier["prompt_tokens"] + 5
            assert later["sent_s"] >= earlier["sent_s"] + earlier["e2e_s"]


def test_bad_options_are_refused_with_a_reason(fleet, tmp_path):
    run = bench(fleet, "--turns", "2", "--num-requests", "4")
    assert run.returncode == 2 and "use --endpoint chat" in run.stderr
    run = bench(fleet, "--slo", "ttft=fast")
    assert run.returncode == 2 and "is not a number of ms" in run.stderr
    run = bench(fleet, "--model", "nope", "--num-requests", "1", "--warmup", "1")
    assert run.returncode == 2 and "every warm-up request failed" in run.stderr
    assert "does not exist" in run.stderr
    (tmp_path / "x.json").write_text("{}")
    run = bench(fleet, "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json"))
    assert run.returncode == 2 and "is not a `lightctl bench` result" in run.stderr
