"""Provider errors.

HooklineError (statemachine/errors.py)
└── ProviderError                  a provider call failed; ``retryable``: may a retry help
    ├── RetryableProviderError     the provider's 5xx, timeouts, connection errors
    │   └── ProviderRateLimited    the provider's 429; ``retry_after_s`` from its Retry-After
    ├── PermanentProviderError     the provider's 4xx (validation, auth, moderation): a retry
    │   │                          will not help
    │   ├── InvalidModel           a model name outside the adapter's grammar, refused before
    │   │                          any request (it would steer the provider's URL)
    │   └── InvalidJobId           a job id (from a provider's answer or a stored task) outside
    │                              the grammar, refused before it reaches a URL
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


class InvalidModel(PermanentProviderError):
    """A model name the adapter's grammar refuses (``validate_model`` in each adapter): it never
    reaches a request, so it cannot make hookline call another route with the operator's key."""

    code = "invalid_model"


class InvalidJobId(PermanentProviderError):
    """A provider job id outside the grammar job ids are checked against before they go into a
    status, result or cancel URL (a provider's answer must not steer a path either)."""

    code = "invalid_job_id"


class WebhookRejected(ProviderError):
    """A webhook delivery we refuse. ``code`` names the reason: ``bad_signature``,
    ``stale_timestamp``, ``bad_token``, ``malformed_body`` (correctly signed, but not JSON or not
    a delivery, or naming a job id outside the grammar), ``missing_headers``, ``wrong_provider``,
    ``wrong_account`` (fal: correctly signed by fal, but for another fal account)."""

    code = "webhook_rejected"
    retryable = False
