"""The control plane's FastAPI app."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from common.kv_transfer import model_fingerprint
from common.node_client import NodeClient
from common.tokenizer import load_tokenizer
from controlplane.api import admin, dashboard, nodes, openai, system
from controlplane.api.dashboard import STATIC_DIR
from controlplane.api.errors import error_response, install_error_handlers
from controlplane.deps import AppState
from controlplane.dispatcher import Dispatcher
from controlplane.fleet import Fleet
from controlplane.metrics import Metrics
from controlplane.settings import Settings
from controlplane.store import Store
from controlplane.timeseries import Timeseries


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


def redis_client(settings: Settings) -> redis.Redis:
    """A client whose callers wait for a free connection rather than fail: a burst of
    requests larger than the pool queues for Redis instead of erroring."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_wait_s,
    )
    return redis.Redis(connection_pool=pool)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client(settings)
        store = Store(client, settings.node_ttl_s)
        fingerprint = model_fingerprint(settings.model)
        fleet = Fleet(store, fingerprint)
        metrics = Metrics(fleet.cached_nodes)
        # The flusher reads the registry itself: routing's cache keeps its own timing.
        timeseries = Timeseries(client, store.nodes)
        async with NodeClient(settings.host) as node_client:
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
            try:
                yield
            finally:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
        await client.aclose()

    app = FastAPI(title="lightpd", lifespan=lifespan)
    app.add_middleware(RequireJson)
    install_error_handlers(app)
    for module in (openai, admin, nodes, system, dashboard):
        app.include_router(module.router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    return app
