"""The admin API: nodes, requests and cluster figures, behind the admin token."""

import secrets

from fastapi import APIRouter, Query

from controlplane.api.errors import OpenAIError
from controlplane.deps import AdminToken, State
from controlplane.schemas import NodePublic

router = APIRouter(prefix="/admin", dependencies=[AdminToken])


@router.get("/nodes")
async def list_nodes(state: State) -> list[NodePublic]:
    return await state.store.nodes()


@router.post("/nodes/{node_id}/drain")
async def drain_node(node_id: str, state: State) -> dict:
    if not await state.store.set_status(node_id, "draining"):
        raise OpenAIError(404, f"no node {node_id}", code="node_not_found")
    return {"node_id": node_id, "status": "draining"}


@router.delete("/nodes/{node_id}")
async def remove_node(node_id: str, state: State) -> dict:
    if not await state.store.remove(node_id):
        raise OpenAIError(404, f"no node {node_id}", code="node_not_found")
    return {"node_id": node_id, "status": "removed"}


@router.post("/api-keys", status_code=201)
async def create_api_key(state: State) -> dict:
    """A new key for the OpenAI API, kept in Redis (so every control plane knows it)."""
    key = f"sk-{secrets.token_urlsafe(24)}"
    await state.store.add_api_key(key)
    return {"api_key": key}


@router.delete("/api-keys/{key}")
async def delete_api_key(key: str, state: State) -> dict:
    if not await state.store.remove_api_key(key):
        raise OpenAIError(404, "no such API key", code="api_key_not_found")
    return {"deleted": True}


@router.get("/requests")
async def list_requests(
    state: State, limit: int = Query(100, ge=1, le=1000), running: bool = False
) -> list[dict]:
    return await state.store.requests(limit, running_only=running)


@router.get("/stats")
async def cluster_stats(state: State) -> dict:
    nodes = await state.store.nodes()
    by_role: dict[str, dict] = {}
    for node in nodes:
        role = by_role.setdefault(
            node.role,
            {
                "nodes": 0,
                "ready": 0,
                "slots": 0,
                "free_slots": 0,
                "running": 0,
                "queued": 0,
                "tokens_per_s": 0.0,
            },
        )
        role["nodes"] += 1
        role["ready"] += node.status == "ready"
        role["slots"] += node.num_slots
        if node.stats:
            role["free_slots"] += node.stats.num_free_slots
            role["running"] += node.stats.num_running
            role["queued"] += node.stats.num_queued
            role["tokens_per_s"] += node.stats.tokens_per_s
    running = await state.store.requests(1000, running_only=True)
    return {"model": state.settings.model_name, "roles": by_role, "running_requests": len(running)}
