"""The one mapping from errors to HTTP responses: ``{"error": {"code", "message", "details"}}``.

Every hookline error is answered by ``hookline_error`` with the status ``http_status`` finds in
``HTTP_STATUS``: the exception's classes are walked along its MRO (as Starlette picks a handler),
and at each class a ``(class, code)`` entry wins over the class's own. The whole mapping:

    HooklineError (statemachine)              500
    ├── BadRequest                            422
    │   ├── MalformedRequest (here)           400  JSON that does not parse or nests too deep
    │   │                                          (``json_too_deep``), a bad header or query
    │   ├── InvalidImage (service/media)      422
    │   ├── ImageTooLarge (service/media)     413
    │   ├── UnsupportedImage (service/media)  415
    │   ├── OverBudget (service/media)        413  needs more than the whole media memory budget
    │   ├── FetchError (service/media)        422
    │   │   └── code ``url_too_large``        413
    │   └── InvalidBlobKey (service/blobs)    422
    ├── NotFound                              404
    ├── Conflict                              409
    ├── InsufficientCredits                   402
    ├── Unavailable                           503
    ├── StoreError                            503
    ├── UrlRefused (service/blobs/local.py)   403  UrlExpired, BadSignature
    ├── AuthError (here)                      401
    │                                              (``invalid_watch_link``: a watch link that
    │                                              opens nothing, service/http/watch.py)
    ├── PayloadTooLarge (here)                413  a request body over its limit
    ├── UnsupportedMediaType (here)           415  a body that is not JSON where JSON is expected
    ├── RateLimited (here)                    429  with ``Retry-After`` (whole seconds, at least 1):
    │                                              ``rate_limited`` (per key),
    │                                              ``too_many_auth_failures`` (per address),
    │                                              ``too_many_concurrent_uploads`` (per user)
    └── ProviderError (callbacks)             502  RetryableProviderError, ProviderRateLimited,
        │                                          PermanentProviderError
        ├── InvalidModel                      422  a model name outside its adapter's grammar
        └── WebhookRejected                   401
            └── code ``malformed_body``       400  correctly signed, but not a delivery

An answer of 500 or more is logged as an error. Errors that are not hookline's: Starlette's
``HTTPException`` keeps its status (a code from ``_HTTP_CODES``), a client that disconnects
mid-body is 400 ``client_disconnected``, anything else is 500 ``internal_error`` (logged with its
traceback).

The classes marked "here" are raised only while handling a request, so they live in this layer;
the others are raised by code below it, which never imports service/http.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from callbacks.errors import InvalidModel, ProviderError, WebhookRejected
from service.blobs.local import UrlRefused
from service.media.errors import ImageTooLarge, OverBudget, UnsupportedImage
from service.media.fetch import FetchError
from statemachine.errors import (
    BadRequest,
    Conflict,
    HooklineError,
    InsufficientCredits,
    NotFound,
    StoreError,
    Unavailable,
)

log = structlog.get_logger()


# -- errors only request handling raises -------------------------------------------------------


class MalformedRequest(BadRequest):
    """A request that cannot be parsed: JSON that does not parse, a bad header or query value."""

    code = "malformed_json"


class AuthError(HooklineError):
    """A missing or invalid API key (or metrics token)."""

    code = "unauthorized"


class PayloadTooLarge(HooklineError):
    """A request body over its byte limit (refused before it is read in full)."""

    code = "payload_too_large"


class UnsupportedMediaType(HooklineError):
    """A request body of a content type the route does not take."""

    code = "unsupported_media_type"


class RateLimited(HooklineError):
    """Too many requests (for one API key, from one address, at once for one user);
    ``retry_after_s``: how long to wait."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code, details={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


# -- the mapping -----------------------------------------------------------------------------

ErrorKey = type[HooklineError] | tuple[type[HooklineError], str]

HTTP_STATUS: Final[dict[ErrorKey, int]] = {
    HooklineError: 500,
    BadRequest: 422,
    MalformedRequest: 400,
    ImageTooLarge: 413,
    UnsupportedImage: 415,
    OverBudget: 413,
    (FetchError, "url_too_large"): 413,
    NotFound: 404,
    Conflict: 409,
    InsufficientCredits: 402,
    Unavailable: 503,
    StoreError: 503,
    UrlRefused: 403,
    AuthError: 401,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    RateLimited: 429,
    ProviderError: 502,
    InvalidModel: 422,  # the caller's model string, refused before any request: their input
    WebhookRejected: 401,
    # A correctly signed webhook whose body is not JSON (or not a delivery) is a malformed
    # request, not an authentication failure.
    (WebhookRejected, "malformed_body"): 400,
}

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


def http_status(exc: HooklineError) -> int:
    """The status ``exc`` is answered with: the first entry of HTTP_STATUS along its MRO."""
    for cls in type(exc).__mro__:
        if issubclass(cls, HooklineError):
            status = HTTP_STATUS.get((cls, exc.code), HTTP_STATUS.get(cls))
            if status is not None:
                return status
    raise AssertionError("unreachable: HooklineError itself is in HTTP_STATUS")


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """DESIGN.md's error shape; ``details`` is always present (null when there are none)."""
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status)


async def hookline_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HooklineError)
    status = http_status(exc)
    if status >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    response = error_response(status, exc.code, exc.message, exc.details)
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(max(1, int(exc.retry_after_s + 0.999)))
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
