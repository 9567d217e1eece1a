"""Tencent Cloud Hunyuan image generation adapter (shared/PROVIDERS.md, "Tencent Cloud Hunyuan").

Every call is ``POST {base}/`` (JSON) with ``X-TC-Action`` (``SubmitHunyuanImageJob`` or
``QueryHunyuanImageJob``), ``X-TC-Version: 2023-09-01``, ``X-TC-Region``, ``X-TC-Timestamp`` and a
TC3-HMAC-SHA256 ``Authorization`` over the exact bytes sent (``tc3_authorization``: the canonical
request of PROVIDERS.md, ``SignedHeaders=content-type;host``). ``Host`` is the configured base
URL's host (with its port when not the default, e.g. a fake on 127.0.0.1). The timestamp comes from
the injectable ``now`` (Tencent refuses requests more than 5 minutes off its clock).

Signed by hand, not through the official SDK (``tencentcloud-sdk-python-hunyuan``): its asyncio
client makes its own ``httpx.AsyncClient`` (ours cannot be shared), depends on ``requests``, has no
type hints, takes the timestamp from ``time.time()`` inside the signer, and its circuit breaker
switches to a backup endpoint on failures (not the configured base URL). A test checks that our
Authorization equals the SDK's own signer's for the same request.

Submit body: the task's params as Hunyuan names them (``Style``, ``Resolution``, ``Revise``,
``Seed``, ``LogoAdd``, ``Clarity``…), then ``Prompt``, ``NegativePrompt``, ``Num`` (1–4) and at
most one input image as ``ContentImage``: ``{"ImageUrl"}`` for a URL, ``{"ImageBase64"}`` (the raw
base64 of a data URI) otherwise. Answer ``{"Response": {"JobId", "RequestId"}}``.

Query ``{"JobId"}``: ``JobStatusCode`` ``"1"`` queued and ``"2"`` running; ``"5"`` succeeded with
``ResultImage`` (URLs valid **1 hour**: downloaded at once); ``"4"`` failed with ``JobErrorCode``,
retryable unless that code names a refusal (moderation, parameters, the account) or
``JobErrorMsg`` an input problem. A job Tencent does not know (``ResourceNotFound``) is a
retryable failure. ``ResultDetails`` entries other than ``Success`` (images the job could not make)
are named in the outcome's reason; a success with fewer images than were asked for is retried by
the outcome rules (statemachine/rules.py: never fewer images than were paid for).

Errors come as HTTP 200 with ``Response.Error`` (``tencent_error``):

    AuthFailure.*                                   PermanentProviderError  provider_auth_failed
    RequestLimitExceeded*, LimitExceeded*,
    FailedOperation.EngineServerLimitExceeded       ProviderRateLimited
    OperationDenied.TextIllegalDetected /
    ImageIllegalDetected                            PermanentProviderError  provider_moderated
    FailedOperation.(Free)ResourcePackExhausted,
    FailedOperation.Service*, ResourceUnavailable.*,
    ResourceInsufficient.*                          PermanentProviderError  provider_account
    InvalidParameter*, MissingParameter,
    UnknownParameter, UnsupportedOperation,
    UnsupportedRegion, InvalidAction, NoSuchVersion,
    ResourceNotFound, other OperationDenied.*,
    FailedOperation.ImageDecodeFailed               PermanentProviderError  provider_rejected
    InternalError*, any other code                  RetryableProviderError

HTTP errors (5xx, timeouts) are translated by callbacks/http.py.

Not supported: callbacks (``arrival`` "poll": ``verify`` refuses every delivery) and cancelling
(no cancel API: ``cancel`` is a no-op and the job runs out).

The model: ``SubmitHunyuanImageJob`` has no model field, so the grammar is the one name
``hunyuan-image``; the style is a param (``Style``), not part of the model. The model reaches no
URL and no body. Job ids (from answers) must match ``callbacks.http.JOB_ID``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import orjson

from callbacks.errors import (
    InvalidModel,
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.http import (
    IMAGE_KEY_PARAM,
    IMAGES_KEY_PARAM,
    checked_job_id,
    expect_object,
    is_input_error,
    request_json,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission
from statemachine import clock

DEFAULT_BASE_URL = "https://hunyuan.tencentcloudapi.com"
DEFAULT_REGION = "ap-guangzhou"
MODEL: Final = "hunyuan-image"
SERVICE: Final = "hunyuan"
VERSION: Final = "2023-09-01"
SUBMIT: Final = "SubmitHunyuanImageJob"
QUERY: Final = "QueryHunyuanImageJob"
CONTENT_TYPE: Final = "application/json"
ALGORITHM: Final = "TC3-HMAC-SHA256"
MAX_OUTPUTS: Final = 4

# ContentImage: each side under 5000 px, under 8 MB as base64, jpg/jpeg/png. Outputs are at most
# 1280 px on the long side before super-resolution, so 2048 px loses nothing.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG"), accepts_data_uri=True)

# Published: 1 job in flight by default and 20 requests/s for the API, submits and queries alike.
# With one job at a time, submits are few (a second one in flight is refused anyway): 5/s for
# them and 15/s for queries keep the sum at the published 20.
QUOTA = Quota(submits_per_s=5.0, polls_per_s=15.0, concurrency=1)

MODERATED: Final = frozenset(
    {"OperationDenied.TextIllegalDetected", "OperationDenied.ImageIllegalDetected"}
)
_RATE_LIMITED = (
    "RequestLimitExceeded",
    "LimitExceeded",
    "FailedOperation.EngineServerLimitExceeded",
)
_ACCOUNT = (
    "FailedOperation.ResourcePackExhausted",
    "FailedOperation.FreeResourcePackExhausted",
    "FailedOperation.ServiceNotActivated",
    "FailedOperation.ServiceStop",
    "FailedOperation.UserUnAuthError",
    "FailedOperation.PartnerAccountUnSupport",
    "ResourceUnavailable",
    "ResourceInsufficient",
)
_REJECTED = (
    "InvalidParameter",
    "MissingParameter",
    "UnknownParameter",
    "UnsupportedOperation",
    "UnauthorizedOperation",
    "InvalidAction",
    "NoSuchVersion",
    "UnsupportedRegion",
    "OperationDenied",
    "ResourceNotFound",
    "FailedOperation.ImageDecodeFailed",
)
NOT_FOUND: Final = "ResourceNotFound"


def validate_model(model: str, *, provider: str = "hunyuan") -> str:
    """``model`` if it is ``hunyuan-image``, else ``InvalidModel`` (pure)."""
    if model == MODEL:
        return model
    shown = model[:80] if isinstance(model, str) else type(model).__name__
    raise InvalidModel(
        f"{provider}: model {shown!r} is not {MODEL!r} (the style is the Style param)",
        details={"provider": provider},
    )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def tc3_authorization(
    *,
    secret_id: str,
    secret_key: str,
    host: str,
    body: bytes,
    timestamp: int,
    service: str = SERVICE,
    content_type: str = CONTENT_TYPE,
) -> str:
    """The ``Authorization`` header of a ``POST /`` with ``body`` (PROVIDERS.md, "Signing")."""
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    canonical_request = "\n".join(
        [
            "POST",
            "/",
            "",
            f"content-type:{content_type}\nhost:{host}\n",
            "content-type;host",
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = "\n".join(
        [ALGORITHM, str(timestamp), scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(_hmac(_hmac(("TC3" + secret_key).encode(), date), service), "tc3_request")
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"{ALGORITHM} Credential={secret_id}/{scope}, "
        f"SignedHeaders=content-type;host, Signature={signature}"
    )


def _is(code: str, names: tuple[str, ...]) -> bool:
    """Whether ``code`` is one of ``names`` or under one (``InvalidParameterValue.Model``)."""
    return code.startswith(names)


def tencent_error(
    code: str, message: str, provider: str, details: Mapping[str, Any] | None = None
) -> ProviderError:
    """The error for a ``Response.Error`` code (module docstring)."""
    text = f"{provider}: {code}: {message}"
    info = {**(details or {}), "provider": provider, "tencent_code": code}
    if code.startswith("AuthFailure"):
        return PermanentProviderError(text, code="provider_auth_failed", details=info)
    if _is(code, _RATE_LIMITED):
        return ProviderRateLimited(text, details=info)
    if code in MODERATED:
        return PermanentProviderError(text, code="provider_moderated", details=info)
    if _is(code, _ACCOUNT):
        return PermanentProviderError(text, code="provider_account", details=info)
    if _is(code, _REJECTED):
        return PermanentProviderError(text, details=info)
    return RetryableProviderError(text, details=info)


def job_outcome(answer: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome a ``QueryHunyuanImageJob`` ``Response`` describes."""
    status = answer.get("JobStatusCode")
    if status in ("1", "2"):
        return Outcome("running", job_id)
    if status == "5":
        images = answer.get("ResultImage")
        urls = tuple(u for u in (images if isinstance(images, list) else []) if _https_or_http(u))
        if not urls:
            return Outcome("failed", job_id, reason="done without result images")
        details = answer.get("ResultDetails")
        missed = [d for d in details if d != "Success"] if isinstance(details, list) else []
        reason = (
            f"{len(missed)} image(s) not made: {', '.join(map(str, missed))}" if missed else None
        )
        return Outcome("succeeded", job_id, outputs=urls, reason=reason)
    if status == "4":
        code = str(answer.get("JobErrorCode") or "FailedOperation.GenerateImageFailed")
        message = str(answer.get("JobErrorMsg") or answer.get("JobStatusMsg") or "")
        refused = not tencent_error(code, message, "hunyuan").retryable or is_input_error(message)
        return Outcome("failed", job_id, reason=f"{code}: {message}", retryable=not refused)
    return Outcome("running", job_id, reason=f"unknown JobStatusCode {status!r}")


def _https_or_http(url: object) -> bool:
    return isinstance(url, str) and url.startswith(("https://", "http://"))


def image_input(image: str) -> dict[str, str]:
    """``ContentImage`` for an input: its URL, or the raw base64 of a data URI."""
    if image.startswith("data:"):
        return {"ImageBase64": image.partition(",")[2]}
    return {"ImageUrl": image}


class HunyuanProvider:
    """The Provider port over Hunyuan's image job API (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        secret_id: str,
        secret_key: str,
        base_url: str = DEFAULT_BASE_URL,
        region: str = DEFAULT_REGION,
        name: str = "hunyuan",
        limits: Limits = LIMITS,
        quota: Quota = QUOTA,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "poll"
        self.quota = quota
        self._http = http
        self._url = base_url.rstrip("/") + "/"
        self._host = httpx.URL(self._url).netloc.decode("ascii")
        self._secret_id = secret_id
        self._secret_key = secret_key
        self._region = region
        self._now = now  # None: statemachine.clock.now, looked up per call (tests patch it)

    def signed_headers(self, action: str, body: bytes) -> dict[str, str]:
        """The headers of one call whose body is ``body``, signed now."""
        timestamp = int(self._now() if self._now is not None else clock.now())
        authorization = tc3_authorization(
            secret_id=self._secret_id,
            secret_key=self._secret_key,
            host=self._host,
            body=body,
            timestamp=timestamp,
        )
        return {
            "Authorization": authorization,
            "Content-Type": CONTENT_TYPE,
            "Host": self._host,
            "X-TC-Action": action,
            "X-TC-Version": VERSION,
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Region": self._region,
        }

    async def _call(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """One signed call; the ``Response`` object, or the error its ``Error`` names."""
        # request_json sends orjson.dumps(body): the same bytes as these, which are signed
        headers = self.signed_headers(action, orjson.dumps(body))
        data = await request_json(
            self._http, "POST", self._url, provider=self.name, headers=headers, json=body
        )
        answer = expect_object(data, provider=self.name, what=f"{action} answer")
        response = expect_object(answer.get("Response"), provider=self.name, what="Response")
        if "Error" in response:
            error = response["Error"] if isinstance(response["Error"], Mapping) else {}
            code, message = str(error.get("Code") or "InternalError"), str(error.get("Message"))
            details = {"action": action, "request_id": response.get("RequestId")}
            raise tencent_error(code, message, self.name, details)
        return response

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    def submit_body(self, submission: Submission) -> dict[str, Any]:
        """The ``SubmitHunyuanImageJob`` body (module docstring); ``PermanentProviderError``
        before any request for what Hunyuan would refuse anyway."""
        validate_model(submission.model, provider=self.name)
        if not 1 <= submission.num_outputs <= MAX_OUTPUTS:
            raise PermanentProviderError(f"{self.name}: Num must be 1 to {MAX_OUTPUTS}")
        if len(submission.inputs) > 1:
            raise PermanentProviderError(f"{self.name}: one input image per job, not more")
        body: dict[str, Any] = {
            k: v
            for k, v in submission.params.items()
            if k not in (IMAGE_KEY_PARAM, IMAGES_KEY_PARAM)
        }
        body["Prompt"] = submission.prompt
        if submission.negative_prompt is not None:
            body["NegativePrompt"] = submission.negative_prompt
        body["Num"] = submission.num_outputs
        if submission.inputs:
            body["ContentImage"] = image_input(submission.inputs[0])
        return body

    async def submit(self, submission: Submission) -> str:
        response = await self._call(SUBMIT, self.submit_body(submission))
        job_id = response.get("JobId")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableProviderError(f"{self.name}: answer without a JobId")
        return checked_job_id(job_id, provider=self.name)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Hunyuan sends no callbacks: outcomes come by polling, so every delivery is refused."""
        raise WebhookRejected(f"{self.name} sends no callbacks", code="no_callbacks")

    async def poll(self, job_id: str, model: str) -> Outcome:
        """``QueryHunyuanImageJob``; a job Tencent does not know is a retryable failure."""
        checked_job_id(job_id, provider=self.name)
        try:
            response = await self._call(QUERY, {"JobId": job_id})
        except PermanentProviderError as exc:
            details = exc.details if isinstance(exc.details, Mapping) else {}
            if details.get("tencent_code") == NOT_FOUND:
                return Outcome("failed", job_id, reason="job not found")
            raise
        return job_outcome(response, job_id)

    async def cancel(self, job_id: str, model: str) -> None:
        """Hunyuan has no cancel API: the job runs out and its result is ignored."""

    def fetch_headers(self, url: str) -> dict[str, str]:
        """``ResultImage`` URLs are pre-signed: no headers."""
        return {}
