"""The admin dashboard's page, and signing in and out of it.

GET /dashboard answers the dashboard to a signed-in browser and the sign-in
page, with 401, to anyone else. Signing in posts the admin token in a JSON body
(never in a URL) and gets an HttpOnly session cookie; the page then reads the
admin API with it. The static files (scripts, styles, the vendored chart
library) hold no fleet data and are served to all.
"""

import asyncio
import secrets
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from lightpd.controlplane import session
from lightpd.controlplane.deps import State
from lightpd.controlplane.errors import OpenAIError

STATIC_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"
WRONG_TOKEN_DELAY_S = 0.5  # slows guessing down
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


class SessionCreate(BaseModel):
    token: str = Field(min_length=1, max_length=4096)


@router.get("")
async def page(request: Request, state: State) -> FileResponse:
    if session.is_valid(request.cookies.get(session.COOKIE), state.settings.admin_token):
        return FileResponse(STATIC_DIR / "index.html", headers=_HEADERS)
    return FileResponse(STATIC_DIR / "signin.html", status_code=401, headers=_HEADERS)


@router.post("/session", status_code=204)
async def sign_in(body: SessionCreate, request: Request, state: State) -> Response:
    admin_token = state.settings.admin_token
    if not secrets.compare_digest(body.token.encode(), admin_token.encode()):
        await asyncio.sleep(WRONG_TOKEN_DELAY_S)
        raise OpenAIError(401, "wrong admin token", "token", "invalid_token")
    response = Response(status_code=204)
    response.set_cookie(
        session.COOKIE,
        session.issue(admin_token),
        max_age=session.SESSION_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.delete("/session", status_code=204)
async def sign_out() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return response
