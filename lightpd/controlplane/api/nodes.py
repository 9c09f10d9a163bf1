"""Node membership: registration and heartbeats, behind the cluster token."""

from typing import Annotated

from fastapi import APIRouter, Header

from lightpd.controlplane.deps import ClusterToken, State
from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.fleet_schemas import HeartbeatReply, NodeJoin, NodeRegistration, NodeStats

router = APIRouter(prefix="/internal/nodes", dependencies=[ClusterToken])
HEARTBEAT_S = 1.0


@router.post("", status_code=201)
async def register(body: NodeJoin, state: State) -> HeartbeatReply:
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
    registration = NodeRegistration.model_validate(body.model_dump(exclude={"session"}))
    if not await state.store.register(registration, body.session):
        raise _taken(body.node_id)
    return HeartbeatReply(status="ready", heartbeat_s=HEARTBEAT_S)


def _taken(node_id: str) -> OpenAIError:
    return OpenAIError(409, f"node id {node_id} is held by another live node", code="node_id_taken")


@router.put("/{node_id}/heartbeat")
async def heartbeat(
    node_id: str,
    body: NodeStats,
    state: State,
    session: Annotated[str, Header(alias="X-Lightpd-Node-Session", max_length=64)] = "",
) -> HeartbeatReply:
    status = await state.store.heartbeat(node_id, body, session)
    if status == "conflict":
        raise _taken(node_id)
    if status is None and await state.store.was_removed(node_id):
        raise OpenAIError(410, f"node {node_id} was removed from the fleet", code="node_removed")
    if status is None:
        raise OpenAIError(
            404,
            f"node {node_id} is not registered (removed, or its TTL passed)",
            code="node_not_found",
        )
    return HeartbeatReply(status=status, heartbeat_s=HEARTBEAT_S)
