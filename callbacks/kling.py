"""Kling AI image generation adapter (shared/PROVIDERS.md, "Kling AI image generation").

Auth: every request carries ``Authorization: Bearer <JWT>``, an HS256 token signed with the secret
key, header ``{"alg": "HS256", "typ": "JWT"}``, claims ``{"iss": <access key>, "exp": now + 1800,
"nbf": now - 5}``. The token is cached and made anew when less than five minutes of it are left
(on the adapter's clock); an answer with code 1004 (token expired: the provider's clock is ahead of
ours) makes a new token at once and the request is sent once more.

Submit: ``POST {base}/v1/images/generations`` with ``model_name``, ``prompt``, ``n`` (1–9),
``callback_url``, ``external_task_id``, the task's params (e.g. ``aspect_ratio``, ``resolution``,
``image_reference``), the negative prompt (text-to-image only: Kling takes none with an input
image, so it is left out then) and at most one input image as ``image``: a URL as given, a data URI
as its raw base64 (Kling refuses the ``data:`` prefix).

``external_task_id`` is ``hl-<task id>-<attempt>`` (a task id outside ``[A-Za-z0-9_-]{1,64}`` is
replaced by a SHA-256 prefix of it), so the same attempt always names the same Kling task. Kling
refuses a reused one; a submit of an attempt that already reached Kling (a crash between the
submit and the record of the job id) is therefore refused, and on a parameter refusal (code
1200/1201: the refusal of a reused id is not documented, these are its nearest codes) the adapter
asks ``GET {base}/v1/images/generations/{external_task_id}`` and, when that task carries our
``external_task_id``, returns its task id instead of paying for a second job. The query form is
the official text's ("task_id or external_task_id, directly in the request path"); other copies of
the docs show ``?external_task_id=`` on the list route.

Callbacks: Kling POSTs the task object (bare, or in the ``{code, message, request_id, data}``
envelope: both are accepted) to ``callback_url`` on each status change, **unsigned**: ``verify``
only parses it (``arrival`` "trigger"); the per-task token in our callback URL authenticates it
and the outcome always comes from a query (``poll``). Delivery id:
``<task_id>:<task_status>:<updated_at>``.

Statuses: ``submitted``/``processing`` run; ``succeed`` succeeded with ``task_result.images[].url``
in ``index`` order (kept 30 days); ``failed`` failed, with ``task_status_msg`` as the reason,
retryable unless the message names a content or input problem (``is_input_error``, or Kling's
"risk control"); a task Kling does not know (HTTP 404 / code 1203) is a retryable failure.

Errors, whether as an HTTP error or as a 200 whose ``code`` is not 0, by Kling's code:

    1000–1003, 1004 twice        PermanentProviderError  provider_auth_failed
    1100–1103, 1304              PermanentProviderError  provider_account (account, arrears,
                                                         resource pack, permission, IP list)
    1200–1203, 1300              PermanentProviderError  provider_rejected
    1301                         PermanentProviderError  provider_moderated
    1302, 1303                   ProviderRateLimited     (Retry-After when sent; 1303: more tasks
                                                         in flight than the resource pack allows)
    5000–5002                    RetryableProviderError
    anything else                by the HTTP status (callbacks/http.py)

Not supported: cancelling (Kling has no cancel API: ``cancel`` is a no-op and the task runs out).

The model grammar (``validate_model``): ``kling-v<major>[-<minor>][-<variant>]`` in lowercase ASCII
(``kling-v1``, ``kling-v1-5``, ``kling-v2``, ``kling-v2-new``, ``kling-v2-1``). The model goes in
the body only, never in a path. Task ids (from answers and callbacks) must match
``callbacks.http.JOB_ID`` before they go into the query path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import jwt

from callbacks.errors import (
    InvalidJobId,
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
    error_body,
    error_status,
    expect_object,
    is_input_error,
    parse_json,
    request_json,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission
from statemachine import clock

DEFAULT_BASE_URL = "https://api-singapore.klingai.com"
DEFAULT_MODEL = "kling-v2-1"  # for settings: the model a task gets when it names none
ROUTE: Final = ("v1", "images", "generations")

TOKEN_TTL_S: Final = 1800
TOKEN_NBF_SKEW_S: Final = 5
TOKEN_RENEW_BEFORE_S: Final = 300
MAX_OUTPUTS: Final = 9

# Inputs: .jpg/.jpeg/.png up to 10 MB, each side at least 300 px, aspect ratio 1:2.5 to 2.5:1, as
# a URL or raw base64 (data URIs are sent as their base64). 2048 px keeps a PNG well under 10 MB.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG"), accepts_data_uri=True)

# No request rate is published ("the system imposes no QPS limit"); the concurrency is the
# resource pack's (an image task holds ``n`` of it), so no default either: 1303 says when.
QUOTA = Quota()

MODEL = re.compile(r"kling-v[0-9]{1,2}(?:-[0-9]{1,2})?(?:-[a-z]{2,12})?")
_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RISK_CONTROL = re.compile(r"risk.?control|content security|illegal", re.IGNORECASE)

# Kling's codes (module docstring).
TOKEN_EXPIRED: Final = 1004
AUTH_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1004})
ACCOUNT_CODES: Final = frozenset({1100, 1101, 1102, 1103, 1304})
PARAM_CODES: Final = frozenset({1200, 1201, 1202, 1203, 1300})
DUPLICATE_CANDIDATES: Final = frozenset({1200, 1201})
NOT_FOUND: Final = 1203
MODERATED: Final = 1301
RATE_CODES: Final = frozenset({1302, 1303})
SERVER_CODES: Final = frozenset({5000, 5001, 5002})


def validate_model(model: str, *, provider: str = "kling") -> str:
    """``model`` if the grammar takes it (module docstring), else ``InvalidModel`` (pure)."""
    if isinstance(model, str) and MODEL.fullmatch(model):
        return model
    shown = model[:80] if isinstance(model, str) else type(model).__name__
    raise InvalidModel(
        f"{provider}: model {shown!r} is not a Kling model name (kling-v<n>[-<n>][-<variant>])",
        details={"provider": provider},
    )


def external_task_id(task_id: str, attempt: int) -> str:
    """The ``external_task_id`` of one attempt of one task: the same for a repeated submit."""
    if _SAFE_TASK_ID.fullmatch(task_id):
        return f"hl-{task_id}-{attempt}"
    return f"hl-x{hashlib.sha256(task_id.encode()).hexdigest()[:40]}-{attempt}"


def raw_base64(image: str) -> str:
    """An input for Kling's ``image``: a URL as it is, a data URI as its base64 alone."""
    if image.startswith("data:"):
        _, _, data = image.partition(",")
        return data
    return image


class _TokenExpired(Exception):
    """Kling's 1004 on a cached token: make a new one and send the call once more."""


def _code(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def kling_error(
    code: int, message: str, provider: str, details: Mapping[str, Any] | None = None
) -> ProviderError | None:
    """The error for Kling's ``code`` (module docstring), or None for a code not mapped here."""
    text = f"{provider}: Kling code {code}: {message}"
    info = {**(details or {}), "provider": provider, "kling_code": code}
    if code in AUTH_CODES:
        return PermanentProviderError(text, code="provider_auth_failed", details=info)
    if code in ACCOUNT_CODES:
        return PermanentProviderError(text, code="provider_account", details=info)
    if code == MODERATED:
        return PermanentProviderError(text, code="provider_moderated", details=info)
    if code in PARAM_CODES:
        return PermanentProviderError(text, details=info)
    if code in RATE_CODES:
        retry_after = info.get("retry_after_s")
        retry_after_s = float(retry_after) if isinstance(retry_after, int | float) else None
        return ProviderRateLimited(text, retry_after_s=retry_after_s, details=info)
    if code in SERVER_CODES:
        return RetryableProviderError(text, details=info)
    return None


def _error_body(exc: ProviderError) -> tuple[int | None, str]:
    """Kling's ``code`` and ``message`` from a translated HTTP error's body snippet."""
    body = error_body(exc)
    if not isinstance(body, dict):
        return None, ""
    return _code(body.get("code")), str(body.get("message") or "")


def task_outcome(task: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome a task object (a query's ``data``) describes."""
    status = task.get("task_status")
    message = task.get("task_status_msg")
    reason = str(message) if message else None
    if status in ("submitted", "processing"):
        return Outcome("running", job_id)
    if status == "succeed":
        result = task.get("task_result")
        images = result.get("images") if isinstance(result, Mapping) else None
        items = [i for i in images if isinstance(i, Mapping)] if isinstance(images, list) else []
        items.sort(key=lambda i: i["index"] if isinstance(_code(i.get("index")), int) else 99)
        urls = tuple(
            i["url"] for i in items if isinstance(i.get("url"), str) and i["url"].startswith("http")
        )
        if not urls:
            return Outcome("failed", job_id, reason="succeed without images")
        return Outcome("succeeded", job_id, outputs=urls)
    if status == "failed":
        reason = reason or "task failed"
        refused = is_input_error(reason) or _RISK_CONTROL.search(reason) is not None
        return Outcome("failed", job_id, reason=reason, retryable=not refused)
    return Outcome("running", job_id, reason=f"unknown status {status!r}")


def parse_callback(body: bytes, *, provider: str = "kling") -> dict[str, Any]:
    """A callback body as a task object (bare or enveloped), its ``task_id`` in the grammar; else
    ``WebhookRejected(malformed_body)``."""
    try:
        parsed = parse_json(body)
    except (ValueError, RecursionError) as exc:  # too deep is malformed too
        raise WebhookRejected("body is not JSON", code="malformed_body") from exc
    if (
        isinstance(parsed, dict)
        and "task_id" not in parsed
        and isinstance(parsed.get("data"), dict)
    ):
        parsed = parsed["data"]
    if not isinstance(parsed, dict) or not isinstance(parsed.get("task_id"), str):
        raise WebhookRejected("body is not a Kling task", code="malformed_body")
    try:
        checked_job_id(parsed["task_id"], provider=provider)
    except InvalidJobId as exc:
        raise WebhookRejected(exc.message, code="malformed_body") from exc
    return parsed


class KlingProvider:
    """The Provider port over Kling's image generation API (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        access_key: str,
        secret_key: str,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "kling",
        limits: Limits = LIMITS,
        quota: Quota = QUOTA,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "trigger"
        self.quota = quota
        self._http = http
        self._base = base_url.rstrip("/")
        self._access_key = access_key
        self._secret_key = secret_key
        self._now = now  # None: statemachine.clock.now, looked up per call (tests patch it)
        self._token: str | None = None
        self._token_exp = 0.0

    # -- auth -----------------------------------------------------------------------------------

    def api_token(self, *, renew: bool = False) -> str:
        """The cached JWT, made anew when asked or when under five minutes of it are left."""
        now = self._now() if self._now is not None else clock.now()
        if renew or self._token is None or self._token_exp - now < TOKEN_RENEW_BEFORE_S:
            issued = int(now)
            claims = {
                "iss": self._access_key,
                "exp": issued + TOKEN_TTL_S,
                "nbf": issued - TOKEN_NBF_SKEW_S,
            }
            self._token = jwt.encode(
                claims, self._secret_key, algorithm="HS256", headers={"typ": "JWT"}
            )
            self._token_exp = float(issued + TOKEN_TTL_S)
        return self._token

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One API call, Kling's code translated; a token Kling calls expired (1004: its clock
        is ahead of ours) is made anew once and the call sent again."""
        try:
            return await self._send(method, path, body, renewed=False)
        except _TokenExpired:
            return await self._send(method, path, body, renewed=True)

    async def _send(self, method: str, path: str, body: Any, *, renewed: bool) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_token(renew=renewed)}"}
        try:
            data = await request_json(
                self._http,
                method,
                self._base + path,
                provider=self.name,
                headers=headers,
                json=body,
            )
        except ProviderError as exc:
            code, message = _error_body(exc)
            if code == TOKEN_EXPIRED and not renewed:
                raise _TokenExpired from exc
            details = exc.details if isinstance(exc.details, Mapping) else None
            mapped = None if code is None else kling_error(code, message, self.name, details)
            if mapped is None:
                raise
            raise mapped from exc
        answer = expect_object(data, provider=self.name, what=f"{method} answer")
        code = _code(answer.get("code"))
        if code == 0:
            return answer
        if code == TOKEN_EXPIRED and not renewed:
            raise _TokenExpired
        message = str(answer.get("message") or "")
        details = {"provider": self.name, "status": 200, "method": method, "body": str(answer)}
        details["body"] = details["body"][:500]
        if code is None:
            raise RetryableProviderError(f"{self.name}: answer without a code", details=details)
        mapped = kling_error(code, message, self.name, details)
        raise mapped or RetryableProviderError(
            f"{self.name}: Kling code {code}: {message}", details={**details, "kling_code": code}
        )

    # -- the port -------------------------------------------------------------------------------

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    def submit_body(self, submission: Submission) -> dict[str, Any]:
        """The submit body (module docstring); ``PermanentProviderError`` before any request for
        what Kling would refuse anyway."""
        model = validate_model(submission.model, provider=self.name)
        if not 1 <= submission.num_outputs <= MAX_OUTPUTS:
            raise PermanentProviderError(f"{self.name}: n must be 1 to {MAX_OUTPUTS}")
        if len(submission.inputs) > 1:
            raise PermanentProviderError(f"{self.name}: one input image per request, not more")
        params = {
            k: v
            for k, v in submission.params.items()
            if k not in (IMAGE_KEY_PARAM, IMAGES_KEY_PARAM)
        }
        body: dict[str, Any] = {**params, "model_name": model, "prompt": submission.prompt}
        if submission.inputs:
            body["image"] = raw_base64(submission.inputs[0])
        elif submission.negative_prompt is not None:
            body["negative_prompt"] = submission.negative_prompt
        body["n"] = submission.num_outputs
        body["callback_url"] = submission.callback_url
        body["external_task_id"] = external_task_id(submission.task_id, submission.attempt)
        return body

    async def submit(self, submission: Submission) -> str:
        body = self.submit_body(submission)
        try:
            answer = await self._call("POST", url_path(*ROUTE), body)
        except PermanentProviderError as exc:
            details = exc.details if isinstance(exc.details, Mapping) else {}
            if details.get("kling_code") not in DUPLICATE_CANDIDATES:
                raise
            existing = await self._existing(body["external_task_id"])
            if existing is None:
                raise
            return existing
        return self._task_id(answer)

    def _task_id(self, answer: Mapping[str, Any]) -> str:
        data = answer.get("data")
        task_id = data.get("task_id") if isinstance(data, Mapping) else None
        if not isinstance(task_id, str) or not task_id:
            raise RetryableProviderError(f"{self.name}: answer without a task_id")
        return checked_job_id(task_id, provider=self.name)

    async def _existing(self, external_id: str) -> str | None:
        """The task id of the task submitted with ``external_id``, if Kling has one."""
        try:
            answer = await self._call("GET", url_path(*ROUTE, external_id))
        except PermanentProviderError:
            return None  # not found (or refused): the original refusal stands
        data = answer.get("data")
        info = data.get("task_info") if isinstance(data, Mapping) else None
        if not isinstance(info, Mapping) or info.get("external_task_id") != external_id:
            return None
        return self._task_id(answer)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """A trigger: Kling's callbacks are unsigned; the receiver confirms with ``poll``."""
        task = parse_callback(body, provider=self.name)
        status = task.get("task_status")
        updated = task.get("updated_at")
        status_part = status if isinstance(status, str) else ""
        updated_part = str(updated) if isinstance(_code(updated), int) else ""
        job_id = task["task_id"]
        return Delivery(f"{job_id}:{status_part}:{updated_part}", job_id, None)

    async def poll(self, job_id: str, model: str) -> Outcome:
        """``GET /v1/images/generations/{task_id}``; an answer about another task is the
        provider misbehaving (retryable), never passed off as this job's outcome."""
        path = url_path(*ROUTE, checked_job_id(job_id, provider=self.name))
        try:
            answer = await self._call("GET", path)
        except PermanentProviderError as exc:
            details = exc.details if isinstance(exc.details, Mapping) else {}
            if details.get("kling_code") == NOT_FOUND or error_status(exc) == 404:
                return Outcome("failed", job_id, reason="task not found")
            raise
        data = answer.get("data")
        if not isinstance(data, Mapping):
            raise RetryableProviderError(f"{self.name}: query answer without data")
        if data.get("task_id") != job_id:
            raise RetryableProviderError(f"{self.name}: query of {job_id} answered another task")
        return task_outcome(data, job_id)

    async def cancel(self, job_id: str, model: str) -> None:
        """Kling has no cancel API: the task runs out and its result is ignored."""

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Kling's image URLs are public CDN URLs: no headers."""
        return {}
