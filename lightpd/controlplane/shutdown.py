"""A control plane's stop on SIGTERM or SIGINT, cutting no stream.

Left to itself, uvicorn stops listening at once and cancels whatever still runs
after its timeout, which cuts streams, some mid-line. Instead, ``drain``:

1. refuses new requests to the OpenAI API with a JSON 503 (Retry-After, and the
   connection closes) while the port stays open; /health says "stopping", and
   the admin API and node heartbeats are served as before;
2. gives the requests running ``grace_s`` to finish;
3. ends those still running: a stream with an error event and ``data: [DONE]``,
   a whole response with a JSON 503; either way the request is aborted on its
   nodes, which free its KV (the answers go out first: a node or Redis that is
   slow to take an abort or a state delays the exit, not them);

and only then is uvicorn told to stop (``controlplane/__main__.py``), with
nothing left for it to cancel. Nothing shared in Redis is touched, so the other
control planes of the fleet serve on.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)
END_WAIT_S = 5.0  # for ended requests to send their last event
CLEANUP_WAIT_S = 15.0  # then for their aborts and states (a dead node's abort takes 5 s)
POLL_S = 0.05


class EndedByShutdown(Exception):
    """The request was still running at the end of the shutdown grace."""


class Shutdown:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.stopping = False  # new requests are refused
        self.ended = False  # the grace is over: what still runs is ended
        self.num_running = 0
        self._on_end: set[Callable[[], None]] = set()
        self._cleanups: set[asyncio.Task] = set()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a request as running for the block (its whole response)."""
        self.num_running += 1
        try:
            yield
        finally:
            self.num_running -= 1

    @contextmanager
    def ending(self, end: Callable[[], None]) -> Iterator[None]:
        """For the block, call ``end`` (once, on the event loop) when the grace is
        over; at once if it is over already."""
        if self.ended:
            end()
            yield
            return
        self._on_end.add(end)
        try:
            yield
        finally:
            self._on_end.discard(end)

    def clean_up_later(self, tasks: list[asyncio.Task]) -> None:
        """Tasks of ended requests (cancelled: aborting them on their nodes, recording
        their states) that ``drain`` waits for before returning, so that their
        requests' answers need not."""
        self._cleanups.update(tasks)

    async def drain(self) -> None:
        """Refuse new requests, wait for those running up to the grace, end the rest,
        and return once they have answered and been aborted on their nodes (or at
        most ``END_WAIT_S`` and ``CLEANUP_WAIT_S`` after the grace)."""
        self.stopping = True
        logger.warning(
            "shutting down: new requests are refused; %d running get %g s to finish",
            self.num_running,
            self.grace_s,
        )
        if await self._until_idle(self.grace_s):
            return
        logger.warning(
            "%d requests still run after the grace of %g s: ending them",
            self.num_running,
            self.grace_s,
        )
        self.ended = True
        for end in list(self._on_end):
            end()
        if not await self._until_idle(END_WAIT_S):
            logger.warning(
                "%d requests did not end within %g s (clients not reading?)",
                self.num_running,
                END_WAIT_S,
            )
        if self._cleanups:
            _, pending = await asyncio.wait(self._cleanups, timeout=CLEANUP_WAIT_S)
            if pending:
                logger.warning(
                    "%d ended requests were not aborted within %g s", len(pending), CLEANUP_WAIT_S
                )

    async def _until_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.num_running:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True
