"""Runs the choices of one OpenAI request through the dispatcher, as text deltas."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, nullcontext
from dataclasses import dataclass, field

from lightpd.common.tokenizer import Tokenizer
from lightpd.common.wire.messages import TokenLogprobs
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.dispatcher import Dispatcher
from lightpd.controlplane.openai.text_stream import TextStream
from lightpd.controlplane.shutdown import EndedByShutdown, Shutdown


@dataclass
class Delta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens a node's prefix cache held (first token)


@dataclass
class Choice:
    """One generation: a prompt, its sampling, and where its deltas go."""

    index: int
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    admitted: asyncio.Event = field(default_factory=asyncio.Event)  # holds decode slots


async def run_choice(
    dispatcher: Dispatcher, tokenizer: Tokenizer, choice: Choice
) -> AsyncIterator[Delta]:
    """Deltas of one choice, the last with a finish_reason (stop, length, abort or error).
    Leaving early (a stop string, a disconnect) aborts the request on its nodes."""
    text = TextStream(tokenizer, choice.stops)
    stopped_here = asyncio.Event()
    events = dispatcher.generate(
        choice.request_id, choice.prompt, choice.params, choice.admitted, stopped_here
    )
    async with aclosing(events):
        async for event in events:
            if event.finish_reason == "error":
                yield Delta(choice.index, text.flush(), finish_reason="error", error=event.error)
                return
            delta = Delta(
                choice.index,
                text.add(event.token_ids),
                event.token_ids,
                event.logprobs or [],
                num_cached_tokens=event.num_cached_tokens,
            )
            if text.stopped:
                delta.finish_reason = "stop"
                stopped_here.set()  # complete: finished, not aborted
                yield delta
                return
            if event.finish_reason is not None:
                delta.text += text.flush()
                delta.finish_reason = event.finish_reason
            yield delta


async def merge(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    choices: list[Choice],
    shutdown: Shutdown | None = None,
) -> AsyncIterator[Delta]:
    """Deltas of all choices as they come; cancelling the consumer cancels every choice.
    When ``shutdown``'s grace is over, the deltas end with EndedByShutdown at once,
    and the shutdown waits for the choices' aborts."""
    queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async with aclosing(run_choice(dispatcher, tokenizer, choice)) as deltas:
                async for delta in deltas:
                    if asyncio.current_task().cancelling():
                        # Python 3.11's wait_for returns an event that came with the
                        # cancel instead of raising it: the choice must still stop.
                        raise asyncio.CancelledError
                    await queue.put(delta)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(choices)
    end_on_shutdown = (
        nullcontext()
        if shutdown is None
        else shutdown.ending(lambda: queue.put_nowait(EndedByShutdown()))
    )
    with end_on_shutdown:
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if shutdown is not None and shutdown.ended:
                shutdown.clean_up_later(tasks)
            else:
                await asyncio.gather(*tasks, return_exceptions=True)


class StartedStream:
    """The deltas of ``merge`` once a caller has waited on them for a while (until
    its choices were admitted): those that came meanwhile, the one being awaited,
    then the rest."""

    def __init__(self, deltas: AsyncIterator[Delta]) -> None:
        self.deltas = deltas
        self.early: list[Delta] = []
        self.pending: asyncio.Future | None = asyncio.ensure_future(anext(deltas))

    async def __aiter__(self) -> AsyncIterator[Delta]:
        for delta in self.early:
            yield delta
        if self.pending is not None:
            try:
                yield await self.pending
            except StopAsyncIteration:
                return
        async for delta in self.deltas:
            yield delta

    async def aclose(self) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()
            await asyncio.gather(self.pending, return_exceptions=True)
        await self.deltas.aclose()
