"""fal.ai queue adapter (shared/PROVIDERS.md, "fal.ai queue").

A model id is ``owner/app`` optionally followed by a subpath (``fal-ai/flux/dev`` is app
``fal-ai/flux``, subpath ``dev``). Submission goes to the full path; status, result and cancel
paths drop the subpath: ``{base}/fal-ai/flux/requests/{request_id}/status``.

The model grammar (``validate_model``), checked before any request, submit, poll and cancel
alike: 2 to 8 path segments (``callbacks.http.SEGMENT``: ASCII letters, digits, ``.``, ``_``,
``-``, starting with a letter or digit, never ``..``), and the subpath may not start with
``requests`` (that is where the queue's status, result and cancel routes of the app live). Request
ids (from the submit answer, a webhook, a stored task) must match ``callbacks.http.JOB_ID``.

A delivery must be signed for our fal account: with ``user_id`` set, an
``X-Fal-Webhook-User-Id`` (part of what fal signs) naming another account is ``wrong_account``.

Webhooks are signed with ED25519 over ``request_id\\nuser_id\\ntimestamp\\nhex(sha256(body))``;
the public keys come from a JWKS, cached up to ``jwks_ttl_s`` (24 h) by the ``now`` the caller
passes, and fetched again once when no key matches (key rotation). Forced re-fetches are at most
one per ``jwks_refetch_interval_s`` so forged deliveries cannot turn us into a JWKS flood.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.http import (
    checked_job_id,
    error_status,
    expect_object,
    is_input_error,
    model_input,
    output_urls,
    parse_json,
    path_segments,
    request_json,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission
from callbacks.standard_webhooks import get_header

DEFAULT_BASE_URL = "https://queue.fal.run"
DEFAULT_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"
TOLERANCE_S = 300.0
JWKS_TTL_S = 24 * 3600.0
JWKS_REFETCH_INTERVAL_S = 60.0

REQUEST_ID_HEADER = "X-Fal-Webhook-Request-Id"
USER_ID_HEADER = "X-Fal-Webhook-User-Id"
TIMESTAMP_HEADER = "X-Fal-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"

# fal downloads image URLs and also takes base64 data URIs; its FLUX endpoints work up to about
# 2 megapixels, so 2048 px on the long side is enough.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=True)


MAX_MODEL_SEGMENTS = 8
QUEUE_ROUTES = "requests"  # {owner}/{app}/requests/…: the queue's own routes for the app


def model_segments(model: str, *, provider: str = "fal") -> tuple[str, ...]:
    """The path segments of a model id, or ``InvalidModel`` (module docstring)."""
    parts = path_segments(model, provider=provider, min_segments=1, max_segments=MAX_MODEL_SEGMENTS)
    if len(parts) < 2 or (len(parts) > 2 and parts[2] == QUEUE_ROUTES):
        raise InvalidModel(
            f"{provider}: model id {model!r} is not owner/app[/subpath]",
            details={"provider": provider},
        )
    return parts


def validate_model(model: str, *, provider: str = "fal") -> str:
    """``model`` if the grammar takes it, else ``InvalidModel`` (pure: the HTTP layer may call it
    when a task is created, to refuse such a model with 422)."""
    model_segments(model, provider=provider)
    return model


def app_path(model: str) -> str:
    """``owner/app`` of a model id: status, result and cancel paths drop the subpath."""
    return "/".join(model_segments(model)[:2])


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes fal signs for one delivery."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def parse_jwks(document: Any) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 keys of a JWKS document; keys of other types or malformed ones are skipped."""
    keys: list[Ed25519PublicKey] = []
    entries = document.get("keys") if isinstance(document, Mapping) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping) or entry.get("kty") != "OKP":
            continue
        if entry.get("crv") != "Ed25519" or not isinstance(entry.get("x"), str):
            continue
        x = entry["x"]
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (binascii.Error, ValueError):
            continue
    return tuple(keys)


def _failure(job_id: str, reason: str, detail: Any = None) -> Outcome:
    text = reason if detail is None else f"{reason} {json.dumps(detail, default=str)}"
    return Outcome("failed", job_id, reason=reason, retryable=not is_input_error(text))


def webhook_outcome(body: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome of a webhook body: ``OK`` with images succeeds; ``ERROR``, or ``OK`` whose
    payload is null (``payload_error``), fails."""
    payload = body.get("payload")
    if body.get("status") == "OK":
        if not isinstance(payload, Mapping):
            return _failure(job_id, str(body.get("payload_error") or "result without payload"))
        return images_outcome(payload, job_id)
    detail = payload.get("detail") if isinstance(payload, Mapping) else None
    return _failure(job_id, str(body.get("error") or "request failed"), detail)


def images_outcome(result: Mapping[str, Any], job_id: str) -> Outcome:
    """A model result (``{"images": [{"url"…}]}``) as an outcome."""
    urls = output_urls(result.get("images"))
    if not urls:
        return Outcome("failed", job_id, reason="result holds no images")
    return Outcome("succeeded", job_id, outputs=urls)


class _KeyCache:
    """The JWKS keys and when they were fetched (by the caller's ``now``)."""

    def __init__(self) -> None:
        self.keys: tuple[Ed25519PublicKey, ...] = ()
        self.fetched_at: float | None = None
        self.lock = asyncio.Lock()


class FalProvider:
    """The Provider port over fal's queue API."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        key: str,
        base_url: str = DEFAULT_BASE_URL,
        jwks_url: str = DEFAULT_JWKS_URL,
        name: str = "fal",
        tolerance_s: float = TOLERANCE_S,
        jwks_ttl_s: float = JWKS_TTL_S,
        jwks_refetch_interval_s: float = JWKS_REFETCH_INTERVAL_S,
        limits: Limits = LIMITS,
        user_id: str | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "webhook"
        self.quota = Quota()
        self._http = http
        self._user_id = user_id  # our fal account (None: not checked)
        self._base = base_url.rstrip("/")
        self._jwks_url = jwks_url
        self._auth = {"Authorization": f"Key {key}"}
        self._tolerance_s = tolerance_s
        self._jwks_ttl_s = jwks_ttl_s
        self._refetch_interval_s = jwks_refetch_interval_s
        self._jwks = _KeyCache()

    async def _call(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        data = await request_json(
            self._http, method, url, provider=self.name, headers=self._auth, json=body
        )
        return expect_object(data, provider=self.name, what=f"{method} answer")

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    async def submit(self, submission: Submission) -> str:
        path = url_path(*model_segments(submission.model, provider=self.name))
        url = f"{self._base}{path}?fal_webhook={quote(submission.callback_url, safe='')}"
        body = model_input(submission, image_key="image_url", count_key="num_images")
        answer = await self._call("POST", url, body)
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise RetryableProviderError(f"{self.name}: submission without a request_id")
        return checked_job_id(request_id, provider=self.name)

    # -- webhooks -----------------------------------------------------------------------------

    async def _fetch_keys(self, now: float) -> tuple[Ed25519PublicKey, ...]:
        document = await request_json(self._http, "GET", self._jwks_url, provider=self.name)
        keys = parse_jwks(document)
        if not keys:
            raise RetryableProviderError(f"{self.name}: JWKS holds no Ed25519 key")
        self._jwks.keys, self._jwks.fetched_at = keys, now
        return keys

    async def public_keys(
        self, now: float, *, refresh: bool = False
    ) -> tuple[Ed25519PublicKey, ...]:
        """The cached keys, fetched when absent or older than the TTL, or when ``refresh`` asks
        and the last fetch is older than the re-fetch interval."""
        cache = self._jwks
        async with cache.lock:
            age = None if cache.fetched_at is None else now - cache.fetched_at
            if age is None or age >= self._jwks_ttl_s or age < 0:
                return await self._fetch_keys(now)
            if refresh and age >= self._refetch_interval_s:
                return await self._fetch_keys(now)
            return cache.keys

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """ED25519 over the raw body with fal's four headers; delivery id = request id. Then the
        signed user id must be our account's (when ``user_id`` is set) and the request id a
        valid job id."""
        request_id = get_header(headers, REQUEST_ID_HEADER)
        user_id = get_header(headers, USER_ID_HEADER)
        timestamp = get_header(headers, TIMESTAMP_HEADER)
        signature_hex = get_header(headers, SIGNATURE_HEADER)
        if not (request_id and user_id and timestamp and signature_hex):
            raise WebhookRejected("missing X-Fal-Webhook-* headers", code="missing_headers")
        try:
            sent_at = int(timestamp.strip())
        except ValueError as exc:
            raise WebhookRejected("timestamp is not an integer", code="missing_headers") from exc
        if abs(now - sent_at) > self._tolerance_s:
            raise WebhookRejected("timestamp outside the tolerance window", code="stale_timestamp")
        try:
            signature = bytes.fromhex(signature_hex.strip())
        except ValueError as exc:
            raise WebhookRejected("signature is not hex", code="bad_signature") from exc
        message = signed_message(request_id, user_id, timestamp, body)
        if not _any_key_verifies(await self.public_keys(now), signature, message):
            fresh = await self.public_keys(now, refresh=True)
            if not _any_key_verifies(fresh, signature, message):
                raise WebhookRejected("no JWKS key verifies the signature", code="bad_signature")
        if self._user_id is not None and user_id != self._user_id:
            raise WebhookRejected(
                "delivery is signed for another fal account", code="wrong_account"
            )
        try:
            checked_job_id(request_id, provider=self.name)
        except InvalidJobId as exc:
            raise WebhookRejected(exc.message, code="malformed_body") from exc
        parsed = _parse_body(body, request_id)
        return Delivery(request_id, request_id, webhook_outcome(parsed, request_id))

    # -- polling ------------------------------------------------------------------------------

    def _request_url(self, model: str, request_id: str) -> str:
        """``{base}/{owner}/{app}/requests/{id}``, both parts checked (raises before a request)."""
        app = model_segments(model, provider=self.name)[:2]
        job = checked_job_id(request_id, provider=self.name)
        return self._base + url_path(*app, QUEUE_ROUTES, job)

    async def poll(self, job_id: str, model: str) -> Outcome:
        """Status, then the result once ``COMPLETED``; a ``COMPLETED`` with ``error`` failed."""
        base = self._request_url(model, job_id)
        try:
            status = await self._call("GET", base + "/status")
        except PermanentProviderError as exc:
            if error_status(exc) == 404:
                return Outcome("failed", job_id, reason="request not found")
            raise
        state = status.get("status")
        if state in ("IN_QUEUE", "IN_PROGRESS"):
            return Outcome("running", job_id)
        if state != "COMPLETED":
            return Outcome("running", job_id, reason=f"unknown status {state!r}")
        if status.get("error"):
            return _failure(job_id, str(status["error"]), status.get("error_type"))
        try:
            result = await self._call("GET", base)
        except PermanentProviderError as exc:
            if error_status(exc) in (400, 422):  # the request's own input failure
                return Outcome("failed", job_id, reason=exc.message, retryable=False)
            raise
        return images_outcome(result, job_id)

    async def cancel(self, job_id: str, model: str) -> None:
        await self._call("PUT", self._request_url(model, job_id) + "/cancel")

    def fetch_headers(self, url: str) -> dict[str, str]:
        """fal's output URLs (fal.media) are public: no headers."""
        return {}


def _any_key_verifies(keys: tuple[Ed25519PublicKey, ...], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


def _parse_body(body: bytes, request_id: str) -> dict[str, Any]:
    try:
        parsed = parse_json(body)
    except (ValueError, RecursionError) as exc:  # too deep is malformed too
        raise WebhookRejected("body is not JSON", code="malformed_body") from exc
    if not isinstance(parsed, dict) or parsed.get("status") not in ("OK", "ERROR"):
        raise WebhookRejected("body is not a fal webhook", code="malformed_body")
    if parsed.get("request_id") not in (None, request_id):
        raise WebhookRejected("body and header request ids differ", code="malformed_body")
    return parsed
