"""Provider errors.

HooklineError (statemachine/errors.py)
└── ProviderError                  a provider call failed; ``retryable``: may a retry help
    ├── RetryableProviderError     the provider's 5xx, timeouts, connection errors
    │   └── ProviderRateLimited    the provider's 429; ``retry_after_s`` from its Retry-After
    ├── PermanentProviderError     the provider's 4xx (validation, auth, moderation): a retry
    │                              will not help
    └── WebhookRejected            a delivery that fails authentication or parsing; ``code``
                                   names the reason

The statuses above are the provider's answers (callbacks/http.py translates them). What
hookline's own client sees for each of these errors is decided by the HTTP layer, in one place
(service/http/errors.py).
"""

from __future__ import annotations

from typing import Any

from statemachine.errors import HooklineError


class ProviderError(HooklineError):
    code = "provider_error"
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
    ``stale_timestamp``, ``bad_token``, ``malformed_body`` (correctly signed, but not JSON or not
    a delivery), ``missing_headers``, ``wrong_provider``."""

    code = "webhook_rejected"
    retryable = False
