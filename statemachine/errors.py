"""Errors of the whole project, one root per layer.

    HooklineError                      root; every error carries a code and an HTTP-ish kind
    ├── BadRequest                     input that fails validation (422) or can't be parsed (400)
    ├── AuthError                      missing or invalid API key (401)
    ├── Forbidden                      a valid key that may not do this (403)
    ├── NotFound                       unknown (or someone else's) resource (404)
    ├── Conflict                       idempotency key reused with another body, wrong state (409)
    ├── InsufficientCredits            balance too low (402)
    ├── PayloadTooLarge                body or image too big, decompression bomb (413)
    ├── UnsupportedMediaType           not an image / wrong content type (415)
    ├── RateLimited                    too many requests (429, retry_after_s)
    ├── Unavailable                    the store or a dependency is down (503)
    ├── StoreError                     a store adapter failed (translated from the driver)
    └── ProviderError (callbacks)      see callbacks/errors.py

Adapters translate third-party errors at the boundary with ``raise ... from exc``; the HTTP mapping
lives in one place (service/errors.py).
"""

from __future__ import annotations

from typing import Any


class HooklineError(Exception):
    """Root of every hookline error."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class BadRequest(HooklineError):
    code = "invalid_request"
    status = 422


class MalformedRequest(BadRequest):
    code = "malformed_json"
    status = 400


class AuthError(HooklineError):
    code = "unauthorized"
    status = 401


class Forbidden(HooklineError):
    code = "forbidden"
    status = 403


class NotFound(HooklineError):
    code = "not_found"
    status = 404


class Conflict(HooklineError):
    code = "conflict"
    status = 409


class InsufficientCredits(HooklineError):
    code = "insufficient_credits"
    status = 402


class PayloadTooLarge(HooklineError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(HooklineError):
    code = "unsupported_media_type"
    status = 415


class RateLimited(HooklineError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code, details={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class Unavailable(HooklineError):
    code = "unavailable"
    status = 503


class StoreError(HooklineError):
    code = "store_error"
    status = 503
