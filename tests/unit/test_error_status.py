"""The one mapping from errors to HTTP statuses (service/http/errors.py): every error a client can
meet gets the status it always had, a per-code entry wins over its class, and a rate-limited
answer says when to come back."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterator

import pytest
from starlette.requests import Request

import callbacks
import service
import statemachine
from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from service.blobs.base import InvalidBlobKey
from service.blobs.local import BadSignature, UrlExpired
from service.http.errors import (
    AuthError,
    MalformedRequest,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
    hookline_error,
    http_status,
)
from service.media.errors import ImageTooLarge, InvalidImage, OverBudget, UnsupportedImage
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

# (error, status): the statuses clients saw before the mapping moved into the HTTP layer.
STATUSES: list[tuple[HooklineError, int]] = [
    (HooklineError("boom"), 500),
    (BadRequest("bad cursor", code="invalid_cursor"), 422),
    (MalformedRequest("not JSON"), 400),
    (MalformedRequest("bad window", code="bad_window"), 400),
    (NotFound("no task", code="task_not_found"), 404),
    (Conflict("reused", code="idempotency_conflict"), 409),
    (InsufficientCredits("poor"), 402),
    (Unavailable("down"), 503),
    (StoreError("driver"), 503),
    (AuthError("no key", code="missing_key"), 401),
    (PayloadTooLarge("big", code="body_too_large"), 413),
    (UnsupportedMediaType("not JSON", code="not_json"), 415),
    (RateLimited("slow down", retry_after_s=0.2), 429),
    (InvalidImage("empty", code="empty_body"), 422),
    (InvalidImage("corrupt"), 422),
    (ImageTooLarge("bytes", code="upload_too_large"), 413),
    (ImageTooLarge("pixels"), 413),
    (UnsupportedImage("text/html", code="unsupported_media_type"), 415),
    (UnsupportedImage("heic"), 415),
    (FetchError("private", code="url_forbidden"), 422),
    (FetchError("404", code="http_status"), 422),
    (FetchError("big", code="url_too_large"), 413),
    (InvalidBlobKey("../x"), 422),
    (UrlExpired("late"), 403),
    (BadSignature("forged"), 403),
    (ProviderError("?"), 502),
    (RetryableProviderError("5xx"), 502),
    (ProviderRateLimited("429", retry_after_s=3), 502),
    (PermanentProviderError("4xx"), 502),
    (WebhookRejected("forged", code="bad_signature"), 401),
    (WebhookRejected("old", code="stale_timestamp"), 401),
    (WebhookRejected("token", code="bad_token"), 401),
    (WebhookRejected("headers", code="missing_headers"), 401),
    (WebhookRejected("not JSON", code="malformed_body"), 400),
    (InvalidModel("../../v1/credits"), 422),
    (InvalidJobId("../x"), 502),
    (WebhookRejected("another fal account", code="wrong_account"), 401),
    (OverBudget("over the budget"), 413),
]


@pytest.mark.parametrize(
    ("error", "status"), STATUSES, ids=[f"{type(e).__name__}-{e.code}" for e, _ in STATUSES]
)
def test_each_error_keeps_its_status(error: HooklineError, status: int) -> None:
    assert http_status(error) == status


def test_a_subclass_inherits_its_parents_per_code_entry() -> None:
    class LateWebhook(WebhookRejected):
        pass

    assert http_status(LateWebhook("late", code="malformed_body")) == 400
    assert http_status(LateWebhook("late", code="bad_token")) == 401


def _every_error_class() -> Iterator[type[HooklineError]]:
    for package in (statemachine, callbacks, service):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(info.name)
    pending = list(HooklineError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        yield cls


def test_every_error_class_of_the_tree_has_its_status_stated_here() -> None:
    """A new error class gets a row in STATUSES, so its status is a decision, not an accident of
    what it inherits (HooklineError's 500 included)."""
    tested = {type(error) for error, _ in STATUSES}
    untested = {
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _every_error_class()
        if cls not in tested and "<locals>" not in cls.__qualname__
    }
    # The abstract parent of the signed-URL errors is never raised itself.
    assert untested == {"service.blobs.local.UrlRefused"}


async def test_a_rate_limited_answer_says_when_to_retry_in_whole_seconds() -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    for wait, header in ((0.2, "1"), (2.0, "2"), (2.01, "3")):
        response = await hookline_error(request, RateLimited("slow", retry_after_s=wait))
        assert (response.status_code, response.headers["Retry-After"]) == (429, header)
        assert json.loads(bytes(response.body))["error"]["details"] == {"retry_after_s": wait}
    other = await hookline_error(request, WebhookRejected("x", code="malformed_body"))
    assert other.status_code == 400 and "Retry-After" not in other.headers
