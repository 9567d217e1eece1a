"""Black Forest Labs (FLUX API) adapter (shared/PROVIDERS.md, "Black Forest Labs").

BFL's webhook body and signature are not reliably documented, so a BFL webhook is a trigger only:
the receiver authenticates it by the per-task token in the callback URL, and ``verify`` returns a
Delivery without an outcome, telling the receiver to ``poll``. Polling is the source of truth.

Statuses: ``Pending`` runs; ``Ready`` succeeded (``result.sample``, URLs valid 10 minutes);
``Request Moderated`` / ``Content Moderated`` failed for good (the same prompt or inputs will be
moderated again); ``Error`` and ``Task not found`` failed, retryable.

BFL makes one image per request and has no cancel API; FLUX takes no negative prompt, so one
given is not sent.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import httpx

from callbacks.errors import PermanentProviderError, RetryableProviderError, WebhookRejected
from callbacks.http import expect_object, model_input, output_urls, request_json
from callbacks.provider import Delivery, Limits, Outcome, Submission

DEFAULT_BASE_URL = "https://api.bfl.ai/v1"
POLLING_URL_CACHE_SIZE = 4096
MODERATED = frozenset({"Request Moderated", "Content Moderated"})

# FLUX 1.1 takes an image prompt and Kontext an input image, as URLs or base64; data URIs are not
# documented, so inputs go as URLs. Kontext handles up to ~4 megapixels; 1440 px on the long side
# is the largest size FLUX 1.1 [pro] produces.
LIMITS = Limits(max_side=1440, formats=("JPEG", "PNG", "WEBP"), accepts_data_uri=False)


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

    async def submit(self, submission: Submission) -> str:
        if submission.num_outputs != 1:
            raise PermanentProviderError(f"{self.name}: one image per request, not more")
        model = submission.model.strip("/")
        body = model_input(
            submission, image_key=default_image_key(model), count_key=None, negative_key=None
        )
        body["webhook_url"] = submission.callback_url
        if self._webhook_secret:
            body["webhook_secret"] = self._webhook_secret
        answer = await self._call("POST", f"{self._base}/{model}", body)
        job_id = answer.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableProviderError(f"{self.name}: submission without an id")
        polling_url = answer.get("polling_url")
        if isinstance(polling_url, str) and polling_url.startswith(("https://", "http://")):
            self._remember(job_id, polling_url)
        return job_id

    def _remember(self, job_id: str, polling_url: str) -> None:
        self._polling_urls[job_id] = polling_url
        self._polling_urls.move_to_end(job_id)
        while len(self._polling_urls) > self._polling_cache_size:
            self._polling_urls.popitem(last=False)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """A trigger: parse the id (and status, for the delivery id), return no outcome."""
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise WebhookRejected("body is not JSON", code="malformed_body") from exc
        job_id = parsed.get("id") if isinstance(parsed, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise WebhookRejected("body has no task id", code="malformed_body")
        status = parsed.get("status")
        return Delivery(f"{job_id}:{status if isinstance(status, str) else ''}", job_id, None)

    async def poll(self, job_id: str, model: str) -> Outcome:
        url = self._polling_urls.get(job_id)
        if url is None:
            answer = await request_json(
                self._http,
                "GET",
                f"{self._base}/get_result",
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
