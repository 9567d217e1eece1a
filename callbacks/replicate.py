"""Replicate adapter (shared/PROVIDERS.md, "Replicate"); also drives the built-in simulator, which
speaks the same contract.

Models: ``owner/name`` runs the model's latest version through
``POST /models/{owner}/{name}/predictions``; ``owner/name:version`` or a bare version id go to
``POST /predictions`` with ``version``; ``deployments/{owner}/{name}`` uses the deployment.
``Prefer: wait`` is never sent: the answer comes by webhook (``webhook_events_filter:
["completed"]``) or by polling.

The model grammar (``validate_model``), checked before any request so that a model string can
name no other route: ``owner`` and ``name`` are one path segment each (``callbacks.http.SEGMENT``:
ASCII letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, never ``..``), a
version is 8–64 hex digits, and the only three-segment form is ``deployments/{owner}/{name}``.
Prediction ids (from answers, webhooks and stored tasks) must match ``callbacks.http.JOB_ID``
before they go into ``/predictions/{id}`` or its ``/cancel``.

Failure rule: a ``failed`` prediction is retryable unless its ``error`` names an input or safety
problem (``callbacks.http.is_input_error``: "validation", "invalid", "must be", "nsfw", …): the
same input would fail again. ``aborted`` (terminated before it ran) and ``succeeded`` without
output (``data_removed``: inputs and outputs are deleted about an hour after completion) are
retryable failures.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from callbacks import standard_webhooks
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

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
DELIVERY_HOST = "replicate.delivery"

# Inputs reach the model as URLs it downloads, or as data URIs (Replicate advises those only for
# small files, ~256 KB). FLUX-class models work on up to ~2 megapixels, so 2048 px on the long
# side loses nothing.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=True)


VERSION = re.compile(r"[0-9a-fA-F]{8,64}")


def prediction_route(model: str, *, provider: str = "replicate") -> tuple[str, dict[str, str]]:
    """The submit path (relative to the base URL) and the extra body fields for ``model``;
    ``InvalidModel`` for anything outside the grammar (module docstring)."""
    if not isinstance(model, str):
        raise InvalidModel(f"{provider}: a model name is required", details={"provider": provider})
    name, sep, version = model.partition(":")
    refused = InvalidModel(
        f"{provider}: model {model[:200]!r} is not owner/name, owner/name:version, a version "
        "id or deployments/owner/name",
        details={"provider": provider},
    )
    if sep and not VERSION.fullmatch(version):
        raise refused
    parts = path_segments(name, provider=provider, max_segments=3)
    if parts[0] == "deployments":
        if sep or len(parts) != 3:
            raise refused
        return url_path(*parts, "predictions"), {}
    if len(parts) == 2:
        if sep:
            return "/predictions", {"version": version}
        return url_path("models", *parts, "predictions"), {}
    if len(parts) == 1 and not sep and VERSION.fullmatch(name):
        return "/predictions", {"version": name}
    raise refused


def validate_model(model: str, *, provider: str = "replicate") -> str:
    """``model`` if the grammar takes it, else ``InvalidModel`` (pure: the HTTP layer may call it
    when a task is created, to refuse such a model with 422)."""
    prediction_route(model, provider=provider)
    return model


def prediction_outcome(prediction: Mapping[str, Any]) -> Outcome:
    """The outcome a prediction object (webhook body or poll answer) describes."""
    job_id = str(prediction["id"])
    status = prediction.get("status")
    error = prediction.get("error")
    reason = str(error) if error else None
    if status in ("starting", "processing"):
        return Outcome("running", job_id)
    if status == "succeeded":
        output = prediction.get("output")
        if output is None or prediction.get("data_removed"):
            return Outcome("failed", job_id, reason="output removed (data_removed)")
        urls = output_urls(output)
        if not urls:
            return Outcome("failed", job_id, reason="output holds no URLs", retryable=False)
        return Outcome("succeeded", job_id, outputs=urls)
    if status == "failed":
        reason = reason or "prediction failed"
        return Outcome("failed", job_id, reason=reason, retryable=not is_input_error(reason))
    if status == "canceled":
        return Outcome("cancelled", job_id, reason=reason or "canceled")
    if status == "aborted":
        return Outcome("failed", job_id, reason=reason or "aborted before it ran")
    # a status this adapter does not know yet: not final, so the deadline and polling decide
    return Outcome("running", job_id, reason=f"unknown status {status!r}")


def parse_prediction(body: bytes) -> dict[str, Any]:
    """A webhook body as a prediction object, or ``WebhookRejected(malformed_body)``."""
    try:
        prediction = parse_json(body)
    except (ValueError, RecursionError) as exc:  # too deep is malformed too
        raise WebhookRejected("body is not JSON", code="malformed_body") from exc
    if not (
        isinstance(prediction, dict)
        and isinstance(prediction.get("id"), str)
        and prediction["id"]
        and isinstance(prediction.get("status"), str)
    ):
        raise WebhookRejected("body is not a prediction object", code="malformed_body")
    try:
        checked_job_id(prediction["id"], provider="replicate")
    except InvalidJobId as exc:
        raise WebhookRejected(exc.message, code="malformed_body") from exc
    return prediction


class ReplicateProvider:
    """The Provider port over Replicate's HTTP API.

    ``webhook_secret`` (``whsec_…``) comes from settings when known; otherwise it is fetched once
    from ``GET {base}/webhooks/default/secret`` on the first delivery and kept.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_token: str,
        base_url: str = DEFAULT_BASE_URL,
        webhook_secret: str | None = None,
        name: str = "replicate",
        events_filter: Sequence[str] = ("completed",),
        tolerance_s: float = standard_webhooks.DEFAULT_TOLERANCE_S,
        limits: Limits = LIMITS,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "webhook"
        self.quota = Quota()
        self._http = http
        self._base = base_url.rstrip("/")
        self._api = httpx.URL(self._base)
        self._auth = {"Authorization": f"Bearer {api_token}"}
        self._events_filter = list(events_filter)
        self._tolerance_s = tolerance_s
        self._secret_key = (
            standard_webhooks.decode_secret(webhook_secret) if webhook_secret else None
        )
        self._secret_lock = asyncio.Lock()

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = await request_json(
            self._http, method, self._base + path, provider=self.name, headers=self._auth, json=body
        )
        return expect_object(data, provider=self.name, what=f"{method} {path}")

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    async def submit(self, submission: Submission) -> str:
        path, extra = prediction_route(submission.model, provider=self.name)
        body = {
            **extra,
            "input": model_input(submission, image_key="image", count_key="num_outputs"),
            "webhook": submission.callback_url,
            "webhook_events_filter": self._events_filter,
        }
        prediction = await self._call("POST", path, body)
        job_id = prediction.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableProviderError(f"{self.name}: prediction without an id")
        return checked_job_id(job_id, provider=self.name)

    async def webhook_secret(self) -> bytes:
        """The HMAC key of the account's webhook secret, fetched at most once."""
        if self._secret_key is None:
            async with self._secret_lock:
                if self._secret_key is None:
                    data = await self._call("GET", "/webhooks/default/secret")
                    try:
                        self._secret_key = standard_webhooks.decode_secret(str(data.get("key")))
                    except ValueError as exc:
                        raise RetryableProviderError(
                            f"{self.name}: webhook secret is not a whsec_ key"
                        ) from exc
        return self._secret_key

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Standard Webhooks over the raw body; the delivery id is ``webhook-id``, stable across
        Replicate's retries. A failure to fetch the secret raises a retryable ProviderError (the
        receiver should answer 5xx so Replicate tries again)."""
        names = (standard_webhooks.ID_HEADER, standard_webhooks.SIGNATURE_HEADER)
        if not all(standard_webhooks.get_header(headers, name) for name in names):
            # refuse junk before it can cost a secret fetch
            raise WebhookRejected("missing Standard Webhooks headers", code="missing_headers")
        key = await self.webhook_secret()
        standard_webhooks.verify(key, headers, body, now, self._tolerance_s)
        prediction = parse_prediction(body)
        delivery_id = standard_webhooks.get_header(headers, standard_webhooks.ID_HEADER) or ""
        return Delivery(delivery_id, prediction["id"], prediction_outcome(prediction))

    async def poll(self, job_id: str, model: str) -> Outcome:
        """``GET /predictions/{id}``; a prediction Replicate no longer knows is a retryable
        failure (a new attempt is the only way forward). An answer about another prediction is
        the provider misbehaving (retryable): its outcome is never passed off as this job's."""
        path = url_path("predictions", checked_job_id(job_id, provider=self.name))
        try:
            prediction = await self._call("GET", path)
        except PermanentProviderError as exc:
            if error_status(exc) == 404:
                return Outcome("failed", job_id, reason="prediction not found")
            raise
        if not isinstance(prediction.get("id"), str):
            prediction["id"] = job_id
        if prediction["id"] != job_id:
            raise RetryableProviderError(f"{self.name}: poll of {job_id} answered another id")
        return prediction_outcome(prediction)

    async def cancel(self, job_id: str, model: str) -> None:
        path = url_path("predictions", checked_job_id(job_id, provider=self.name), "cancel")
        await self._call("POST", path)

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Replicate's file outputs may need the API token: sent to the API's own host (the
        simulator serves its outputs there) and to https ``replicate.delivery`` hosts only."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            return {}
        same_api = (target.scheme, target.host, target.port) == (
            self._api.scheme,
            self._api.host,
            self._api.port,
        )
        delivery = target.scheme == "https" and (
            target.host == DELIVERY_HOST or target.host.endswith("." + DELIVERY_HOST)
        )
        return dict(self._auth) if same_api or delivery else {}
