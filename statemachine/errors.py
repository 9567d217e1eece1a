"""The domain's errors: what can go wrong in deciding and storing tasks, whoever asked.

    HooklineError                      root; every error carries a ``code``, a ``message`` and
    │                                  ``details`` (JSON-able, or None)
    ├── BadRequest                     input that fails validation (a cursor, a feed position,
    │                                  an unknown style; service/ adds image and URL errors)
    ├── NotFound                       unknown (or someone else's) resource
    ├── Conflict                       an existing user or key, an idempotency key reused with
    │                                  another request, a task past cancelling, contention
    ├── InsufficientCredits            the balance does not cover the cost
    ├── Unavailable                    the store or a dependency is down: retry later
    ├── StoreError                     a store adapter failed (translated from the driver)
    └── ProviderError (callbacks)      see callbacks/errors.py

Each layer roots its own errors here (callbacks/errors.py, service/media/errors.py, the HTTP
layer's in service/http/errors.py). Adapters translate third-party errors at the boundary with
``raise ... from exc``. Nothing here knows how an error is shown to a client: the HTTP layer maps
every class to a status in one place (service/http/errors.py).
"""

from __future__ import annotations

from typing import Any


class HooklineError(Exception):
    """Root of every hookline error."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class BadRequest(HooklineError):
    """Input that fails validation; ``code`` names what was wrong."""

    code = "invalid_request"


class NotFound(HooklineError):
    """An unknown resource, or one the caller may not see (ids cannot be probed)."""

    code = "not_found"


class Conflict(HooklineError):
    """The request contradicts what is stored: a name or key that exists, an idempotency key
    reused with another request, a task in a state that forbids the change."""

    code = "conflict"


class InsufficientCredits(HooklineError):
    """The balance does not cover the task's cost (nothing was debited)."""

    code = "insufficient_credits"


class Unavailable(HooklineError):
    """The store or another dependency cannot be reached: the same call may succeed later."""

    code = "unavailable"


class StoreError(HooklineError):
    """A store adapter failed; the driver's error is chained as ``__cause__``."""

    code = "store_error"
