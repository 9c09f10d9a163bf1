"""``python -m lightpd.controlplane``: serve the control plane with uvicorn (LIGHTPD_* settings).

SIGTERM or SIGINT begins the app's shutdown (``controlplane/shutdown.py``): new API
requests are refused, those running get ``LIGHTPD_SHUTDOWN_GRACE_S`` to finish and
the rest are ended cleanly; only then does uvicorn stop, and the process exits 0.
A second SIGINT (Ctrl-C again) stops at once, cutting what still runs.
"""

import asyncio
import math
import signal
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from lightpd.controlplane.app import create_app
from lightpd.controlplane.http_guard import ConnectionLimits, guarded_protocol
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.shutdown import END_WAIT_S, Shutdown

STARTUP_FAILURE = 3  # uvicorn's exit status when the app did not start
UVICORN_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on a signal lets the app's shutdown run first and
    stops (closing its port, then the connections) once that is done."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self.app_shutdown = shutdown  # (uvicorn's own is the method shutdown)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it runs in the main thread between two steps of the event
        # loop, so the drain is handed to the loop. Unlike uvicorn's, it does not have
        # the signal raised again after the server stops: a clean stop exits 0.
        if self._loop is None:  # not serving yet
            self.should_exit = True
        elif not self._signalled:
            self._signalled = True
            self._loop.call_soon_threadsafe(self._start_drain)
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        self._drain = asyncio.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self.app_shutdown.drain()
        finally:
            self.should_exit = True


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: bad control plane settings (LIGHTPD_*):\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    app = create_app(settings)
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        max_per_client=settings.max_connections_per_client,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        log_level="info",
        access_log=False,
        # uvicorn stops only after the app's shutdown, so this bounds what it then waits
        # for (a client that stopped reading); it is never shorter than that shutdown.
        timeout_graceful_shutdown=math.ceil(
            settings.shutdown_grace_s + END_WAIT_S + UVICORN_MARGIN_S
        ),
    )
    server = DrainingServer(config, app.state.shutdown)
    server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
