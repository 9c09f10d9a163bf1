"""One benchmark run: warm-up, then the workload on its arrival schedule.

A conversation starts at its arrival time and sends its turns one after the
other, each as soon as the previous reply is complete, with that reply in the
next turn's messages. Max concurrency bounds the requests in flight (a turn
waiting for a slot is queued, and its TTFT starts once it is sent).
"""

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lightpd.controlplane.lightctl.bench.arrivals import arrival_times, check_load
from lightpd.controlplane.lightctl.bench.client import StreamClient
from lightpd.controlplane.lightctl.bench.record import RequestRecord
from lightpd.controlplane.lightctl.bench.workload import (
    Conversation,
    PlannedTurn,
    Workload,
    chat_messages,
    completion_prompt,
    planned_prompt_len,
)


class BenchError(RuntimeError):
    """The run cannot go on (e.g. every warm-up request failed); says why."""


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf  # conversations started per second
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_load(self.request_rate, self.burstiness)
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")


OnRecord = Callable[[RequestRecord], None]


class Runner:
    def __init__(self, client: StreamClient, load: LoadSpec, on_record: OnRecord) -> None:
        self.client = client
        self.load = load
        self.on_record = on_record
        self.chat = client.config.endpoint == "chat"
        self.wall_s = 0.0  # the last run's, from its start to the end of its last request

    async def warm_up(self, warmup: Workload) -> None:
        """Send the warm-up requests (concurrently, within max concurrency); fail
        early with the server's message if none of them succeeds."""
        if not warmup.conversations:
            return
        self.slots = asyncio.Semaphore(self.load.max_concurrency or len(warmup.conversations))
        self.start = time.perf_counter()
        records = await asyncio.gather(
            *(
                self._send(warmup, c.index, c.index, 0, c.turns[0], [], 0.0, report=False)
                for c in warmup.conversations
            )
        )
        if not any(r.ok for r in records):
            raise BenchError(f"every warm-up request failed; the first: {records[0].error}")

    async def run(self, workload: Workload) -> list[RequestRecord]:
        """Send ``workload`` on the load's schedule; one record per planned request."""
        conversations = workload.conversations
        arrivals = arrival_times(
            len(conversations), self.load.request_rate, self.load.burstiness, self.load.seed
        )
        self.slots = asyncio.Semaphore(self.load.max_concurrency or workload.num_requests)
        self.start = time.perf_counter()
        per_conversation = await asyncio.gather(
            *(
                self._converse(workload, c, at)
                for c, at in zip(conversations, arrivals, strict=True)
            )
        )
        self.wall_s = self._now()
        return sorted((r for rs in per_conversation for r in rs), key=lambda r: r.index)

    async def _converse(
        self, workload: Workload, conversation: Conversation, arrival_s: float
    ) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, arrival_s - self._now()))
        history: list[tuple[str, str]] = []
        records: list[RequestRecord] = []
        scheduled = arrival_s
        for k, turn in enumerate(conversation.turns):
            index = conversation.index * len(conversation.turns) + k
            if records and not records[-1].ok:
                skipped = self._record(workload, index, conversation.index, k, turn, scheduled)
                skipped.error = "not sent: an earlier turn of its conversation failed"
                records.append(skipped)
                self.on_record(skipped)
                continue
            record = await self._send(
                workload, conversation.index, index, k, turn, history, scheduled
            )
            records.append(record)
            history.append((turn.text, record.output_text))
            scheduled = self._now()
        return records

    async def _send(
        self,
        workload: Workload,
        conversation: int,
        index: int,
        turn_index: int,
        turn: PlannedTurn,
        history: list[tuple[str, str]],
        scheduled_s: float,
        report: bool = True,
    ) -> RequestRecord:
        record = self._record(workload, index, conversation, turn_index, turn, scheduled_s)
        if self.chat:
            prompt = chat_messages(workload.prefix, history, turn)
        else:
            prompt = completion_prompt(workload.prefix, turn)
        async with self.slots:
            record.sent_s = self._now()
            await self.client.send(record, prompt, turn.max_tokens)
        if report:
            self.on_record(record)
        return record

    def _record(
        self,
        workload: Workload,
        index: int,
        conversation: int,
        turn_index: int,
        turn: PlannedTurn,
        scheduled_s: float,
    ) -> RequestRecord:
        planned = planned_prompt_len(workload.prefix, turn)
        return RequestRecord(
            index=index,
            conversation=conversation,
            turn=turn_index,
            scheduled_s=scheduled_s,
            sent_s=scheduled_s,
            prompt_tokens=planned,
            planned_prompt_tokens=planned,
            planned_output_tokens=turn.max_tokens,
        )

    def _now(self) -> float:
        return time.perf_counter() - self.start
