import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from controlplane.deps import State

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


@router.get("/metrics")
async def metrics(state: State) -> Response:
    await state.fleet.nodes()  # refresh the per-node gauges' snapshot
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
