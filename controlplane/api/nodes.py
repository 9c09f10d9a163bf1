"""Node membership: registration and heartbeats, behind the cluster token."""

from fastapi import APIRouter

from controlplane.api.errors import OpenAIError
from controlplane.deps import ClusterToken, State
from controlplane.schemas import HeartbeatReply, NodeRegistration, NodeStats

router = APIRouter(prefix="/internal/nodes", dependencies=[ClusterToken])
HEARTBEAT_S = 1.0


@router.post("", status_code=201)
async def register(body: NodeRegistration, state: State) -> HeartbeatReply:
    if body.model_fingerprint != state.model_fingerprint:
        raise OpenAIError(
            409,
            f"model mismatch: the node serves {body.model_name} (fingerprint "
            f"{body.model_fingerprint}) but this fleet serves {state.settings.model_name} "
            f"(fingerprint {state.model_fingerprint})",
            code="model_mismatch",
        )
    if body.role == "decode" and body.kv_endpoint is None:
        raise OpenAIError(400, "a decode node must give its kv_endpoint", "kv_endpoint")
    await state.store.register(body)
    return HeartbeatReply(status="ready", heartbeat_s=HEARTBEAT_S)


@router.put("/{node_id}/heartbeat")
async def heartbeat(node_id: str, body: NodeStats, state: State) -> HeartbeatReply:
    status = await state.store.heartbeat(node_id, body)
    if status is None and await state.store.was_removed(node_id):
        raise OpenAIError(410, f"node {node_id} was removed from the fleet", code="node_removed")
    if status is None:
        raise OpenAIError(
            404,
            f"node {node_id} is not registered (removed, or its TTL passed)",
            code="node_not_found",
        )
    return HeartbeatReply(status=status, heartbeat_s=HEARTBEAT_S)
