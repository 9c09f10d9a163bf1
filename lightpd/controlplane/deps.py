"""Typed dependencies shared by the routers."""

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lightpd.common.tokenizer import Tokenizer
from lightpd.controlplane import session
from lightpd.controlplane.dispatcher import Dispatcher
from lightpd.controlplane.errors import OpenAIError
from lightpd.controlplane.fleet import Fleet
from lightpd.controlplane.metrics import Metrics
from lightpd.controlplane.node_client import NodeClient
from lightpd.controlplane.settings import Settings
from lightpd.controlplane.store import Store
from lightpd.controlplane.timeseries import Timeseries


@dataclass
class AppState:
    settings: Settings
    store: Store
    fleet: Fleet
    client: NodeClient
    dispatcher: Dispatcher
    metrics: Metrics
    timeseries: Timeseries
    tokenizer: Tokenizer
    model_fingerprint: str


def get_state(request: Request) -> AppState:
    return request.app.state.lightpd


State = Annotated[AppState, Depends(get_state)]


def _same_token(given: str, expected: str) -> bool:
    """Constant-time equality of tokens as bytes: a header decodes to any Latin-1
    text, which ``compare_digest`` refuses to compare as ``str`` unless it is ASCII."""
    return secrets.compare_digest(given.encode(), expected.encode())


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request, state: State) -> None:
    """A configured key, or one made in /admin/api-keys. While Redis is down the
    configured keys and those Redis confirmed lately still work; any other key is
    answered 503 (Redis's error), not 401, since it may well be valid."""
    keys = state.settings.api_key_set
    if not keys and not await state.store.has_api_keys():
        return  # no key configured anywhere: the API is open
    token = bearer_token(request)
    if token is not None and (
        any(_same_token(token, k) for k in keys) or await state.store.api_key_known(token)
    ):
        return
    raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _invalid_token() -> OpenAIError:
    return OpenAIError(401, "a valid bearer token is required", code="invalid_token")


async def require_cluster(request: Request, state: State) -> None:
    token = bearer_token(request)
    if token is None or not _same_token(token, state.settings.cluster_token):
        raise _invalid_token()


async def require_admin(request: Request, state: State) -> None:
    """The admin token as a bearer token, or the dashboard's session cookie."""
    admin_token = state.settings.admin_token
    token = bearer_token(request)
    if token is not None and _same_token(token, admin_token):
        return
    if token is None and session.is_valid(request.cookies.get(session.COOKIE), admin_token):
        if request.method in ("GET", "HEAD") or request.headers.get(session.CSRF_HEADER):
            return
        raise OpenAIError(
            403, f"a change by the dashboard must carry {session.CSRF_HEADER}", code="csrf"
        )
    raise _invalid_token()


ApiKey = Depends(require_api_key)
AdminToken = Depends(require_admin)
ClusterToken = Depends(require_cluster)
