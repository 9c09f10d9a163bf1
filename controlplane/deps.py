"""Typed dependencies shared by the routers."""

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from transformers import PreTrainedTokenizerBase

from common.node_client import NodeClient
from controlplane.api.errors import OpenAIError
from controlplane.dispatcher import Dispatcher
from controlplane.fleet import Fleet
from controlplane.metrics import Metrics
from controlplane.settings import Settings
from controlplane.store import Store


@dataclass
class AppState:
    settings: Settings
    store: Store
    fleet: Fleet
    client: NodeClient
    dispatcher: Dispatcher
    metrics: Metrics
    tokenizer: PreTrainedTokenizerBase
    model_fingerprint: str


def get_state(request: Request) -> AppState:
    return request.app.state.lightpd


State = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request, state: State) -> None:
    keys = state.settings.api_key_set
    if not keys and not await state.store.has_api_keys():
        return  # no key configured anywhere: the API is open
    token = _bearer(request)
    if token is not None and (
        any(secrets.compare_digest(token, k) for k in keys)
        or await state.store.api_key_known(token)
    ):
        return
    raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _require_token(expected_of) -> object:
    async def check(request: Request, state: State) -> None:
        token = _bearer(request)
        if token is None or not secrets.compare_digest(token, expected_of(state.settings)):
            raise OpenAIError(401, "a valid bearer token is required", code="invalid_token")

    return check


require_admin = _require_token(lambda s: s.admin_token)
require_cluster = _require_token(lambda s: s.cluster_token)

ApiKey = Depends(require_api_key)
AdminToken = Depends(require_admin)
ClusterToken = Depends(require_cluster)
