"""Black Forest Labs (FLUX API) adapter (shared/PROVIDERS.md, "Black Forest Labs").

BFL's webhook body and signature are not reliably documented, so a BFL webhook is a trigger only:
the receiver authenticates it by the per-task token in the callback URL, and ``verify`` returns a
Delivery without an outcome, telling the receiver to ``poll``. Polling is the source of truth.

Statuses: ``Pending`` runs; ``Ready`` succeeded (``result.sample``, URLs valid 10 minutes);
``Request Moderated`` / ``Content Moderated`` failed for good (the same prompt or inputs will be
moderated again); ``Error`` and ``Task not found`` failed, retryable.

BFL makes one image per request and has no cancel API; FLUX takes no negative prompt, so one
given is not sent.

The model grammar (``validate_model``), checked before any request: one path segment, ``flux``
followed by ``-``/``.``-separated runs of lowercase ASCII letters and digits (``flux-pro-1.1``,
``flux-kontext-pro``, ``flux-pro-1.1-ultra-finetuned``). Every BFL generation endpoint is named
so, and none of its other endpoints is (``get_result``, ``credits``, ``finetune``,
``my_finetunes``, ``delete_finetune``, ``finetune_details``), so a model can name nothing but a
generation. Task ids (from the submit answer, a webhook) must match ``callbacks.http.JOB_ID``, and
a ``polling_url`` is used only if it is a ``…/get_result?id=<that id>`` URL on the configured API
origin or on an https ``bfl.ai``/``bfl.ml`` host (BFL's regional endpoints such as
``api.us1.bfl.ai``); any other is ignored for the documented ``{base}/get_result?id=…``, so an
answer cannot send the ``x-key`` elsewhere.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import structlog

from callbacks.errors import (
    InvalidJobId,
    PermanentProviderError,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.http import (
    SEGMENT,
    checked_job_id,
    expect_object,
    model_input,
    model_name,
    output_urls,
    parse_json,
    request_json,
    url_path,
)
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission

log = structlog.get_logger()

DEFAULT_BASE_URL = "https://api.bfl.ai/v1"
POLLING_URL_CACHE_SIZE = 4096
MODERATED = frozenset({"Request Moderated", "Content Moderated"})

# FLUX 1.1 takes an image prompt and Kontext an input image, as URLs or base64; data URIs are not
# documented, so inputs go as URLs. Kontext handles up to ~4 megapixels; 1440 px on the long side
# is the largest size FLUX 1.1 [pro] produces.
LIMITS = Limits(max_side=1440, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=False)

MODEL = re.compile(r"flux(?:[.-][a-z0-9]+){1,15}")
MODEL_MAX_CHARS = 64
BFL_DOMAINS = ("bfl.ai", "bfl.ml")
RESULT_ROUTE = "get_result"
# What a polling URL may contain at all: ASCII letters, digits and the URL punctuation BFL's
# URLs use; no spaces, backslashes, percent-escapes, userinfo or IPv6 brackets.
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/?&=-]+")


def validate_model(model: str, *, provider: str = "bfl") -> str:
    """``model`` if the grammar takes it (module docstring), else ``InvalidModel`` (pure: the
    HTTP layer may call it when a task is created, to refuse such a model with 422)."""
    return model_name(model, provider=provider, segment=MODEL, max_chars=MODEL_MAX_CHARS)


def trusted_polling_url(url: object, job_id: str, base_url: str) -> str | None:
    """``url`` if it is a ``get_result`` URL for ``job_id`` on BFL's API (the configured origin,
    or https on a ``bfl.ai``/``bfl.ml`` host), else None. Checked on the raw string: httpx would
    resolve dot segments before anything could see them."""
    if not isinstance(url, str) or not _URL_CHARS.fullmatch(url):
        return None
    raw = urlsplit(url)
    if raw.fragment or raw.scheme not in ("https", "http"):
        return None
    segments = raw.path.split("/")
    if segments[0] != "" or segments[-1] != RESULT_ROUTE or ".." in raw.path:
        return None
    if not all(SEGMENT.fullmatch(part) for part in segments[1:]):
        return None
    if parse_qsl(raw.query, keep_blank_values=True) != [("id", job_id)]:
        return None
    try:
        target, base = httpx.URL(url), httpx.URL(base_url)
    except httpx.InvalidURL:
        return None
    same_origin = (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)
    on_bfl = (
        target.scheme == "https"
        and target.port is None
        and any(target.host == d or target.host.endswith("." + d) for d in BFL_DOMAINS)
    )
    return url if same_origin or on_bfl else None


def default_image_key(model: str) -> str:
    """Where the first input image goes: ``input_image`` for Kontext, ``image_prompt`` else."""
    return "input_image" if "kontext" in model else "image_prompt"


def result_outcome(answer: Mapping[str, Any], job_id: str) -> Outcome:
    """The outcome a ``get_result`` answer describes."""
    status = answer.get("status")
    details = answer.get("details")
    if status == "Pending":
        return Outcome("running", job_id)
    if status == "Ready":
        result = answer.get("result")
        urls = output_urls(result.get("sample") if isinstance(result, Mapping) else None)
        if not urls:
            return Outcome("failed", job_id, reason="Ready without a sample")
        return Outcome("succeeded", job_id, outputs=urls)
    if status in MODERATED:
        reason = f"{status}: {json.dumps(details)}" if details else str(status)
        return Outcome("failed", job_id, reason=reason, retryable=False)
    if status == "Error":
        reason = f"Error: {json.dumps(details)}" if details else "Error"
        return Outcome("failed", job_id, reason=reason)
    if status == "Task not found":
        return Outcome("failed", job_id, reason="task not found")
    return Outcome("running", job_id, reason=f"unknown status {status!r}")


class BflProvider:
    """The Provider port over the BFL API.

    ``polling_url`` answers are kept in a bounded in-memory LRU purely as an optimisation (BFL
    may answer with a regional URL); without one, ``{base}/get_result?id=`` is used.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        webhook_secret: str | None = None,
        name: str = "bfl",
        polling_cache_size: int = POLLING_URL_CACHE_SIZE,
        limits: Limits = LIMITS,
    ) -> None:
        self.name = name
        self.limits = limits
        self.arrival: Arrival = "trigger"
        self.quota = Quota()
        self._http = http
        self._base = base_url.rstrip("/")
        self._auth = {"x-key": api_key}
        self._webhook_secret = webhook_secret
        self._polling_urls: OrderedDict[str, str] = OrderedDict()
        self._polling_cache_size = polling_cache_size

    async def _call(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        data = await request_json(
            self._http, method, url, provider=self.name, headers=self._auth, json=body
        )
        return expect_object(data, provider=self.name, what=f"{method} answer")

    def validate_model(self, model: str) -> str:
        """``model`` if this adapter's grammar takes it, else ``InvalidModel``."""
        return validate_model(model, provider=self.name)

    async def submit(self, submission: Submission) -> str:
        model = validate_model(submission.model, provider=self.name)
        if submission.num_outputs != 1:
            raise PermanentProviderError(f"{self.name}: one image per request, not more")
        body = model_input(
            submission, image_key=default_image_key(model), count_key=None, negative_key=None
        )
        body["webhook_url"] = submission.callback_url
        if self._webhook_secret:
            body["webhook_secret"] = self._webhook_secret
        answer = await self._call("POST", self._base + url_path(model), body)
        job_id = answer.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableProviderError(f"{self.name}: submission without an id")
        checked_job_id(job_id, provider=self.name)
        polling_url = answer.get("polling_url")
        if polling_url is not None:
            trusted = trusted_polling_url(polling_url, job_id, self._base)
            if trusted is None:
                log.warning("bfl_polling_url_ignored", job_id=job_id)
            else:
                self._remember(job_id, trusted)
        return job_id

    def _remember(self, job_id: str, polling_url: str) -> None:
        self._polling_urls[job_id] = polling_url
        self._polling_urls.move_to_end(job_id)
        while len(self._polling_urls) > self._polling_cache_size:
            self._polling_urls.popitem(last=False)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """A trigger: parse the id (and status, for the delivery id), return no outcome."""
        try:
            parsed = parse_json(body)
        except (ValueError, RecursionError) as exc:  # too deep is malformed too
            raise WebhookRejected("body is not JSON", code="malformed_body") from exc
        job_id = parsed.get("id") if isinstance(parsed, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise WebhookRejected("body has no task id", code="malformed_body")
        try:
            checked_job_id(job_id, provider=self.name)
        except InvalidJobId as exc:
            raise WebhookRejected(exc.message, code="malformed_body") from exc
        status = parsed.get("status")
        return Delivery(f"{job_id}:{status if isinstance(status, str) else ''}", job_id, None)

    async def poll(self, job_id: str, model: str) -> Outcome:
        checked_job_id(job_id, provider=self.name)
        url = self._polling_urls.get(job_id)
        if url is None:
            answer = await request_json(
                self._http,
                "GET",
                self._base + url_path(RESULT_ROUTE),
                provider=self.name,
                headers=self._auth,
                params={"id": job_id},
            )
            answer = expect_object(answer, provider=self.name, what="get_result answer")
        else:
            answer = await self._call("GET", url)
        outcome = result_outcome(answer, job_id)
        if outcome.final:
            self._polling_urls.pop(job_id, None)
        return outcome

    async def cancel(self, job_id: str, model: str) -> None:
        """BFL has no cancel API: the job runs out and its result is ignored."""

    def fetch_headers(self, url: str) -> dict[str, str]:
        """``result.sample`` URLs are pre-signed: no headers."""
        return {}
