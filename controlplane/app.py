"""The control plane's FastAPI app."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis
from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

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


class RequireJson(BaseHTTPMiddleware):
    """Request bodies are JSON; anything else is refused before parsing (415)."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        has_body = request.headers.get("content-length", "0") != "0" or (
            "transfer-encoding" in request.headers
        )
        if request.method in ("POST", "PUT") and has_body:
            content_type = request.headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != "application/json":
                return error_response(
                    415, f"Content-Type must be application/json, got {content_type or 'none'}"
                )
        return await call_next(request)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis.Redis.from_url(settings.redis_url)
        store = Store(client, settings.node_ttl_s)
        fingerprint = model_fingerprint(settings.model)
        fleet = Fleet(store, fingerprint)
        metrics = Metrics(fleet.cached_nodes)
        timeseries = Timeseries(client, fleet.nodes)
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
