"""The one mapping from errors to HTTP responses: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from callbacks.errors import WebhookRejected
from statemachine.errors import HooklineError, RateLimited

log = structlog.get_logger()

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


# Statuses that depend on an error's code rather than its type: a correctly signed webhook whose
# body is not JSON (or not a prediction) is a malformed request, not an authentication failure.
_WEBHOOK_STATUS_BY_CODE = {"malformed_body": 400}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """DESIGN.md's error shape; ``details`` is always present (null when there are none)."""
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status)


async def hookline_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HooklineError)
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s + 0.999)))
    status = exc.status
    if isinstance(exc, WebhookRejected):
        status = _WEBHOOK_STATUS_BY_CODE.get(exc.code, status)
    if status >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    response = error_response(status, exc.code, exc.message, exc.details)
    response.headers.update(headers)
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None)


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """The client went away while its body was being read: nobody reads the answer, and it is
    no server error (no traceback, no 500 in the logs or the metrics)."""
    log.info("client_disconnected", path=request.url.path)
    return error_response(400, "client_disconnected", "the client closed the connection")


async def unhandled_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", error=repr(exc))
    return error_response(500, "internal_error", "internal error")


EXCEPTION_HANDLERS = {
    HooklineError: hookline_error,
    ClientDisconnect: client_disconnected,
    HTTPException: http_error,
    Exception: unhandled_error,
}
