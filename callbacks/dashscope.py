"""Alibaba DashScope (Model Studio) Wan image synthesis adapter (shared/PROVIDERS.md, "Alibaba
DashScope / Model Studio").

Regions: ``DEFAULT_BASE_URL`` is Beijing, ``INTL_BASE_URL`` Singapore (``REGION_BASE_URLS``); API
keys are per region, so the base URL and the key are configured together. Every call carries
``Authorization: Bearer <key>``; submits also ``X-DashScope-Async: enable`` (DashScope refuses a
synchronous call to these models).

Submit: ``POST {base}/services/aigc/text2image/image-synthesis``, or, for an image-edit model (its
name contains ``imageedit``, or starts with ``wan2.5-i2i``: the SDK's own rule),
``POST {base}/services/aigc/image2image/image-synthesis``. Body ``{"model", "input",
"parameters"}``: ``input`` holds the prompt, the negative prompt, the task's params that are input
fields (``function``, ``ref_img``, ``base_image_url``, ``mask_image_url``, ``sketch_image_url``,
``images``) and the input images; every other param goes in ``parameters``, with ``n`` (1–4) the
output count. Input images, as URLs or data URIs (``data:<type>;base64,…``, which the Wan models
take in place of a URL):

    wan2.5-i2i*     every input, as the list ``images`` (at most 3)
    *imageedit*     the first as ``base_image_url``, a second as ``mask_image_url``; ``function``
                    defaults to ``description_edit`` (``description_edit_with_mask`` with a mask)
    text-to-image   at most one, as ``ref_img`` (wanx-v1's reference image)

(the ``image_key``/``images_key`` params of callbacks/http.py steer them elsewhere). Answer
``{"request_id", "output": {"task_id", "task_status": "PENDING"}}``.

Poll ``GET {base}/tasks/{task_id}``, by ``output.task_status``:

    PENDING, RUNNING, SUSPENDED   running
    SUCCEEDED                     succeeded with ``results[].url`` (kept 24 h: downloaded at once)
                                  when every entry has one; see "partial failure"
    FAILED                        failed with ``output.code: message``; not retryable for a
                                  refusal (moderation, parameters) or a message naming an input
                                  problem, retryable otherwise
    CANCELED                      cancelled
    UNKNOWN                       ``PermanentProviderError`` (code ``provider_job_unknown``): the
                                  id is unknown or expired, the job is gone

Partial failure: DashScope may answer ``SUCCEEDED`` with some ``results`` entries failed
(``{"code", "message"}`` instead of ``url``, ``task_metrics.FAILED`` > 0) and bill only the images
it made. Hookline never delivers fewer images than were paid for: such a task is reported
``failed``, the failed entries' codes and messages in the reason, retryable (the next attempt asks
for all of them again) unless a failed entry is a moderation refusal (``DataInspectionFailed``,
``IPInfringementSuspect``): a retry would be refused again.

Errors, as HTTP answers ``{"request_id", "code", "message"}`` or, in a 2xx submit answer without a
task id, its ``code``:

    401, InvalidApiKey                           PermanentProviderError  provider_auth_failed
    429, Throttling*                             ProviderRateLimited     (Retry-After when sent)
    DataInspectionFailed, IPInfringementSuspect  PermanentProviderError  provider_moderated
    Arrearage, AccessDenied.Unpurchased,
    AllocationQuota.FreeTierOnly                 PermanentProviderError  provider_account
    other 4xx (InvalidParameter, AccessDenied…)  PermanentProviderError  provider_rejected
    5xx (503/504 happen on the poll route)       RetryableProviderError

Cancel: ``POST {base}/tasks/{task_id}/cancel``, which DashScope allows only while the task is
``PENDING``. A cancel it refuses because the task is past that (400 ``UnsupportedOperation``, or a
message naming ``PENDING``) is logged at info level and not raised: the task runs out and its
result is ignored; any other failure is raised (the caller logs it).

Not supported: callbacks (DashScope has none: ``arrival`` "poll", ``verify`` refuses every
delivery with ``no_webhooks``).

The model grammar (``validate_model``): a lowercase ASCII letter, then runs of lowercase letters
and digits joined by single ``.`` or ``-`` (``wan2.2-t2i-flash``, ``wanx2.1-imageedit``,
``wan2.5-i2i-preview``, ``wanx-v1``), at most 64 characters. The model goes in the body only, never
in a path; task ids (from answers) must match ``callbacks.http.JOB_ID`` before they go into the
task and cancel paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import httpx
import structlog

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
    checked_job_id,
    error_body,
    error_status,
    expect_object,
    is_input_error,
    model_name,
    request_json,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission

log = structlog.get_logger()

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"
INTL_BASE_URL = "https://dashscope-intl.aliyuncs.com/api/v1"
REGION_BASE_URLS: Final = {"cn-beijing": DEFAULT_BASE_URL, "ap-southeast-1": INTL_BASE_URL}
DEFAULT_MODEL = "wan2.2-t2i-flash"

TEXT2IMAGE: Final = ("services", "aigc", "text2image", "image-synthesis")
IMAGE2IMAGE: Final = ("services", "aigc", "image2image", "image-synthesis")
TASKS: Final = "tasks"
MAX_OUTPUTS: Final = 4
MAX_I2I_IMAGES: Final = 3

# Edit inputs: 384 (wan2.5) or 512 (wanx2.1) to 4096-5000 px a side, at most 10 MB, JPEG, PNG
# (wan2.5: without transparency), BMP, WEBP; URLs or data URIs. 2048 px keeps a data URI well
# under 10 MB and loses nothing: the outputs are about 1280*1280.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=True)

# Published per model and account: 2 task submits/s and 1-2 tasks at once (2 for the Wan t2i and
# edit models). The query route has no published limit; the SDK asks every 1 s backing off to
# 5 s per task. With at most 2 tasks in flight that is under 2 polls/s, so 10/s account-wide
# leaves room for reconciling a backlog without hammering the route.
QUOTA = Quota(submits_per_s=2.0, polls_per_s=10.0, concurrency=2)

MODEL: Final = re.compile(r"[a-z][a-z0-9]*(?:[.-][a-z0-9]+){0,15}")
MODEL_MAX_CHARS: Final = 64

# ``input`` fields of the image-synthesis routes; every other param is a ``parameters`` field.
INPUT_KEYS: Final = frozenset(
    {"function", "ref_img", "base_image_url", "mask_image_url", "sketch_image_url", "images"}
)
RUNNING: Final = frozenset({"PENDING", "RUNNING", "SUSPENDED"})
MODERATED: Final = frozenset({"DataInspectionFailed", "IPInfringementSuspect"})
ACCOUNT: Final = frozenset(
    {"Arrearage", "AccessDenied.Unpurchased", "AllocationQuota.FreeTierOnly"}
)
AUTH: Final = frozenset({"InvalidApiKey"})
NOT_CANCELLABLE: Final = "UnsupportedOperation"
_REFUSED_PREFIXES = ("InvalidParameter", "InvalidURL", "InvalidFile", "InvalidImage")


def validate_model(model: str, *, provider: str = "dashscope") -> str:
    """``model`` if the grammar takes it (module docstring), else ``InvalidModel`` (pure)."""
    return model_name(model, provider=provider, segment=MODEL, max_chars=MODEL_MAX_CHARS)


def is_i2i(model: str) -> bool:
    """Wan 2.5-style image-to-image: the inputs go as the list ``images``."""
    return model.startswith("wan2.5-i2i")


def is_edit(model: str) -> bool:
    """Whether ``model`` is served by the image2image route (the SDK's rule)."""
    return "imageedit" in model or is_i2i(model)


def dashscope_error(
    code: str,
    message: str,
    *,
    provider: str,
    status: int | None = None,
    details: Mapping[str, Any] | None = None,
    retry_after_s: float | None = None,
) -> ProviderError:
    """The error for DashScope's ``code`` (and the HTTP ``status``, when there was one)."""
    text = f"{provider}: {code}: {message}"
    info = {**(details or {}), "provider": provider, "dashscope_code": code}
    if status == 429 or code.startswith("Throttling"):
        return ProviderRateLimited(text, retry_after_s=retry_after_s, details=info)
    if status == 401 or code in AUTH:
        return PermanentProviderError(text, code="provider_auth_failed", details=info)
    if code in MODERATED:
        return PermanentProviderError(text, code="provider_moderated", details=info)
    if code in ACCOUNT:
        return PermanentProviderError(text, code="provider_account", details=info)
    if status is not None and (status >= 500 or status == 408):
        return RetryableProviderError(text, details=info)
    if status is not None and status >= 400:
        return PermanentProviderError(text, details=info)
    if code.startswith(_REFUSED_PREFIXES):
        return PermanentProviderError(text, details=info)
    return RetryableProviderError(text, details=info)


def _error_body(exc: ProviderError) -> tuple[str | None, str]:
    """DashScope's ``code`` and ``message`` from a translated HTTP error's body snippet."""
    body = error_body(exc)
    if not isinstance(body, dict) or not isinstance(body.get("code"), str) or not body["code"]:
        return None, ""
    return body["code"], str(body.get("message") or "")


def _refused(code: str, message: str) -> bool:
    """Whether a failed task's ``code``/``message`` name a failure a retry cannot fix."""
    return code in MODERATED or code.startswith(_REFUSED_PREFIXES) or is_input_error(message)


def _entry_text(entry: Mapping[str, Any]) -> str:
    return f"{entry.get('code') or 'no url'}: {entry.get('message') or ''}".rstrip(": ")


def results_outcome(output: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome of a ``SUCCEEDED`` task: every result made, or failed (module docstring)."""
    results = output.get("results")
    entries = [r for r in results if isinstance(r, Mapping)] if isinstance(results, list) else []
    urls = tuple(
        str(r["url"])
        for r in entries
        if isinstance(r.get("url"), str) and r["url"].startswith(("https://", "http://"))
    )
    failed = [r for r in entries if not isinstance(r.get("url"), str) or "code" in r]
    metrics = output.get("task_metrics")
    counted = metrics.get("FAILED") if isinstance(metrics, Mapping) else None
    missing = counted if isinstance(counted, int) and counted > len(failed) else len(failed)
    if missing:
        reasons = "; ".join(_entry_text(r) for r in failed) or "results missing"
        moderated = any(r.get("code") in MODERATED for r in failed)
        return Outcome(
            "failed",
            job_id,
            reason=f"{missing} of {len(entries)} image(s) failed: {reasons}",
            retryable=not moderated,
        )
    if not urls:
        return Outcome("failed", job_id, reason="SUCCEEDED without results")
    return Outcome("succeeded", job_id, outputs=urls)


def task_outcome(output: Mapping[str, Any], job_id: str, *, provider: str = "dashscope") -> Outcome:
    """The outcome a task query's ``output`` describes; ``UNKNOWN`` raises (the job is gone)."""
    status = output.get("task_status")
    if status in RUNNING:
        return Outcome("running", job_id)
    if status == "SUCCEEDED":
        return results_outcome(output, job_id)
    if status == "FAILED":
        code = str(output.get("code") or "InternalError")
        message = str(output.get("message") or "")
        return Outcome(
            "failed", job_id, reason=f"{code}: {message}", retryable=not _refused(code, message)
        )
    if status == "CANCELED":
        return Outcome("cancelled", job_id, reason="cancelled")
    if status == "UNKNOWN":
        raise PermanentProviderError(
            f"{provider}: task {job_id} is unknown or expired",
            code="provider_job_unknown",
            details={"provider": provider, "job_id": job_id},
        )
    return Outcome("running", job_id, reason=f"unknown task_status {status!r}")


class DashScopeProvider:
    """The Provider port over DashScope's asynchronous image synthesis (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "dashscope",
        limits: Limits = LIMITS,
        quota: Quota = QUOTA,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "poll"
        self.quota = quota
        self._http = http
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}

    async def _call(
        self, method: str, path: str, body: Any = None, *, submit: bool = False
    ) -> dict[str, Any]:
        """One API call; DashScope's error codes translated (module docstring)."""
        headers = {**self._auth, "X-DashScope-Async": "enable"} if submit else self._auth
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
            if code is None:
                raise
            raise dashscope_error(
                code,
                message,
                provider=self.name,
                status=error_status(exc),
                details=exc.details if isinstance(exc.details, Mapping) else None,
                retry_after_s=getattr(exc, "retry_after_s", None),
            ) from exc
        return expect_object(data, provider=self.name, what=f"{method} answer")

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    def submit_body(self, submission: Submission) -> dict[str, Any]:
        """The image-synthesis body (module docstring); ``PermanentProviderError`` before any
        request for what DashScope would refuse anyway."""
        model = validate_model(submission.model, provider=self.name)
        if not 1 <= submission.num_outputs <= MAX_OUTPUTS:
            raise PermanentProviderError(f"{self.name}: n must be 1 to {MAX_OUTPUTS}")
        params = dict(submission.params)
        image_key = params.pop(IMAGE_KEY_PARAM, None)
        images_key = params.pop(IMAGES_KEY_PARAM, None)
        body_input: dict[str, Any] = {k: params.pop(k) for k in INPUT_KEYS & params.keys()}
        body_input["prompt"] = submission.prompt
        if submission.negative_prompt is not None:
            body_input["negative_prompt"] = submission.negative_prompt
        body_input.update(self._images(model, submission.inputs, image_key, images_key))
        if "imageedit" in model and "function" not in body_input:
            masked = "mask_image_url" in body_input
            body_input["function"] = "description_edit_with_mask" if masked else "description_edit"
        parameters = {**params, "n": submission.num_outputs}
        return {"model": model, "input": body_input, "parameters": parameters}

    def _images(
        self, model: str, inputs: tuple[str, ...], image_key: object, images_key: object
    ) -> dict[str, Any]:
        """Where the input images go in ``input`` (module docstring)."""
        if not inputs:
            return {}
        if images_key is not None:
            return {str(images_key): list(inputs)}
        if image_key is not None:
            return {str(image_key): inputs[0]}
        if is_i2i(model):
            if len(inputs) > MAX_I2I_IMAGES:
                raise PermanentProviderError(f"{self.name}: at most {MAX_I2I_IMAGES} images")
            return {"images": list(inputs)}
        if "imageedit" in model:
            if len(inputs) > 2:
                raise PermanentProviderError(f"{self.name}: an image and a mask, not more")
            keys = ("base_image_url", "mask_image_url")
            return dict(zip(keys, inputs, strict=False))
        if len(inputs) > 1:
            raise PermanentProviderError(f"{self.name}: one reference image, not more")
        return {"ref_img": inputs[0]}

    async def submit(self, submission: Submission) -> str:
        body = self.submit_body(submission)
        route = IMAGE2IMAGE if is_edit(body["model"]) else TEXT2IMAGE
        answer = await self._call("POST", url_path(*route), body, submit=True)
        output = answer.get("output")
        job_id = output.get("task_id") if isinstance(output, Mapping) else None
        if not isinstance(job_id, str) or not job_id:
            code = answer.get("code") or (
                output.get("code") if isinstance(output, Mapping) else None
            )
            if isinstance(code, str) and code:
                raise dashscope_error(code, str(answer.get("message") or ""), provider=self.name)
            raise RetryableProviderError(f"{self.name}: submit answer without a task_id")
        return checked_job_id(job_id, provider=self.name)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """DashScope has no webhooks: outcomes come by polling, so every delivery is refused."""
        raise WebhookRejected(f"{self.name} sends no webhooks", code="no_webhooks")

    async def poll(self, job_id: str, model: str) -> Outcome:
        """``GET {base}/tasks/{task_id}`` (the model is not needed to ask)."""
        checked_job_id(job_id, provider=self.name)
        answer = await self._call("GET", url_path(TASKS, job_id))
        output = expect_object(answer.get("output"), provider=self.name, what="task output")
        return task_outcome(output, job_id, provider=self.name)

    async def cancel(self, job_id: str, model: str) -> None:
        """Cancel a ``PENDING`` task; one already past it is not an error (module docstring)."""
        checked_job_id(job_id, provider=self.name)
        try:
            await self._call("POST", url_path(TASKS, job_id, "cancel"))
        except PermanentProviderError as exc:
            details = exc.details if isinstance(exc.details, Mapping) else {}
            if details.get("dashscope_code") == NOT_CANCELLABLE or "PENDING" in exc.message:
                log.info("dashscope_cancel_too_late", job_id=job_id, error=exc.message)
                return
            raise

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Result URLs are pre-signed OSS URLs: no headers."""
        return {}
