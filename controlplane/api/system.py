from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.deps import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> dict:
    await state.store.redis.ping()
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    await state.fleet.nodes()  # refresh the per-node gauges' snapshot
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
