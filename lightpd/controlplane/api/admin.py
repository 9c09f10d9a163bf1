"""The admin API: nodes, requests and cluster figures, behind the admin token."""

import secrets

from fastapi import APIRouter, Query

from lightpd.controlplane.deps import AdminToken, State
from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.fleet_schemas import NodePublic, RequestPublic
from lightpd.controlplane.timeseries import KEEP_S

router = APIRouter(prefix="/admin", dependencies=[AdminToken])
MAX_WINDOW_S = KEEP_S - 60


@router.get("/nodes")
async def list_nodes(state: State) -> list[NodePublic]:
    return await state.store.nodes()


@router.post("/nodes/{node_id}/drain")
async def drain_node(node_id: str, state: State, migrate: bool = False) -> dict:
    """No new requests go to the node; with ``migrate`` its running requests also
    move to other decode nodes now (every control plane moves its own)."""
    status = "migrating" if migrate else "draining"
    if not await state.store.set_status(node_id, status):
        raise OpenAIError(404, f"no node {node_id}", code="node_not_found")
    return {"node_id": node_id, "status": status}


@router.post("/nodes/{node_id}/undrain")
async def undrain_node(node_id: str, state: State) -> dict:
    """A draining or migrating node takes new requests again ("ready"); requests
    already moved elsewhere stay there. A dead node is refused: it becomes ready
    by registering again."""
    node = next((n for n in await state.store.nodes() if n.node_id == node_id), None)
    if node is not None and node.status == "dead":
        raise OpenAIError(
            409, f"node {node_id} is dead: it is ready again once it registers", code="node_dead"
        )
    if node is None or not await state.store.set_status(node_id, "ready"):
        raise OpenAIError(404, f"no node {node_id}", code="node_not_found")
    return {"node_id": node_id, "status": "ready"}


@router.delete("/nodes/{node_id}")
async def remove_node(node_id: str, state: State) -> dict:
    if not await state.store.remove(node_id):
        raise OpenAIError(404, f"no node {node_id}", code="node_not_found")
    return {"node_id": node_id, "status": "removed"}


@router.post("/api-keys", status_code=201)
async def create_api_key(state: State) -> dict:
    """A new key for the OpenAI API, kept in Redis as a salted hash (so every control
    plane knows it, and nothing on disk gives it away): this reply is its only copy."""
    key = f"sk-{secrets.token_urlsafe(24)}"
    key_id = await state.store.add_api_key(key)
    return {"api_key": key, "id": key_id}


@router.get("/api-keys")
async def list_api_keys(state: State) -> list[dict]:
    """The keys made here: id, prefix and creation time (never a key)."""
    return await state.store.api_keys()


@router.delete("/api-keys/{key}")
async def delete_api_key(key: str, state: State) -> dict:
    """Forget a key, given whole or by its id."""
    if not await state.store.remove_api_key(key):
        raise OpenAIError(404, "no such API key", code="api_key_not_found")
    return {"deleted": True}


@router.get("/requests")
async def list_requests(
    state: State, limit: int = Query(100, ge=1, le=1000), running: bool = False
) -> list[RequestPublic]:
    """The latest requests first, with their timelines; ``running``: those not ended."""
    return await state.store.requests(limit, running_only=running)


@router.get("/stats")
async def cluster_stats(state: State) -> dict:
    return _stats(state, await state.store.nodes(), await state.store.num_running())


@router.get("/timeseries")
async def timeseries(
    state: State,
    window: int = Query(300, ge=1, le=MAX_WINDOW_S, description="seconds of history"),
    step: int = Query(1, ge=1, le=60, description="seconds per point"),
) -> dict:
    """Per-second figures of the whole cluster, as columns (one value per point):
    ``t`` (Unix second the point ends), finished/failed/started requests and generated
    tokens per second, TTFT and TPOT p50/p99 in seconds, KV use per role (0..1)."""
    return await state.timeseries.read(window, step)


@router.get("/overview")
async def overview(
    state: State,
    window: int = Query(300, ge=1, le=MAX_WINDOW_S),
    step: int = Query(1, ge=1, le=60),
    requests: int = Query(50, ge=0, le=500, description="recent requests to include"),
) -> dict:
    """Everything the dashboard shows, in one reply (it polls this once a second): the
    nodes, cluster figures, running and recent requests, and the time series."""
    nodes = await state.store.nodes()
    running = await state.store.requests(requests, running_only=True) if requests else []
    recent = await state.store.requests(requests) if requests else []
    seen = {r.request_id for r in running}
    listed = (running + [r for r in recent if r.request_id not in seen])[:requests]
    return {
        "now": await state.store.now(),
        "node_ttl_s": state.settings.node_ttl_s,
        "nodes": nodes,
        "stats": _stats(state, nodes, await state.store.num_running()),
        "requests": listed,
        "timeseries": await state.timeseries.read(window, step),
    }


def _stats(state: State, nodes: list[NodePublic], num_running: int) -> dict:
    """Figures per role; a dead node counts as a node but adds no slots or load."""
    by_role: dict[str, dict] = {}
    for node in nodes:
        role = by_role.setdefault(
            node.role,
            {
                "nodes": 0,
                "ready": 0,
                "draining": 0,
                "migrating": 0,
                "dead": 0,
                "slots": 0,
                "free_slots": 0,
                "reserved_slots": 0,
                "running": 0,
                "queued": 0,
                "tokens_per_s": 0.0,
            },
        )
        role["nodes"] += 1
        role[node.status] += 1
        if node.status == "dead":
            continue
        role["slots"] += node.num_slots
        if node.stats:
            role["free_slots"] += node.stats.num_free_slots
            role["reserved_slots"] += node.stats.num_reserved_slots
            role["running"] += node.stats.num_running
            role["queued"] += node.stats.num_queued
            role["tokens_per_s"] += node.stats.tokens_per_s
    return {"model": state.settings.model_name, "roles": by_role, "running_requests": num_running}
