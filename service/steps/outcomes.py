"""What a provider's outcome does to a task: adopt a success, defer an early one, retry after a
backoff, fail with a refund, reconcile an overdue job by polling.

Every change is a compare-and-set guarded by what the decision assumed: the job it is about is
still the current one *and* the task is still in ``ai_processing`` (a success that raced a
timeout must win), or the lease of the step that decided is still held. Nothing here makes an
outbound call on a webhook's request path: cleanups (deleting outputs, cancelling a superseded
job) are spawned after the write.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from callbacks.errors import PermanentProviderError, ProviderError
from callbacks.provider import Outcome, Provider
from service.runtime import Services
from statemachine import lifecycle
from statemachine.attempts import attempt_of, close_attempt
from statemachine.decide import backoff_s
from statemachine.states import Event, State
from statemachine.task import Task, TaskFailure

log = structlog.get_logger()


class Scheduler(Protocol):
    """How outcomes start work later: the worker's background runner."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def spawn_at(self, when: float, task_id: str) -> None: ...

    def kick(self, task_id: str) -> None:
        """Run the step the task's state needs, now, in the background."""


def current(expected_job: str | None, owner: str | None) -> Callable[[Task], bool]:
    """A guard: the decision still holds for the stored task.

    ``expected_job``: the decision was about that job, so the task must still be waiting on it
    (``ai_processing``, same job id). ``owner``: the decision was made by a step holding the
    lease, so the lease must still be its own."""

    def holds(task: Task) -> bool:
        if expected_job is not None and (
            task.state is not State.AI_PROCESSING or task.provider_job_id != expected_job
        ):
            return False
        return owner is None or task.lease_owner == owner

    return holds


class Outcomes:
    def __init__(self, svc: Services, scheduler: Scheduler, rng: random.Random) -> None:
        self.svc = svc
        self.scheduler = scheduler
        self.rng = rng

    async def apply(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome (from a webhook or a poll) monotonically; say what happened.

        ``task`` is the record if the caller has just read it (the webhook receiver has)."""
        if task is None or task.id != task_id:
            task = await self.svc.store.get_task(task_id)
        if task is None:
            return "unknown_task"
        if task.terminal:
            return "after_terminal"
        if outcome.status == "running":
            return "running"
        if task.state is State.PROCESSING:
            return await self._defer(task, outcome)
        if task.state is not State.AI_PROCESSING:
            return "ignored"
        if outcome.job_id == task.provider_job_id:
            if outcome.status == "succeeded":
                return await self._succeeded(task, outcome)
            reason = outcome.reason or f"provider reported {outcome.status}"
            return await self.retry_or_fail(
                task.id,
                "provider_failed",
                reason,
                outcome.retryable,
                expected_job=outcome.job_id,
                provider_fault=True,
            )
        if outcome.status == "succeeded" and attempt_of(task, outcome.job_id) is not None:
            return await self._succeeded(task, outcome, late=True)
        return "stale"

    async def _succeeded(self, task: Task, outcome: Outcome, *, late: bool = False) -> str:
        svc = self.svc
        now = svc.now()
        if not outcome.outputs:
            return await self.retry_or_fail(
                task.id,
                "no_outputs",
                "provider returned no outputs",
                True,
                expected_job=outcome.job_id,
            )
        waiting_on = task.provider_job_id
        old = attempt_of(task, outcome.job_id)
        detail = f"adopted late success of attempt {old.number}" if late and old else None
        result = await lifecycle.advance(
            svc.store,
            task.id,
            Event.AI_SUCCEEDED,
            now,
            svc.deadlines,
            detail=detail,
            changes=lambda t: {
                "provider_outputs": outcome.outputs,
                "provider_job_id": outcome.job_id,
                "attempt_log": close_attempt(t, "succeeded", now, job_id=outcome.job_id),
                "step_retries": 0,  # the watermarking step gets its own hand-back budget
            },
            guard=lambda t: t.provider_job_id == waiting_on,
            known=task,
        )
        if isinstance(result, lifecycle.Refused):
            return "already_applied"
        if late and waiting_on and waiting_on != outcome.job_id:
            provider = svc.providers.get(task.provider)
            self.scheduler.spawn(self.cancel_quietly(provider, waiting_on, task.model))
        return "late_success" if late else "succeeded"

    async def _defer(self, task: Task, outcome: Outcome) -> str:
        """Keep an outcome that arrived before the submit was recorded (or while the task backs
        off before its next attempt); the processing step applies it. A success is never
        replaced; a newer job's outcome replaces an older failure; an outcome for an attempt that
        is already over is stale."""
        prior = attempt_of(task, outcome.job_id)
        if outcome.status != "succeeded" and prior is not None and prior.outcome is not None:
            return "stale"
        early = task.early_outcome or {}
        if early.get("status") == "succeeded":
            return "already_deferred"
        if early.get("job_id") == outcome.job_id and outcome.status != "succeeded":
            return "already_deferred"
        record = {
            "status": outcome.status,
            "job_id": outcome.job_id,
            "outputs": list(outcome.outputs),
            "reason": outcome.reason,
            "retryable": outcome.retryable,
        }
        updated = await lifecycle.update(self.svc.store, task, self.svc.now(), early_outcome=record)
        if updated is None:
            return await self.apply(task.id, outcome)  # the record moved: decide again
        if not updated.lease_held(self.svc.now()) and outcome.status == "succeeded":
            self.scheduler.kick(task.id)
        return "deferred"

    async def retry_or_fail(
        self,
        task_id: str,
        code: str,
        message: str,
        retryable: bool,
        *,
        expected_job: str | None = None,
        owner: str | None = None,
        provider_fault: bool = False,
        outcome: str = "failed",
    ) -> str:
        """Another attempt after a backoff if the failure allows one, else ``failed`` (refunded).
        ``expected_job``/``owner`` guard the decision (see ``current``)."""
        svc = self.svc
        now = svc.now()
        holds = current(expected_job, owner)
        task = await svc.store.get_task(task_id)
        if task is None or task.terminal:
            return "after_terminal"
        if not holds(task):
            return "stale"
        timing = svc.deadlines_for(task)
        if retryable and task.attempts < timing.max_attempts:
            delay = backoff_s(task.attempts, timing.retry_backoff_s, self.rng.random())

            def changes(t: Task) -> dict[str, Any]:
                fields: dict[str, Any] = {
                    "attempts": t.attempts + 1,
                    "provider_job_id": None,
                    "provider_outputs": (),
                    "early_outcome": None,
                    "error": TaskFailure(code, message),
                    "attempt_log": close_attempt(t, outcome, now)
                    if t.provider_job_id
                    else t.attempt_log,
                }
                if provider_fault:
                    fields.update(self._fallback(t))
                return fields

            result = await lifecycle.advance(
                svc.store,
                task_id,
                Event.RETRY,
                now,
                timing,
                detail=f"{code}: {message}"[:300],
                delay_s=delay,
                changes=changes,
                guard=holds,
                known=task,
            )
            if not isinstance(result, lifecycle.Refused):
                log.info("task_retry", code=code, attempt=result.attempts, delay_s=round(delay, 2))
                self.scheduler.spawn_at(now + delay, task_id)
                return "retry"
            if result.task.terminal or not holds(result.task):
                return "already_applied"
        return await self.fail(
            task_id, code, message, expected_job=expected_job, owner=owner, outcome=outcome
        )

    def _fallback(self, task: Task) -> dict[str, Any]:
        """The next provider of the style's fallback list, for a failure that was the provider's."""
        style = self.svc.catalogue.get(task.style)
        chain = [task.provider, *[p for p in style.fallbacks if p != task.provider]]
        usable = [p for p in chain if p in self.svc.providers]
        if len(usable) < 2 or task.provider not in usable:
            return {}
        nxt = usable[(usable.index(task.provider) + 1) % len(usable)]
        return {"provider": nxt, "model": self.svc.settings.default_model(nxt)}

    async def fail(
        self,
        task_id: str,
        code: str,
        message: str,
        *,
        expected_job: str | None = None,
        owner: str | None = None,
        outcome: str = "failed",
    ) -> str:
        """Any non-terminal state → failed, with the refund written by the same compare-and-set;
        outputs already stored are deleted afterwards."""
        svc = self.svc
        now = svc.now()

        def changes(t: Task) -> dict[str, Any]:
            log_ = close_attempt(t, outcome, now) if t.provider_job_id else t.attempt_log
            return {"error": TaskFailure(code, message), "attempt_log": log_}

        result = await lifecycle.advance(
            svc.store,
            task_id,
            Event.FAIL,
            now,
            svc.deadlines,
            detail=f"{code}: {message}"[:300],
            changes=changes,
            guard=current(expected_job, owner),
        )
        if isinstance(result, lifecycle.Refused):
            return "already_applied"
        log.warning("task_failed", code=code, error=message)
        self.scheduler.spawn(self._delete_outputs(task_id))
        return "failed"

    async def _delete_outputs(self, task_id: str) -> None:
        await self.svc.blobs.delete_prefix(f"outputs/{task_id}/")

    # --- reconciliation (the reaper's ai_processing branch) -------------------------------------

    async def reconcile(self, task: Task, now: float) -> None:
        """Poll the provider for an overdue job: adopt a success, extend while running within the
        hard cap, otherwise retry (or fail after the last attempt)."""
        svc = self.svc
        timing = svc.deadlines_for(task)
        claimed = await lifecycle.update(svc.store, task, now, deadline=now + timing.lease_s)
        if claimed is None:
            return  # another reaper or a webhook got there first
        job = claimed.provider_job_id
        if job is None:  # cannot happen through the machine; never leave such a task waiting
            await self.retry_or_fail(claimed.id, "lost_job", "no provider job recorded", True)
            return
        provider = svc.providers.get(claimed.provider)
        attempt = attempt_of(claimed, job)
        started = attempt.submitted_at if attempt and attempt.submitted_at else claimed.updated_at
        over_cap = now - started >= timing.ai_hard_cap_s
        outcome: Outcome | None = None
        if provider is not None:
            try:
                outcome = await provider.poll(job, claimed.model)
            except PermanentProviderError as exc:
                log.warning("poll_refused", error=exc.message)
                await self._timeout(claimed, f"provider no longer knows the job: {exc.message}")
                return
            except ProviderError as exc:
                log.warning("poll_failed", error=exc.message)
        counters = svc.extras.setdefault("counters", {})
        counters.setdefault("reconciliations", 0)
        if outcome is not None and outcome.final:
            counters["reconciliations"] += 1
            log.info("reconciled_by_poll", status=outcome.status)
            await self.apply(claimed.id, outcome)
            return
        if over_cap:
            await self._timeout(claimed, "no result within the hard cap")
            return
        remaining = started + timing.ai_hard_cap_s - now
        await lifecycle.advance(
            svc.store,
            claimed.id,
            Event.EXTEND,
            now,
            timing,
            detail="provider still running" if outcome else "poll failed; waiting",
            delay_s=min(timing.ai_deadline_s, remaining),
            guard=current(job, None),
        )

    async def _timeout(self, task: Task, message: str) -> None:
        job = task.provider_job_id
        result = await self.retry_or_fail(
            task.id,
            "timeout",
            message,
            True,
            expected_job=job,
            provider_fault=True,
            outcome="timeout",
        )
        if result in ("retry", "failed"):  # the job is given up only if the timeout won
            await self.cancel_quietly(self.svc.providers.get(task.provider), job, task.model)

    async def cancel_job(self, task: Task) -> None:
        """Cancel a task's current provider job, best effort."""
        provider = self.svc.providers.get(task.provider)
        await self.cancel_quietly(provider, task.provider_job_id, task.model)

    async def cancel_quietly(
        self, provider: Provider | None, job_id: str | None, model: str
    ) -> None:
        if provider is None or job_id is None:
            return
        try:
            await provider.cancel(job_id, model)
        except ProviderError as exc:
            log.info("provider_cancel_failed", job_id=job_id, error=exc.message)
