"""OpenAI adapter: the Responses API in background mode with the ``image_generation`` tool
(shared/PROVIDERS.md, "OpenAI"; field names from the openai-python SDK types).

Submit: ``POST {base}/responses`` with ``Authorization: Bearer <key>`` and

    {"model": <responses model>, "background": true, "store": true,
     "input": [{"role": "user", "content": [{"type": "input_text", "text": <prompt>},
                                            {"type": "input_image", "image_url": <URL or data
                                             URI>, "detail": "auto"}, ...]}],
     "tools": [{"type": "image_generation", "model": <task's model>, <tool params>}],
     "tool_choice": {"type": "image_generation"},
     "metadata": {"hookline_task": <task id>, "attempt": "<n>"}}

``store`` keeps the response fetchable after the ~10 minutes a background response is otherwise
kept. The task's model is the image tool's model (``gpt-image-1`` by default); the model that
runs the tool (``responses_model``) is the adapter's setting. Tool params (``size``, ``quality``,
``output_format``, ``background``, ``moderation``, ``output_compression``, ``input_fidelity``,
``action``) go into the tool as given; ``width``/``height`` without a ``size`` become the standard
size of their orientation (``1024x1024``, ``1536x1024`` landscape, ``1024x1536`` portrait: the
sizes every GPT image model takes). Other params (``seed``, steps, guidance) have no OpenAI
counterpart and are not sent. The tool has no negative prompt; one given is added to the text as
``Avoid: …`` (an instruction the responses model reads). One image per response (the tool has no
``n``): ``num_outputs`` other than 1 is refused before any request, as are more than 16 inputs.

Arrival "trigger": webhooks are configured once per OpenAI project and reach the provider-level
route ``/v1/callbacks/openai``. ``verify`` checks the Standard Webhooks signature over the raw body
(±300 s, callbacks/standard_webhooks.py) with the ``whsec_`` secret, then parses the thin event
``{"id": "evt_…", "type", "data": {"id": "resp_…"}}``: ``Delivery(<webhook-id>, <resp id>,
None)``; the outcome always comes from ``poll``. Only ``response.completed``, ``.failed``,
``.cancelled`` and ``.incomplete`` are triggers; any other event type the project sends (batch,
fine-tuning, eval …) raises ``WebhookRejected`` code ``ignored_event``, which the receiver answers
200 so OpenAI stops retrying it.

Poll ``GET {base}/responses/{id}``:

    queued, in_progress                            running
    completed with an image_generation_call result succeeded: data:image/<fmt>;base64,<result>
                                                   (fmt: the call's or the tool's output_format,
                                                   png by default); the first image only
    completed with a refusal                       failed, not retryable
    completed without an image (text only)         failed, retryable
    incomplete, content_filter                     failed, not retryable
    incomplete, max_output_tokens                  succeeded if the image was made, else failed,
                                                   retryable (as for any other reason)
    failed, error.code a content or input problem  failed, not retryable (image_content_policy_
                                                   violation, invalid_prompt, bio_policy,
                                                   invalid_image…, image_too_large …)
    failed, other codes (server_error …)           failed, retryable
    cancelled                                      cancelled
    HTTP 404 (gone after the retention window)     PermanentProviderError: the job is gone

Cancel: ``POST {base}/responses/{id}/cancel`` (a finished background response is answered
unchanged).

Errors (HTTP status from callbacks/http.py, refined by OpenAI's ``error.code``):

    401 (invalid_api_key …)              PermanentProviderError  provider_auth_failed
    429 insufficient_quota               PermanentProviderError  provider_account: the billing
                                         quota is spent; retrying soon cannot clear it
    429 rate_limit_exceeded (and other)  ProviderRateLimited     retry_after_s from Retry-After
    400 moderation_blocked               PermanentProviderError  provider_moderated
    other 4xx                            PermanentProviderError  provider_rejected
    5xx, timeouts                        RetryableProviderError

Grammars: the image model is ``gpt-image`` or ``chatgpt-image`` followed by ``-``/``.``-separated
runs of lowercase ASCII letters and digits (``gpt-image-1``, ``gpt-image-1-mini``,
``gpt-image-1.5``, ``chatgpt-image-latest``), at most 64 characters; it goes in the body only,
never in a path. The responses model is checked the same way at construction (``gpt-4.1-mini``,
``gpt-5``). Response ids (from the submit answer, a webhook, a stored task) must be ``resp_`` and
1–120 ASCII letters or digits (the ids OpenAI issues are hex) before they go into a path; the
project-level route carries no task id, so this check is what stands between a signed event and
a URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import httpx

from callbacks import standard_webhooks
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
    checked_job_id,
    error_body,
    error_status,
    expect_object,
    parse_json,
    request_json,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-image-1"  # the image tool's model (HOOKLINE_OPENAI_MODEL)
DEFAULT_RESPONSES_MODEL = "gpt-4.1-mini"  # the model that runs the tool
ROUTE: Final = "responses"
WEBHOOK_TOLERANCE_S: Final = 300.0
MAX_INPUTS: Final = 16
METADATA_VALUE_MAX: Final = 512

# input_image takes PNG, JPEG, WEBP (and non-animated GIF) as a URL or a data URI; the vision
# pipeline fits an image in 2048 x 2048 before anything else.
LIMITS = Limits(max_side=2048, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=True)

# OpenAI's limits depend on the account's usage tier (images per minute per model); none is
# published for all accounts, so none by default: a 429 with Retry-After says when.
QUOTA = Quota()

IMAGE_MODEL: Final = re.compile(r"(?:gpt-image|chatgpt-image)(?:[.-][a-z0-9]+){1,8}")
RESPONSES_MODEL: Final = re.compile(r"[a-z][a-z0-9]*(?:[.-][a-z0-9]+){0,10}")
MODEL_MAX_CHARS: Final = 64
RESPONSE_ID: Final = re.compile(r"resp_[A-Za-z0-9]{1,120}")

TRIGGER_EVENTS: Final = frozenset(
    {"response.completed", "response.failed", "response.cancelled", "response.incomplete"}
)
TOOL_PARAMS: Final = frozenset(
    {
        "action",
        "background",
        "input_fidelity",
        "moderation",
        "output_compression",
        "output_format",
        "quality",
        "size",
    }
)
CONTENT_TYPES: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# ``error.code`` of a failed response that a retry of the same request will meet again.
PERMANENT_FAILURES: Final = frozenset(
    {
        "invalid_prompt",
        "bio_policy",
        "data_residency_mismatch",
        "image_content_policy_violation",
        "moderation_blocked",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "image_file_not_found",
    }
)
MODERATED: Final = frozenset({"moderation_blocked", "image_content_policy_violation"})
_CODE_IN_TEXT = re.compile(r'"code"\s*:\s*"([A-Za-z0-9_]{1,64})"')


def _model(model: object, pattern: re.Pattern[str], *, provider: str, what: str) -> str:
    if isinstance(model, str) and len(model) <= MODEL_MAX_CHARS and pattern.fullmatch(model):
        return model
    shown = model[:80] if isinstance(model, str) else type(model).__name__
    raise InvalidModel(
        f"{provider}: {what} {shown!r} is not a valid model name", details={"provider": provider}
    )


def validate_model(model: str, *, provider: str = "openai") -> str:
    """``model`` (the image tool's) if the grammar takes it (module docstring), else
    ``InvalidModel`` (pure: the HTTP layer may call it when a task is created)."""
    return _model(model, IMAGE_MODEL, provider=provider, what="image model")


def checked_response_id(job_id: object, *, provider: str = "openai") -> str:
    """``job_id`` if it is a response id (``resp_…``, module docstring), else ``InvalidJobId``."""
    checked = checked_job_id(job_id, provider=provider)
    if not RESPONSE_ID.fullmatch(checked):
        raise InvalidJobId(
            f"{provider}: job id {checked[:80]!r} is not a response id",
            details={"provider": provider},
        )
    return checked


def standard_size(width: object, height: object) -> str | None:
    """The standard tool size of a ``width`` x ``height`` orientation; None without both."""
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    if isinstance(width, bool) or isinstance(height, bool) or min(width, height) <= 0:
        return None
    if width == height:
        return "1024x1024"
    return "1536x1024" if width > height else "1024x1536"


def _error_code(exc: ProviderError) -> tuple[str | None, str]:
    """OpenAI's ``error.code`` and ``error.message`` from a translated HTTP error's body."""
    body = error_body(exc)
    if body is None:  # a snippet cut short: the code is near the start
        details = exc.details if isinstance(exc.details, Mapping) else {}
        found = _CODE_IN_TEXT.search(str(details.get("body") or ""))
        return (found.group(1) if found else None), ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code")
    return (code if isinstance(code, str) else None), str(error.get("message") or "")


def translated(exc: ProviderError, provider: str) -> ProviderError | None:
    """The error OpenAI's status and ``error.code`` call for (module docstring), its message
    OpenAI's own; None for an error without an HTTP status (a timeout, a refused connection)."""
    status = error_status(exc)
    if status is None:
        return None
    code, message = _error_code(exc)
    text = f"{provider}: HTTP {status}: {code or 'error'}: {message or exc.message}"
    details = {**(exc.details if isinstance(exc.details, Mapping) else {}), "openai_code": code}
    if status == 401:
        return PermanentProviderError(text, code="provider_auth_failed", details=details)
    if code == "insufficient_quota":
        return PermanentProviderError(text, code="provider_account", details=details)
    if code in MODERATED:
        return PermanentProviderError(text, code="provider_moderated", details=details)
    if isinstance(exc, ProviderRateLimited):
        return ProviderRateLimited(text, retry_after_s=exc.retry_after_s, details=details)
    if isinstance(exc, PermanentProviderError):
        return PermanentProviderError(text, details=details)
    return RetryableProviderError(text, details=details)


def _image_call(output: object) -> Mapping[str, Any] | None:
    """The first ``image_generation_call`` in ``output`` with its image, if any."""
    for item in output if isinstance(output, list) else []:
        if (
            isinstance(item, Mapping)
            and item.get("type") == "image_generation_call"
            and item.get("status") == "completed"
            and isinstance(item.get("result"), str)
            and item["result"]
        ):
            return item
    return None


def _texts(output: object) -> tuple[list[str], list[str]]:
    """The refusals and the texts of the output messages."""
    refusals: list[str] = []
    texts: list[str] = []
    for item in output if isinstance(output, list) else []:
        content = item.get("content") if isinstance(item, Mapping) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "refusal":
                refusals.append(str(part.get("refusal") or "refused"))
            elif part.get("type") == "output_text":
                texts.append(str(part.get("text") or ""))
    return refusals, texts


def _output_format(answer: Mapping[str, Any], call: Mapping[str, Any]) -> str:
    declared = call.get("output_format")
    if declared not in CONTENT_TYPES:
        tools = answer.get("tools")
        for tool in tools if isinstance(tools, list) else []:
            if isinstance(tool, Mapping) and tool.get("type") == "image_generation":
                declared = tool.get("output_format")
                break
    return declared if isinstance(declared, str) and declared in CONTENT_TYPES else "png"


def _image_outcome(answer: Mapping[str, Any], job_id: str) -> Outcome | None:
    call = _image_call(answer.get("output"))
    if call is None:
        return None
    uri = f"data:{CONTENT_TYPES[_output_format(answer, call)]};base64,{call['result']}"
    return Outcome("succeeded", job_id, outputs=(uri,))


def _completed_without_image(answer: Mapping[str, Any], job_id: str) -> Outcome:
    refusals, texts = _texts(answer.get("output"))
    if refusals:
        reason = f"refused: {' '.join(refusals)[:300]}"
        return Outcome("failed", job_id, reason=reason, retryable=False)
    said = " ".join(t for t in texts if t)[:300]
    reason = f"completed without an image: {said}" if said else "completed without an image"
    return Outcome("failed", job_id, reason=reason)


def response_outcome(answer: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome a response object describes (module docstring)."""
    status = answer.get("status")
    if status in ("queued", "in_progress"):
        return Outcome("running", job_id)
    if status == "completed":
        return _image_outcome(answer, job_id) or _completed_without_image(answer, job_id)
    if status == "cancelled":
        return Outcome("cancelled", job_id, reason="cancelled")
    if status == "failed":
        error = answer.get("error")
        error = error if isinstance(error, Mapping) else {}
        code = error.get("code")
        reason = f"{code or 'failed'}: {error.get('message') or ''}".rstrip(": ")
        return Outcome("failed", job_id, reason=reason, retryable=code not in PERMANENT_FAILURES)
    if status == "incomplete":
        incomplete = answer.get("incomplete_details")
        why = incomplete.get("reason") if isinstance(incomplete, Mapping) else None
        if why == "content_filter":
            return Outcome("failed", job_id, reason="incomplete: content_filter", retryable=False)
        made = _image_outcome(answer, job_id)
        return made or Outcome("failed", job_id, reason=f"incomplete: {why or 'unknown'}")
    return Outcome("running", job_id, reason=f"unknown status {status!r}")


def parse_event(body: bytes, *, provider: str = "openai") -> tuple[str, str]:
    """The ``type`` and response id of a (verified) event body; ``WebhookRejected`` with
    ``ignored_event`` for an event type that is no trigger, ``malformed_body`` otherwise."""
    try:
        event = parse_json(body)
    except (ValueError, RecursionError) as exc:  # too deep is malformed too
        raise WebhookRejected("body is not JSON", code="malformed_body") from exc
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str):
        raise WebhookRejected("body is not an OpenAI event", code="malformed_body")
    if kind not in TRIGGER_EVENTS:
        raise WebhookRejected(f"event type {kind[:80]!r} is not acted on", code="ignored_event")
    data = event.get("data")
    job_id = data.get("id") if isinstance(data, dict) else None
    try:
        return kind, checked_response_id(job_id, provider=provider)
    except InvalidJobId as exc:
        raise WebhookRejected(exc.message, code="malformed_body") from exc


class OpenAiProvider:
    """The Provider port over OpenAI's Responses API (module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        webhook_secret: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        responses_model: str = DEFAULT_RESPONSES_MODEL,
        name: str = "openai",
        limits: Limits = LIMITS,
        quota: Quota = QUOTA,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "trigger"
        self.quota = quota
        self._http = http
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._responses_model = _model(
            responses_model, RESPONSES_MODEL, provider=name, what="responses model"
        )
        if webhook_secret:
            standard_webhooks.decode_secret(webhook_secret)  # ValueError: a configuration error
        self._webhook_secret = webhook_secret or None

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            data = await request_json(
                self._http,
                method,
                self._base + path,
                provider=self.name,
                headers=self._auth,
                json=body,
            )
        except ProviderError as exc:
            mapped = translated(exc, self.name)
            if mapped is None:
                raise
            raise mapped from exc
        return expect_object(data, provider=self.name, what=f"{method} answer")

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    def submit_body(self, submission: Submission) -> dict[str, Any]:
        """The create body (module docstring); ``PermanentProviderError`` before any request for
        what this adapter cannot ask of OpenAI."""
        model = validate_model(submission.model, provider=self.name)
        if submission.num_outputs != 1:
            raise PermanentProviderError(f"{self.name}: one image per response, not more")
        if len(submission.inputs) > MAX_INPUTS:
            raise PermanentProviderError(f"{self.name}: at most {MAX_INPUTS} input images")
        params = submission.params
        tool: dict[str, Any] = {"type": "image_generation", "model": model}
        tool.update({k: v for k, v in params.items() if k in TOOL_PARAMS})
        if "size" not in tool and (
            size := standard_size(params.get("width"), params.get("height"))
        ):
            tool["size"] = size
        text = submission.prompt
        if submission.negative_prompt:
            text = f"{text}\n\nAvoid: {submission.negative_prompt}"
        content: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
        content += [
            {"type": "input_image", "image_url": image, "detail": "auto"}
            for image in submission.inputs
        ]
        return {
            "model": self._responses_model,
            "input": [{"role": "user", "content": content}],
            "background": True,
            "store": True,
            "tools": [tool],
            "tool_choice": {"type": "image_generation"},
            "metadata": {
                "hookline_task": submission.task_id[:METADATA_VALUE_MAX],
                "attempt": str(submission.attempt),
            },
        }

    async def submit(self, submission: Submission) -> str:
        answer = await self._call("POST", url_path(ROUTE), self.submit_body(submission))
        job_id = answer.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableProviderError(f"{self.name}: answer without a response id")
        return checked_response_id(job_id, provider=self.name)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """A trigger: the signature over the raw body first, then the thin event's response id
        (module docstring)."""
        if self._webhook_secret is None:
            raise WebhookRejected(
                f"{self.name}: no webhook secret is configured", code="bad_signature"
            )
        standard_webhooks.verify(
            self._webhook_secret, headers, body, now, tolerance_s=WEBHOOK_TOLERANCE_S
        )
        _, job_id = parse_event(body, provider=self.name)
        msg_id = standard_webhooks.get_header(headers, standard_webhooks.ID_HEADER) or ""
        return Delivery(msg_id, job_id, None)

    async def poll(self, job_id: str, model: str) -> Outcome:
        """``GET /responses/{id}``; an answer about another response is the provider's fault."""
        checked_response_id(job_id, provider=self.name)
        answer = await self._call("GET", url_path(ROUTE, job_id))
        if answer.get("id") != job_id:
            raise RetryableProviderError(f"{self.name}: the answer is about another response")
        return response_outcome(answer, job_id)

    async def cancel(self, job_id: str, model: str) -> None:
        """``POST /responses/{id}/cancel`` (a finished response is answered unchanged)."""
        checked_response_id(job_id, provider=self.name)
        await self._call("POST", url_path(ROUTE, job_id, "cancel"))

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Outputs are data URIs: nothing is downloaded."""
        return {}
