"""Volcengine Ark Seedream image generation adapter (shared/PROVIDERS.md, "Volcengine Ark:
Seedream image generation").

Synchronous (``arrival`` "sync"): ``generate`` makes one ``POST {base}/images/generations`` with
``Authorization: Bearer <ARK_API_KEY>`` and the answer holds the images; there is no task id, no
callback and nothing to poll or cancel. The call takes tens of seconds, so each request carries
its own timeout (``timeout_s``, 120 s by default; the connect phase at most 10 s) instead of the
shared client's default; no answer within it is a ``RetryableProviderError``.

Body: the task's params as Ark names them (``size``, ``seed``, ``guidance_scale``, ``watermark`` —
Ark's default is ``true`` —, ``optimize_prompt_options``…), then ``model``, ``prompt``,
``response_format: "url"`` (always: the images are downloaded at once, their URLs live 24 h) and
the input images as ``image``: one as a string, several as a list (at most 14), each a URL or a
data URI as given (the ``image_key``/``images_key`` params of callbacks/http.py steer them
elsewhere). Seedream takes no negative prompt, so one given is not sent.

One image per call: ``num_outputs`` other than 1 is refused before any request, and so are
``stream`` and ``sequential_image_generation`` other than ``"disabled"``. Ark makes several images
only in its "sequential" mode, where ``sequential_image_generation_options.max_images`` is an upper
bound and the model decides how many it makes: an exact count cannot be asked for, and hookline
never delivers fewer images than were paid for.

Answer ``{"model", "created", "data": [{"url", "size"}], "usage"}``: ``succeeded`` with the
``data[].url`` outputs. The outcome's ``job_id`` is the answer's ``x-request-id`` header when it
matches ``callbacks.http.JOB_ID``, else ``<task id>-<attempt>-<8 random hex>`` (a SHA-256 prefix
stands for a task id outside the grammar): unique per call either way.

Errors, as HTTP answers ``{"error": {"code", "message", "param", "type"}}`` or inside a 200 (a
top-level ``error``, or a ``data`` entry carrying ``error`` instead of ``url``):

    401, Authentication*                          PermanentProviderError  provider_auth_failed
    *SensitiveContentDetected* (input text,
    input image, output image)                    PermanentProviderError  provider_moderated
    AccountOverdueError, QuotaExceeded,
    SetLimitExceeded, ModelNotOpen,
    OperationDenied.Service*                      PermanentProviderError  provider_account
    429, RateLimitExceeded*, ServerOverloaded*    ProviderRateLimited     (Retry-After when sent)
    5xx, 408                                      RetryableProviderError
    other 4xx (InvalidParameter…)                 PermanentProviderError  provider_rejected

``submit`` and ``poll`` raise ``PermanentProviderError`` (there are no jobs), ``cancel`` does
nothing, and ``verify`` refuses every delivery (``no_webhooks``).

The model grammar (``validate_model``): ``doubao-seedream-…`` or ``doubao-seededit-…`` followed by
``-``-separated runs of lowercase ASCII letters and digits (``doubao-seedream-4-0-250828``,
``doubao-seedream-3-0-t2i-250415``, ``doubao-seededit-3-0-i2i-250628``), or an inference endpoint
id ``ep-…`` (``ep-20250828123456-abcde``), at most 64 characters. The model goes in the body only.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any, Final

import httpx

from callbacks.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.http import (
    IMAGE_KEY_PARAM,
    IMAGES_KEY_PARAM,
    JOB_ID,
    error_body,
    error_status,
    expect_object,
    model_name,
    output_urls,
    request_answer,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission

DEFAULT_BASE_URL = "https://ark.cn-beijing.volces.com/api/v3"
DEFAULT_MODEL = "doubao-seedream-4-0-250828"
ROUTE: Final = ("images", "generations")
DEFAULT_TIMEOUT_S: Final = 120.0
MAX_INPUTS: Final = 14

# Inputs: jpeg or png for every Seedream/SeedEdit model (4.0 also takes webp, bmp, tiff, gif), at
# most 10 MB, sides over 14 px, aspect ratio within 1/16..16. 2048 px keeps a data URI well
# under 10 MB.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG"), accepts_data_uri=True)
# PROVIDERS.md lists no published limits for Seedream: none by default (the operator may set them
# with HOOKLINE_PROVIDER_QUOTAS).
QUOTA = Quota()

MODEL: Final = re.compile(r"(?:doubao-(?:seedream|seededit)|ep)(?:-[a-z0-9]+){1,8}")
MODEL_MAX_CHARS: Final = 64

_AUTH = ("Authentication",)
_ACCOUNT = (
    "AccountOverdueError",
    "QuotaExceeded",
    "SetLimitExceeded",
    "ModelNotOpen",
    "OperationDenied.Service",
)
_RATE_LIMITED = ("RateLimitExceeded", "ServerOverloaded")
_REFUSED = ("InvalidParameter", "MissingParameter", "InvalidEndpointOrModel", "InvalidImage")


def validate_model(model: str, *, provider: str = "seedream") -> str:
    """``model`` if the grammar takes it (module docstring), else ``InvalidModel`` (pure)."""
    return model_name(model, provider=provider, segment=MODEL, max_chars=MODEL_MAX_CHARS)


def ark_error(
    code: str,
    message: str,
    *,
    provider: str,
    status: int | None = None,
    details: Mapping[str, Any] | None = None,
    retry_after_s: float | None = None,
) -> ProviderError:
    """The error for Ark's ``code`` (and the HTTP ``status``, when there was one)."""
    text = f"{provider}: {code}: {message}"
    info = {**(details or {}), "provider": provider, "ark_code": code}
    if status == 401 or code.startswith(_AUTH):
        return PermanentProviderError(text, code="provider_auth_failed", details=info)
    if "SensitiveContentDetected" in code:
        return PermanentProviderError(text, code="provider_moderated", details=info)
    if code.startswith(_ACCOUNT):
        return PermanentProviderError(text, code="provider_account", details=info)
    if status == 429 or code.startswith(_RATE_LIMITED):
        return ProviderRateLimited(text, retry_after_s=retry_after_s, details=info)
    if status is not None and (status >= 500 or status == 408):
        return RetryableProviderError(text, details=info)
    if (status is not None and status >= 400) or code.startswith(_REFUSED):
        return PermanentProviderError(text, details=info)
    return RetryableProviderError(text, details=info)


def _ark_code(body: object) -> tuple[str, str] | None:
    """``(code, message)`` of an ``{"error": {...}}`` object, or None."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping) or not isinstance(error.get("code"), str):
        return None
    return error["code"], str(error.get("message") or "")


def job_id_for(request_id: str | None, submission: Submission) -> str:
    """The outcome's job id (module docstring): Ark's request id, or one of our own."""
    if request_id is not None and JOB_ID.fullmatch(request_id):
        return request_id
    base = f"{submission.task_id}-{submission.attempt}"
    if not JOB_ID.fullmatch(base + "-00000000"):
        base = hashlib.sha256(base.encode()).hexdigest()[:32]
    return f"{base}-{secrets.token_hex(4)}"


class SeedreamProvider:
    """The Provider port (and ``SyncProvider``) over Ark's image generation (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str = "seedream",
        limits: Limits = LIMITS,
        quota: Quota = QUOTA,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "sync"
        self.quota = quota
        self.timeout_s = timeout_s
        self._http = http
        self._url = base_url.rstrip("/") + url_path(*ROUTE)
        self._auth = {"Authorization": f"Bearer {api_key}"}

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    def request_body(self, submission: Submission) -> dict[str, Any]:
        """The ``images/generations`` body (module docstring); ``PermanentProviderError`` before
        any request for what cannot be asked of Seedream."""
        model = validate_model(submission.model, provider=self.name)
        if submission.num_outputs != 1:
            raise PermanentProviderError(
                f"{self.name}: one image per call (Ark's sequential mode decides the count itself)"
            )
        params = dict(submission.params)
        image_key = str(params.pop(IMAGE_KEY_PARAM, "image"))
        images_key = params.pop(IMAGES_KEY_PARAM, None)
        if params.get("sequential_image_generation", "disabled") != "disabled" or params.get(
            "stream"
        ):
            raise PermanentProviderError(
                f"{self.name}: sequential generation and streaming are not supported"
            )
        if len(submission.inputs) > MAX_INPUTS:
            raise PermanentProviderError(f"{self.name}: at most {MAX_INPUTS} input images")
        body: dict[str, Any] = {
            **params,
            "model": model,
            "prompt": submission.prompt,
            "response_format": "url",
        }
        inputs = list(submission.inputs)
        if images_key is not None and inputs:
            body[str(images_key)] = inputs
        elif len(inputs) == 1:
            body[image_key] = inputs[0]
        elif inputs:
            body[image_key] = inputs
        return body

    async def generate(self, submission: Submission) -> Outcome:
        """Make the image now: ``succeeded`` with its URL, or a ``ProviderError``."""
        answer, request_id = await self._post(self.request_body(submission))
        details = {"provider": self.name, "request_id": request_id}
        if (found := _ark_code(answer)) is not None:
            raise ark_error(*found, provider=self.name, details=details)
        data = answer.get("data")
        items = [i for i in data if isinstance(i, Mapping)] if isinstance(data, list) else []
        for item in items:
            if (failed := _ark_code(item)) is not None:
                raise ark_error(*failed, provider=self.name, details=details)
        urls = tuple(u for u in output_urls(items) if u.startswith(("https://", "http://")))
        if not urls:
            raise RetryableProviderError(f"{self.name}: answer without images", details=details)
        return Outcome("succeeded", job_id_for(request_id, submission), outputs=urls)

    async def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """One call with this adapter's timeout: the answer object and its ``x-request-id``;
        a refusal translated by status, refined by Ark's code (module docstring)."""
        try:
            answer, headers = await request_answer(
                self._http,
                "POST",
                self._url,
                provider=self.name,
                headers=self._auth,
                json=body,
                timeout_s=self.timeout_s,
            )
        except ProviderError as exc:
            found = _ark_code(error_body(exc))
            status = error_status(exc)
            if found is None or status is None:
                raise
            raise ark_error(
                *found,
                provider=self.name,
                status=status,
                details=exc.details,
                retry_after_s=getattr(exc, "retry_after_s", None),
            ) from exc
        request_id = headers.get("x-request-id")
        return expect_object(answer, provider=self.name, what="answer"), request_id

    async def submit(self, submission: Submission) -> str:
        raise PermanentProviderError(f"{self.name}: synchronous: use generate")

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Ark sends no webhooks: the answer is the outcome, so every delivery is refused."""
        raise WebhookRejected(f"{self.name} sends no webhooks", code="no_webhooks")

    async def poll(self, job_id: str, model: str) -> Outcome:
        """No jobs to ask about: a synchronous call's outcome came with its answer."""
        raise PermanentProviderError(f"{self.name}: synchronous: there is no job to ask about")

    async def cancel(self, job_id: str, model: str) -> None:
        """Nothing to cancel: the call ended when it answered."""

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Result URLs are pre-signed TOS URLs: no headers."""
        return {}
