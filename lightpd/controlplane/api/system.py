import asyncio
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from lightpd.controlplane.deps import State
from lightpd.controlplane.errors import NO_NODE_RETRY_AFTER_S, error_response

router = APIRouter()
HEALTH_REDIS_WAIT_S = 1.0


@router.get("/health")
async def health(state: State, request: Request) -> dict:
    """Liveness: 200 while this process serves, Redis or not, since it keeps serving
    from memory while Redis is down (restarting it would lose that); then the status
    is "degraded" and says so, with the request states that wait for Redis. While it
    shuts down the status is "stopping": it takes no new API requests."""
    shutdown = request.app.state.shutdown
    if shutdown.stopping:
        return {"status": "stopping", "running_requests": shutdown.num_running}
    try:
        await asyncio.wait_for(state.store.redis.ping(), HEALTH_REDIS_WAIT_S)
    except (RedisError, OSError, TimeoutError) as exc:
        state.store.outage.failed(exc)
        return {
            "status": "degraded",
            "redis": "unreachable",
            "pending_request_states": state.store.num_pending_requests,
        }
    state.store.outage.recovered()
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State, request: Request) -> JSONResponse:
    """Readiness: 200 only while a request can be served (a ready decode node, which
    prefills itself when no prefill node can take the prompt) and this process is
    not shutting down; else a 503 with Retry-After, for load balancers and probes."""
    counts = await state.fleet.ready_counts()
    if request.app.state.shutdown.stopping:
        return error_response(503, "this control plane is shutting down", code="stopping")
    if not counts["decode"]:
        headers = {"Retry-After": str(NO_NODE_RETRY_AFTER_S)}
        message = "no decode node is ready yet"
        return error_response(503, message, code="not_ready", headers=headers)
    nodes = {f"{role}_nodes": count for role, count in counts.items()}
    return JSONResponse({"status": "ready", "model": state.settings.model_name, **nodes})


@router.get("/version")
async def server_version() -> dict:
    try:
        return {"version": version("lightpd")}
    except PackageNotFoundError:  # run from a checkout that was never installed
        return {"version": "unknown"}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    await state.fleet.nodes()  # refresh the per-node gauges' snapshot
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
