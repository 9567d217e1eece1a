"""Applying the outcome rules: read the task, judge (statemachine/rules.py), compare-and-set the
record the decision gives, and only then start its side effects.

Called directly by the webhook receiver (an outcome in a delivery), by the reaper (``reconcile``:
an overdue job is polled first) and by the steps (``step_failed``). Nothing here starts a step:
the change feed does (the dispatcher) and the reaper is the backstop, so a process that only
serves the API never runs one. Nothing here makes an outbound call on a webhook's request path
either: cleanups (cancelling a superseded or timed-out job, deleting a failed task's outputs) go
to the background after the write.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import structlog

from callbacks.errors import PermanentProviderError, ProviderError
from callbacks.provider import Outcome, Provider
from service.background import Background
from service.blobs.base import BlobStore
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

log = structlog.get_logger()


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
    ) -> None:
        self.store = store
        self.providers = providers
        self.catalogue = catalogue
        self.timings = timings
        self.blobs = blobs
        self.background = background
        self.default_model = default_model
        self.now = now
        self.rng = rng or random.Random()
        self.reconciliations = 0  # overdue jobs settled by a poll (lost webhooks)

    async def apply(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome (a webhook, or a poll made for one); say what happened.
        ``task`` is the record if the caller has just read it (the webhook receiver has)."""
        return await self.settle(task_id, outcome, task)

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
        claimed = await lifecycle.update(self.store, task, now, deadline=now + timing.lease_s)
        if claimed is None:
            return  # another reaper or a webhook got there first
        job = claimed.provider_job_id
        news = Overdue(job)
        provider = self.providers.get(claimed.provider)
        if job is not None and provider is not None:
            try:
                news = Overdue(job, answer=await provider.poll(job, claimed.model))
            except PermanentProviderError as exc:
                log.warning("poll_refused", error=exc.message)
                news = Overdue(job, gone=exc.message)
            except ProviderError as exc:
                log.warning("poll_failed", error=exc.message)
        if news.answer is not None and news.answer.final:
            self.reconciliations += 1
            log.info("reconciled_by_poll", status=news.answer.status)
        await self.settle(claimed.id, news, claimed)

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
