"""The streaming client against canned SSE replies, and the runner's schedule."""

import asyncio
import itertools
import json

import httpx
import pytest

from lightpd.controlplane.lightctl.bench.arrivals import arrival_times
from lightpd.controlplane.lightctl.bench.client import ClientConfig, StreamClient
from lightpd.controlplane.lightctl.bench.record import RequestRecord
from lightpd.controlplane.lightctl.bench.runner import BenchError, LoadSpec, Runner
from lightpd.controlplane.lightctl.bench.workload import WordPrompts, WorkloadSpec, build_workload


def sse(*chunks: dict | str) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def send(config: ClientConfig, reply: httpx.Response, prompt="hi", max_tokens=3):
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append({"url": str(request.url), **json.loads(request.content)})
        return reply

    async def go() -> RequestRecord:
        client = StreamClient(config, transport=httpx.MockTransport(handler))
        try:
            return await client.send(RequestRecord(0, prompt_tokens=99), prompt, max_tokens)
        finally:
            await client.aclose()

    return asyncio.run(go()), seen[0]


COMPLETIONS = ClientConfig("http://server/v1", "m", "completions", ignore_eos=True)
CHAT = ClientConfig("http://server", "m", "chat", api_key="k")


def test_completions_stream_counts_text_chunks_and_takes_usage():
    body = sse(
        {"choices": [{"index": 0, "text": "a", "finish_reason": None}], "usage": None},
        {"choices": [{"index": 0, "text": "", "finish_reason": None}], "usage": None},
        {"choices": [{"index": 0, "text": "bc", "finish_reason": "length"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
        "[DONE]",
    )
    record, request = send(COMPLETIONS, httpx.Response(200, content=body), [1, 2, 3], 3)
    assert request["url"] == "http://server/v1/completions"
    assert request["prompt"] == [1, 2, 3] and request["max_tokens"] == 3
    assert request["ignore_eos"] is True and request["stream_options"] == {"include_usage": True}
    assert record.ok and record.output_text == "abc"
    assert len(record.chunk_times_s) == 2  # the empty chunk carries no output
    assert record.ttft_s <= record.chunk_times_s[1] <= record.e2e_s
    assert (record.prompt_tokens, record.output_tokens, record.usage_reported) == (5, 3, True)


def test_chat_stream_skips_the_role_chunk_and_counts_chunks_without_usage():
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        "[DONE]",
    )
    messages = [{"role": "user", "content": "hi"}]
    record, request = send(CHAT, httpx.Response(200, content=body), messages, 7)
    assert request["url"] == "http://server/v1/chat/completions"
    assert request["messages"] == messages and request["max_completion_tokens"] == 7
    assert "ignore_eos" not in request
    assert record.ok and record.output_text == "Hello" and len(record.chunk_times_s) == 2
    # No usage from this server: output counted in chunks, the prompt as planned.
    assert (record.output_tokens, record.prompt_tokens, record.usage_reported) == (2, 99, False)


def test_errors_are_recorded_with_the_servers_message():
    refused = httpx.Response(400, json={"error": {"message": "max_tokens is too large: 9"}})
    record, _ = send(COMPLETIONS, refused)
    assert not record.ok and record.error == "HTTP 400: max_tokens is too large: 9"
    assert record.e2e_s is not None  # a failure ran until it failed: it counts in the duration
    in_stream = sse(
        {"choices": [{"index": 0, "text": "a"}]}, {"error": {"message": "generation failed: x"}}
    )
    record, _ = send(COMPLETIONS, httpx.Response(200, content=in_stream))
    assert not record.ok and "generation failed: x" in record.error
    assert record.e2e_s >= record.chunk_times_s[0]
    record, _ = send(COMPLETIONS, httpx.Response(200, content=sse("[DONE]")))
    assert record.error == "the response streamed no output" and record.e2e_s is not None


def test_a_final_chunk_without_text_still_marks_the_output():
    # One token that decodes to nothing (a special token): only the finish chunk comes.
    body = sse(
        {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
        "[DONE]",
    )
    record, _ = send(COMPLETIONS, httpx.Response(200, content=body))
    assert record.ok and record.output_tokens == 1 and len(record.chunk_times_s) == 1


class FakeClient:
    """Answers after a short wait; remembers prompts and the most requests in flight."""

    def __init__(self, endpoint: str = "chat", fail_index: int | None = None) -> None:
        self.config = ClientConfig("http://x", "m", endpoint)
        self.fail_index = fail_index
        self.prompts: dict[int, object] = {}
        self.in_flight = self.most_in_flight = 0

    async def send(self, record: RequestRecord, prompt, max_tokens: int) -> RequestRecord:
        self.prompts[record.index] = prompt
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if record.index == self.fail_index:
            record.error, record.e2e_s = "HTTP 500: boom", 0.01
            return record
        record.chunk_times_s, record.e2e_s = [0.005, 0.01], 0.01
        record.output_tokens, record.output_text = max_tokens, f"reply {record.index}"
        return record


def run(client: FakeClient, spec: WorkloadSpec, load: LoadSpec, warmup: int = 0):
    seen: list[RequestRecord] = []
    runner = Runner(client, load, seen.append)

    async def go():
        await runner.warm_up(build_workload(spec, WordPrompts(), warmup=True, count=warmup))
        return await runner.run(build_workload(spec, WordPrompts()))

    records = asyncio.run(go())
    ends = [r.finished_s for r in records if r.finished_s is not None]
    assert max(ends) <= runner.wall_s < max(ends) + 0.5  # the run's wall time
    return records, seen


def test_turns_carry_the_replies_received_and_concurrency_is_bounded():
    client = FakeClient()
    spec = WorkloadSpec(6, input_len=3, output_len=2, turns=3)
    records, seen = run(client, spec, LoadSpec(max_concurrency=1), warmup=2)
    assert [r.index for r in records] == list(range(6)) and len(seen) == 6  # no warm-ups
    assert [(r.conversation, r.turn) for r in records] == [
        (c, t) for c in (0, 1) for t in (0, 1, 2)
    ]
    assert client.most_in_flight == 1
    third_turn = client.prompts[2]  # conversation 0, turn 2
    assert [m["content"] for m in third_turn if m["role"] == "assistant"] == ["reply 0", "reply 1"]
    # Each later turn waits for the previous reply.
    for earlier, later in itertools.pairwise(records):
        if later.conversation == earlier.conversation:
            assert later.sent_s >= earlier.finished_s


def test_arrivals_follow_the_schedule():
    spec = WorkloadSpec(8, input_len=2, output_len=1)
    load = LoadSpec(request_rate=40.0, seed=3)
    records, _ = run(FakeClient("completions"), spec, load)
    planned = arrival_times(8, 40.0, 1.0, seed=3)
    assert [r.scheduled_s for r in records] == planned
    assert all(0 <= r.sent_s - r.scheduled_s < 0.05 for r in records)
    assert all(r.ok for r in records)


def test_a_failed_turn_skips_the_rest_of_its_conversation():
    records, _ = run(FakeClient(fail_index=3), WorkloadSpec(6, 2, turns=3), LoadSpec())
    assert [r.ok for r in records] == [True, True, True, False, False, False]
    assert records[4].error.startswith("not sent: an earlier turn")


def test_warmup_that_fails_entirely_stops_the_run():
    client = FakeClient(fail_index=0)
    with pytest.raises(BenchError, match="every warm-up request failed; the first: HTTP 500"):
        run(client, WorkloadSpec(2, 2), LoadSpec(), warmup=1)
