"""The control plane's FastAPI app."""

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import redis.asyncio as redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightpd.common.tokenizer import load_tokenizer
from lightpd.common.wire.identity import model_fingerprint
from lightpd.controlplane.api import admin, dashboard, nodes, system
from lightpd.controlplane.api.dashboard import STATIC_DIR
from lightpd.controlplane.deps import AppState
from lightpd.controlplane.dispatcher import Dispatcher
from lightpd.controlplane.errors import (
    error_response,
    install_error_handlers,
    redis_unavailable,
    stopping_error,
)
from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.instance_lease import InstanceLease
from lightpd.controlplane.metrics import Metrics
from lightpd.controlplane.node_client import NodeClient

# The one place the core imports the OpenAI room: the app mounts its routes. Nothing
# else at the top imports lightpd.controlplane.openai or lightpd.controlplane.lightctl.
from lightpd.controlplane.openai import routes as openai_routes
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.shutdown import Shutdown
from lightpd.controlplane.store import PENDING_BATCH, REDIS_DOWN, Store
from lightpd.controlplane.timeseries import Timeseries

logger = logging.getLogger(__name__)
REDIS_CONNECT_TIMEOUT_S = 2.0  # an unreachable host fails a call in this, not minutes
REDIS_REPLY_TIMEOUT_S = 10.0
LAST_WRITES_S = 2.0  # at exit, for request states that wait for Redis
EXIT_S = 8.0  # the lifespan's whole end, LAST_WRITES_S included
API_PREFIX = "/v1"


class RequireJson:
    """Request bodies are JSON; anything else is refused before parsing (415).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would relay every
    server-sent event of a stream through an extra task and queue, and wrap the
    ``receive`` that streaming responses listen on for the client's disconnect.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            headers = Headers(scope=scope)
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            content_type = headers.get("content-type", "")
            if has_body and content_type.split(";")[0].strip().lower() != "application/json":
                response = error_response(
                    415, f"Content-Type must be application/json, got {content_type or 'none'}"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """Request bodies over ``max_bytes`` are refused (413) before they are read whole,
    and bodies not whole within ``timeout_s`` of the request's start get a 408.

    A Content-Length over the limit is answered before any of the body is read. A
    body without one (chunked) is counted as it arrives: the ``receive`` that would
    pass the limit, or wait past the deadline, raises instead of handing the bytes
    on, and the route's exception handling answers (and closes the connection on a
    408: the rest of that body is never read). Once the body is whole, ``receive``
    (a stream's wait for the client to leave) has no deadline. A plain ASGI
    middleware, for RequireJson's reasons.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.message = f"the request body is larger than the limit of {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, self.message)(scope, receive, send)
            return
        num_received = 0
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def receive_within_limit() -> Message:
            nonlocal num_received, body_done
            if body_done:
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise StarletteHTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_bytes:
                    raise StarletteHTTPException(413, self.message)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, receive_within_limit, send)


class RefuseWhenStopping:
    """Requests to the OpenAI API are counted while they run, and refused (503) once
    the control plane is shutting down; everything else (health, admin, node
    heartbeats) is served as before. A plain ASGI middleware, for RequireJson's
    reasons."""

    def __init__(self, app: ASGIApp, shutdown: Shutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.shutdown.stopping:
            await stopping_error().response()(scope, receive, send)
            return
        with self.shutdown.running():
            await self.app(scope, receive, send)


def redis_client(settings: Settings) -> redis.Redis:
    """A client whose callers wait for a free connection rather than fail: a burst of
    requests larger than the pool queues for Redis instead of erroring. A call that
    finds its pooled connection closed (Redis restarted since) is sent again once on
    a new one, so a restart costs no call its answer."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_wait_s,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_REPLY_TIMEOUT_S,
        retry=Retry(NoBackoff(), retries=1),
    )
    return redis.Redis(connection_pool=pool)


def install_redis_error_handler(app: FastAPI) -> None:
    """A request that needs Redis while it is down (or refusing) gets a JSON 503 with
    Retry-After; the store learns of the outage, so it serves from memory meanwhile."""

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        request.app.state.lightpd.store.outage.failed(exc)
        if not isinstance(exc, REDIS_DOWN):
            logger.error("Redis refused a call: %r", exc)
        return redis_unavailable()


async def _last_request_writes(store: Store, timeout_s: float) -> None:
    """At exit: stop the store's retries of the request states Redis missed, after one
    last try of at most ``timeout_s``; what it does not take is lost, with a log line.
    (It reaches into the store's writer: a ``Store.close`` would be its place.)"""
    writes = store._request_writes

    async def write_all() -> None:
        while batch := writes._take(PENDING_BATCH):
            if not await writes._write(batch):
                return

    await _cancelled(writes._retry)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(write_all(), timeout_s)
    await _cancelled(writes._retry)  # a write that failed queued its batch, and a retry
    if writes.pending:
        logger.warning(
            "%d request states never reached Redis; their records stay as last written",
            len(writes.pending),
        )


async def _cancelled(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _following_caches(store: Store, client: NodeClient) -> Callable[[], Awaitable[list]]:
    """``store.nodes``, which also subscribes to the prefix-cache events of every node
    it lists (once; again after a gap), and forgets those of nodes removed. The
    time-series flusher reads the registry each second with it, so this control
    plane follows every node from when it appears, not from its first request
    there, and routes as the others do."""

    async def nodes() -> list:
        listed = await store.nodes()
        client.follow_fleet(listed)
        return listed

    return nodes


async def _exit(
    flusher: asyncio.Task | None,
    lease: asyncio.Task | None,
    store: Store,
    node_client: NodeClient,
    client: redis.Redis,
) -> None:
    """The lifespan's end: the last time-series flush, the request states Redis
    missed, then the instance lease (once its requests' ends are written, so that
    nobody fails them), the nodes' sockets and Redis."""
    await _cancelled(flusher)
    await _last_request_writes(store, LAST_WRITES_S)
    await _cancelled(lease)
    await node_client.close()
    await client.aclose()


async def _exit_within(timeout_s: float, exit: Awaitable[None]) -> None:
    """Run the lifespan's end for at most ``timeout_s``: a step that waits longer is
    cancelled, after the tasks still running are logged with where they wait, so
    that a stop never hangs and says why it was slow."""
    task = asyncio.ensure_future(exit)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        return task.result()
    stacks = io.StringIO()
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            other.print_stack(limit=12, file=stacks)
    logger.error(
        "the control plane's exit took over %g s; cancelled. Tasks:\n%s",
        timeout_s,
        stacks.getvalue(),
    )
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client(settings)
        store = Store(client, settings.node_ttl_s, settings.node_stall_s)
        with contextlib.suppress(*REDIS_DOWN):  # Redis down: the next start moves them
            if moved := await store.hash_plain_api_keys():
                logger.warning("moved %d API keys kept in the clear to salted hashes", moved)
        fingerprint = model_fingerprint(settings.model)
        fleet = Fleet(store, fingerprint, balance_tokens=settings.cache_balance_tokens)
        metrics = Metrics(fleet.cached_nodes, settings.model_name)
        node_client = NodeClient(settings.cluster_token)
        flusher = lease = None
        try:
            # The flusher reads the registry itself (routing's cache keeps its own
            # timing), and so keeps this control plane subscribed to every node.
            nodes = store.nodes
            if settings.cache_aware_routing:
                nodes = _following_caches(store, node_client)
            timeseries = Timeseries(client, nodes)
            app.state.lightpd = AppState(
                settings=settings,
                store=store,
                fleet=fleet,
                client=node_client,
                dispatcher=Dispatcher(settings, fleet, node_client, store, metrics, timeseries),
                metrics=metrics,
                timeseries=timeseries,
                tokenizer=load_tokenizer(settings.model),
                model_fingerprint=fingerprint,
            )
            flusher = asyncio.create_task(timeseries.run())
            lease = asyncio.create_task(InstanceLease(client, store).run())
            yield
        finally:
            await _exit_within(EXIT_S, _exit(flusher, lease, store, node_client, client))

    docs = {} if settings.api_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="lightpd", lifespan=lifespan, **docs)
    app.state.shutdown = Shutdown(settings.shutdown_grace_s)  # begun by __main__'s server
    app.add_middleware(RequireJson)
    app.add_middleware(
        LimitBody, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(RefuseWhenStopping, shutdown=app.state.shutdown)  # outermost: runs first
    install_error_handlers(app)
    install_redis_error_handler(app)
    for module in (openai_routes, admin, nodes, system, dashboard):
        app.include_router(module.router)
    app.include_router(openai_routes.tokens_router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    return app
