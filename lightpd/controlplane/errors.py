"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}.

Every error the app answers has this shape, an unexpected exception's 500 too.
"""

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
REDIS_RETRY_AFTER_S = 2  # what a client is told to wait while Redis is unreachable
NO_NODE_RETRY_AFTER_S = 5  # while no node is ready (one starting takes seconds)
STOPPING_RETRY_AFTER_S = 1  # another control plane, or this one restarted, may serve it
STOPPING_MESSAGE = "this control plane is shutting down; send the request again"


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers)


def redis_unavailable() -> JSONResponse:
    """The answer to a request that needs Redis while it cannot be reached."""
    return error_response(
        503,
        "the fleet's state store (Redis) cannot be reached; try again shortly",
        code="redis_unavailable",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


def stopping_error() -> OpenAIError:
    """For a request this control plane will not serve since it is shutting down: a
    new one, or one still running at the end of the grace. The connection closes,
    so a client's next attempt opens another (to another control plane, behind a
    load balancer)."""
    return OpenAIError(
        503,
        STOPPING_MESSAGE,
        code="shutting_down",
        headers={"Retry-After": str(STOPPING_RETRY_AFTER_S), "Connection": "close"},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
        param = ".".join(location) or None
        if first.get("type") == "extra_forbidden":
            # A parameter we do not implement: refused by name, never dropped.
            message = f"unsupported parameter '{param}': this server does not implement it"
            return error_response(400, message, param, "unsupported_parameter")
        msg = str(first.get("msg")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette would answer a plain-text 500; the exception is still logged.
        return error_response(500, "internal error in the control plane")
