"""Provider errors.

HooklineError (statemachine/errors.py)
└── ProviderError                  a provider call failed; ``retryable``: may a retry help
    ├── RetryableProviderError     5xx, timeouts, connection errors
    │   └── ProviderRateLimited    429; ``retry_after_s`` from Retry-After
    ├── PermanentProviderError     4xx validation, auth, moderation: retrying will not help
    └── WebhookRejected            a delivery that fails authentication or parsing (4xx)
"""

from __future__ import annotations

from typing import Any

from statemachine.errors import HooklineError


class ProviderError(HooklineError):
    code = "provider_error"
    status = 502
    retryable = True


class RetryableProviderError(ProviderError):
    code = "provider_unavailable"


class ProviderRateLimited(RetryableProviderError):
    code = "provider_rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class PermanentProviderError(ProviderError):
    code = "provider_rejected"
    retryable = False


class WebhookRejected(ProviderError):
    """A webhook delivery we refuse. ``code`` names the reason: ``bad_signature``,
    ``stale_timestamp``, ``bad_token``, ``malformed_body``, ``missing_headers``,
    ``wrong_provider``."""

    code = "webhook_rejected"
    status = 401
    retryable = False
