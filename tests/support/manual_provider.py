"""A provider the test drives by hand: it records submissions, answers polls with what the test
set, and can deliver a webhook to the task's callback URL at any moment — including from inside
``submit``, before the job id is returned (the "fast provider" race).

Its webhooks are authenticated by the per-task token only (like BFL), with a JSON body
``{"job_id", "status", "outputs", "reason", "retryable"}`` and the delivery id in
``X-Delivery-Id``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from callbacks.errors import PermanentProviderError, WebhookRejected
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission


@dataclass
class ManualJob:
    job_id: str
    submission: Submission
    outcome: Outcome
    cancelled: bool = False


@dataclass
class ManualProvider:
    http: httpx.AsyncClient
    output_url: str = ""
    name: str = "manual"
    limits: Limits = field(default_factory=lambda: Limits(accepts_data_uri=True))
    arrival: Arrival = "webhook"
    quota: Quota = field(default_factory=Quota)
    jobs: dict[str, ManualJob] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)
    # Called inside submit() after the job exists and before its id is returned.
    on_submit: Callable[[ManualJob], Awaitable[None]] | None = None
    # Called inside poll() before it answers (to make something happen "during" a poll).
    on_poll: Callable[[str], Awaitable[None]] | None = None
    poll_error: Exception | None = None
    submit_errors: list[Exception] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def submit(self, submission: Submission) -> str:
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        job_id = f"job{next(self._ids)}"
        job = ManualJob(job_id, submission, Outcome("running", job_id))
        self.jobs[job_id] = job
        if self.on_submit is not None:
            await self.on_submit(job)
        return job_id

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        try:
            data = json.loads(body)
            outcome = Outcome(
                data["status"],
                data["job_id"],
                tuple(data.get("outputs", ())),
                data.get("reason"),
                data.get("retryable", True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise WebhookRejected("bad body", code="malformed_body") from exc
        delivery_id = headers.get("x-delivery-id") or f"{outcome.job_id}:{outcome.status}"
        return Delivery(delivery_id, outcome.job_id, outcome)

    async def poll(self, job_id: str, model: str) -> Outcome:
        self.polls.append(job_id)
        answer = self.jobs[job_id].outcome if job_id in self.jobs else None
        if self.on_poll is not None:
            await self.on_poll(job_id)
        if self.poll_error is not None:
            raise self.poll_error
        if answer is None:
            raise PermanentProviderError(f"no job {job_id}")
        return answer

    async def cancel(self, job_id: str, model: str) -> None:
        self.cancels.append(job_id)
        if job_id in self.jobs:
            self.jobs[job_id].cancelled = True

    def fetch_headers(self, url: str) -> dict[str, str]:
        return {}

    # --- test controls -------------------------------------------------------------------------

    def finish(self, job_id: str, status: str = "succeeded", **kw: Any) -> Outcome:
        """Set the job's outcome (what polls answer from now on)."""
        outputs = kw.pop("outputs", (self.output_url,) if status == "succeeded" else ())
        outcome = Outcome(status, job_id, tuple(outputs), **kw)  # type: ignore[arg-type]
        self.jobs[job_id].outcome = outcome
        return outcome

    async def deliver(
        self, job_id: str, *, delivery_id: str | None = None, token: str | None = None
    ) -> httpx.Response:
        """POST the job's current outcome to its callback URL (as the provider would)."""
        job = self.jobs[job_id]
        o = job.outcome
        body = {
            "job_id": o.job_id,
            "status": o.status,
            "outputs": list(o.outputs),
            "reason": o.reason,
            "retryable": o.retryable,
        }
        url = job.submission.callback_url
        if token is not None:
            url = url.split("?token=")[0] + f"?token={token}"
        headers = {"X-Delivery-Id": delivery_id or f"{job_id}:{o.status}"}
        return await self.http.post(url, json=body, headers=headers)
