"""Applying the outcome rules: read the task, judge (statemachine/rules.py), compare-and-set the
record the decision gives, and only then start its side effects.

Called directly by the webhook receiver (an outcome in a delivery), by the reaper (``reconcile``:
an overdue job is polled first) and by the steps (``step_failed``). Nothing here starts a step:
the change feed does (the dispatcher) and the reaper is the backstop, so a process that only
serves the API never runs one. Nothing here makes an outbound call on a webhook's request path
either: cleanups (cancelling a superseded or timed-out job, deleting a failed task's outputs) go
to the background after the write.

**Polls** are reaper work (``reconcile``): a polled provider's job is asked about when its
deadline comes — the poll schedule of statemachine/rules.py — and only when the provider's poll
quota has a token (service/steps/pacing.py); without one the task's next look is put off to when
there will be one, a quiet write, so nothing waits in memory. A 429 pauses that provider's polls
for its ``Retry-After``.

**The timeline**: every reaper poll is noted on its task's timeline (what the provider answered,
or the error, and how long it took), and ``note`` is how the steps note their own calls: in the
background, best effort, so a note never holds up or fails the work it describes.

**Bytes in an outcome** (a ``data:`` URI output: OpenAI answers with the image itself) are stored
at once under ``outputs/<task>/provider/`` and the outcome carries ``blob:<key>`` instead, so the
task record stays small and the watermarking step reads the blob.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, ProviderRateLimited
from callbacks.http import error_status
from callbacks.provider import Outcome, Provider
from service.background import Background
from service.blobs.base import BlobStore, provider_output_key
from service.media.images import sniff_content_type
from service.steps.pacing import Pacing
from service.styles import Catalogue
from service.timings import Timings
from statemachine import lifecycle
from statemachine.errors import NotFound
from statemachine.rules import (
    Adopt,
    Choices,
    Decision,
    Fail,
    Ignore,
    News,
    Overdue,
    Retry,
    StepFailed,
    judge,
    record,
)
from statemachine.store import TaskStore
from statemachine.task import Task
from statemachine.timeline import NoteKind, Timeline, elapsed_ms, note_quietly, poll_note

log = structlog.get_logger()

BLOB_REF: Final = "blob:"  # an output already stored by hookline (the provider sent the bytes)
MAX_OUTPUT_BYTES: Final = 50_000_000
POLL_TOKEN_WAIT_S: Final = 0.5  # a reaper poll waits this long for a token, else is put off


class OutcomeApplier:
    """Persists the outcome rules' decisions for one process."""

    def __init__(
        self,
        store: TaskStore,
        providers: Mapping[str, Provider],
        catalogue: Catalogue,
        timings: Timings,
        blobs: BlobStore,
        background: Background,
        *,
        default_model: Callable[[str], str],
        now: Callable[[], float],
        rng: random.Random | None = None,
        pacing: Pacing | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        timeline: Timeline | None = None,
    ) -> None:
        self.store = store
        self.timeline = timeline
        self.pacing = pacing
        self.max_output_bytes = max_output_bytes
        self.providers = providers
        self.catalogue = catalogue
        self.timings = timings
        self.blobs = blobs
        self.background = background
        self.default_model = default_model
        self.now = now
        self.rng = rng or random.Random()
        self.reconciliations = 0  # overdue jobs settled by a poll (lost webhooks)

    def note(self, task_id: str, kind: NoteKind, data: dict[str, Any]) -> None:
        """Note something about a task on its timeline, now, in the background (best effort)."""
        if self.timeline is not None:
            note = note_quietly(self.timeline, task_id, kind, self.now(), data)
            self.background.spawn(note)

    async def apply(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome (a webhook, or a poll made for one); say what happened.
        ``task`` is the record if the caller has just read it (the webhook receiver has)."""
        try:
            outcome = await self.kept(task_id, outcome)
        except ProviderError as exc:
            outcome = Outcome("failed", outcome.job_id, reason=exc.message)
        return await self.settle(task_id, outcome, task)

    async def kept(self, task_id: str, outcome: Outcome) -> Outcome:
        """``outcome`` with every ``data:`` output stored as a blob and named ``blob:<key>``
        (a malformed or oversized one is a ``ProviderError``: the provider's answer was bad)."""
        if not outcome.succeeded or not any(o.startswith("data:") for o in outcome.outputs):
            return outcome
        kept: list[str] = []
        for index, output in enumerate(outcome.outputs):
            if not output.startswith("data:"):
                kept.append(output)
                continue
            data = _data_uri_bytes(output, self.max_output_bytes)
            content_type = sniff_content_type(data)
            if content_type is None:
                raise ProviderError("the provider's image is not a JPEG, PNG or WebP")
            ext = content_type.split("/")[-1]
            key = provider_output_key(task_id, outcome.job_id, index, ext)
            await self.blobs.put(key, data, content_type)
            kept.append(BLOB_REF + key)
        return dataclasses.replace(outcome, outputs=tuple(kept))

    async def step_failed(
        self, task: Task, code: str, message: str, *, retryable: bool, owner: str
    ) -> str:
        """A leased step of ``owner`` could not finish: retry after a backoff if the failure
        allows one and attempts are left, else fail the task (with its refund)."""
        return await self.settle(task.id, StepFailed(code, message, retryable, owner))

    async def reconcile(self, task: Task, now: float) -> None:
        """The reaper's ``ai_processing`` branch: claim the overdue task (by moving its deadline),
        poll the provider, then judge what it said: adopt a success, extend while it runs within
        the hard cap, otherwise retry (or fail after the last attempt)."""
        timing = self.timings.for_task(task)
        provider = self.providers.get(task.provider)
        job = task.provider_job_id
        token_at: float | None = None
        if self.pacing is not None and provider is not None and job is not None:
            reserved_now = self.pacing.now()
            reserved = self.pacing.reserve(task.provider, "poll", POLL_TOKEN_WAIT_S)
            if reserved is None:  # no poll token soon: look again when there will be one
                later = now + self.pacing.wait_s(task.provider, "poll") + self.rng.random()
                await lifecycle.update(self.store, task, now, deadline=later)
                return
            token_at = reserved_now + reserved
        claimed = await lifecycle.update(self.store, task, now, deadline=now + timing.lease_s)
        if claimed is None:
            return  # another reaper or a webhook got there first
        job = claimed.provider_job_id
        news = Overdue(job)
        if job is not None and provider is not None:
            if token_at is not None and self.pacing is not None:
                await self.pacing.spaced(claimed.provider, "poll", token_at)
            news = await self._poll(claimed, provider, job)
        if news.answer is not None and news.answer.final:
            self.reconciliations += 1
            log.info("reconciled_by_poll", status=news.answer.status)
        await self.settle(claimed.id, news, claimed)

    async def _poll(self, task: Task, provider: Provider, job: str) -> Overdue:
        """Ask the provider about the overdue task's job (noted on its timeline); what it said,
        as news for the rules (no answer: a failed poll, judged as a timeout)."""
        started = time.perf_counter()
        answer: Outcome | None = None
        error: ProviderError | None = None
        latency: float | None = None
        news = Overdue(job)
        try:
            answer = await provider.poll(job, task.model)
            latency = elapsed_ms(started)  # the poll's, before any output bytes are stored
            news = Overdue(job, answer=await self.kept(task.id, answer))
        except PermanentProviderError as exc:
            log.warning("poll_refused", error=exc.message)
            error, news = exc, Overdue(job, gone=exc.message)
        except ProviderRateLimited as exc:
            log.warning("poll_rate_limited", retry_after_s=exc.retry_after_s)
            if self.pacing is not None and exc.retry_after_s:
                self.pacing.pause(task.provider, "poll", exc.retry_after_s)
            error = exc
        except ProviderError as exc:
            log.warning("poll_failed", error=exc.message)
            error = exc
        status = error_status(error) if error is not None else None
        latency = latency if latency is not None else elapsed_ms(started)
        data = poll_note(task.provider, job, "reaper", latency, answer, error, status)
        self.note(task.id, "poll", data)
        return news

    async def settle(self, task_id: str, news: News, known: Task | None = None) -> str:
        """Judge ``news`` on the stored task and persist the decision; on a lost race, judge again
        on what is stored now. Returns the decision's word (``already_applied`` when a racing
        change made the news moot)."""
        judged: list[tuple[Task, Decision]] = []

        def change(task: Task) -> Task | lifecycle.Refused:
            now = self.now()
            timing = self.timings.for_task(task)
            choices = Choices(self.rng.random(), self._fallback(task))
            decision = judge(task, news, now, timing, choices)
            judged.append((task, decision))
            new = record(task, decision, now, timing)
            return new if new is not None else lifecycle.Refused(task, decision.word)

        try:
            result = await lifecycle.race(self.store, task_id, change, known=known)
        except NotFound:
            return "unknown_task"
        before, decision = judged[-1]
        if isinstance(result, lifecycle.Refused):
            lost_a_race = len(judged) > 1 and not isinstance(judged[0][1], Ignore)
            return "already_applied" if lost_a_race else decision.word
        self._after(before, decision)
        return decision.word

    def _after(self, before: Task, decision: Decision) -> None:
        """Side effects of a stored decision, in the background. A job to cancel runs on the
        provider the task was on before the decision (a retry may move it to a fallback)."""
        if isinstance(decision, Adopt | Retry | Fail) and decision.cancel:
            cancel = self.cancel_quietly(before.provider, decision.cancel, before.model)
            self.background.spawn(cancel)
        if isinstance(decision, Fail):
            self.background.spawn(self._delete_outputs(before.id))

    def _fallback(self, task: Task) -> tuple[str, str] | None:
        """The next provider of the style's fallback list (for a failure that was the
        provider's), or None to stay."""
        style = self.catalogue.get(task.style)
        chain = [task.provider, *[p for p in style.fallbacks if p != task.provider]]
        usable = [p for p in chain if p in self.providers]
        if len(usable) < 2 or task.provider not in usable:
            return None
        nxt = usable[(usable.index(task.provider) + 1) % len(usable)]
        return nxt, self.default_model(nxt)

    async def _delete_outputs(self, task_id: str) -> None:
        await self.blobs.delete_prefix(f"outputs/{task_id}/")

    async def cancel_job(self, task: Task) -> None:
        """Cancel a task's current provider job, best effort."""
        await self.cancel_quietly(task.provider, task.provider_job_id, task.model)

    async def cancel_quietly(self, provider_name: str, job_id: str | None, model: str) -> None:
        provider = self.providers.get(provider_name)
        if provider is None or job_id is None:
            return
        try:
            await provider.cancel(job_id, model)
        except ProviderError as exc:
            log.info("provider_cancel_failed", job_id=job_id, error=exc.message)


def _data_uri_bytes(uri: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:<type>;base64,<data>`` URI, at most ``max_bytes`` of them."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ProviderError("the provider's image is not a base64 data URI")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ProviderError(f"the provider's image is over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError("the provider's image is not valid base64") from exc
