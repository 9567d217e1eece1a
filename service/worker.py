"""The steps that do I/O: submit (processing), copy and watermark outputs (watermarking), apply
provider outcomes, retry or fail, reconcile overdue jobs. Every step begins with a lease or a
compare-and-set claim and is safe to run again (at-least-once, idempotent effects)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, ProviderRateLimited
from callbacks.provider import Outcome, Provider, Submission
from service.blobs import output_key
from service.context import Services
from service.fetch import FetchError, SafeFetcher
from service.images import prepare_input, sniff_content_type
from service.watermark import WatermarkConfig, apply_watermark
from statemachine import lifecycle
from statemachine.attempts import attempt_of, close_attempt, open_attempt
from statemachine.decide import backoff_s
from statemachine.errors import HooklineError
from statemachine.states import Event, State
from statemachine.task import Output, Task, TaskFailure

log = structlog.get_logger()

SUBMIT_TRIES = 3
FETCH_TRIES = 3
DATA_URI_MAX_BYTES = 256_000
QUEUE_RECHECK_S = 1.0  # a pending task over its provider's limit is offered again after this
MAX_STEP_RETRIES = 5  # hand-backs of the watermarking step before the task fails


class Worker:
    """One process's step runner. ``owner`` names its leases."""

    def __init__(
        self,
        svc: Services,
        owner: str,
        *,
        input_fetcher: SafeFetcher,
        output_fetchers: dict[str, SafeFetcher],
        watermark: WatermarkConfig,
        concurrency: int = 32,
        rng: random.Random | None = None,
    ) -> None:
        self.svc = svc
        self.owner = owner
        self.input_fetcher = input_fetcher
        self.output_fetchers = output_fetchers
        self.watermark_cfg = watermark
        self.rng = rng or random.Random()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()

    # --- running steps in the background -------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background under the concurrency limit; errors are logged."""

        async def guarded() -> None:
            async with self._slots:
                try:
                    await coro
                except Exception as exc:
                    log.exception("step_crashed", error=repr(exc))

        job = asyncio.create_task(guarded())
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    def spawn_at(self, when: float, task_id: str) -> None:
        """Run the step ``task_id`` needs at ``when`` (after a backoff)."""
        delay = max(0.0, when - self.svc.now())
        asyncio.get_running_loop().call_later(delay, lambda: self.spawn(self._dispatch_id(task_id)))

    async def _dispatch_id(self, task_id: str) -> None:
        task = await self.svc.store.get_task(task_id)
        if task is not None:
            await self.dispatch(task)

    async def close(self) -> None:
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self._running)

    async def dispatch(self, task: Task) -> None:
        """Run the step ``task``'s state needs now (the reaper's way in)."""
        if task.state is State.WATERMARKING:
            await self.watermark(task.id)
        elif task.state in (State.PENDING, State.PROCESSING):
            await self.process(task.id)

    # --- processing: inputs, prompt, submit ----------------------------------------------------

    async def process(self, task_id: str) -> None:
        """pending/processing → ai_processing: claim, prepare inputs, submit, record the job id."""
        svc = self.svc
        task = await svc.store.get_task(task_id)
        now = svc.now()
        if task is None or task.state not in (State.PENDING, State.PROCESSING):
            return
        backing_off = task.deadline is not None and task.deadline > now
        if task.state is State.PROCESSING and not task.lease_held(now) and backing_off:
            return  # waiting out a retry's backoff; the dispatcher or the reaper comes back
        if task.state is State.PENDING and await self._provider_full(task, now):
            return
        claimed = await lifecycle.take_lease(
            svc.store, task, self.owner, now, svc.deadlines.lease_s
        )
        if claimed is None:
            return
        structlog.contextvars.bind_contextvars(task_id=task_id)
        if claimed.early_outcome and claimed.early_outcome.get("status") == "succeeded":
            await self._adopt_early(claimed)
            return
        provider = svc.providers.get(claimed.provider)
        if provider is None:
            await self.fail(claimed.id, "unknown_provider", f"provider {claimed.provider} is gone")
            return
        try:
            submission = await self._submission(claimed, provider)
            job_id = await self._submit(provider, submission)
        except FetchError as exc:
            if exc.retryable:
                await self.retry_or_fail(claimed.id, "input_unavailable", exc.message, False)
            else:
                await self.fail(claimed.id, exc.code, exc.message)
        except PermanentProviderError as exc:
            await self.fail(claimed.id, exc.code, exc.message)
        except ProviderError as exc:
            await self.retry_or_fail(claimed.id, exc.code, exc.message, True)
        except HooklineError as exc:
            await self.fail(claimed.id, exc.code, exc.message)
        else:
            await self._submitted(claimed, provider, job_id)

    async def _provider_full(self, task: Task, now: float) -> bool:
        """True if the task's provider has its limit of jobs in flight; the task then stays
        pending with a near deadline, so the reaper offers it again (oldest deadline first).

        Counted in the store, so the cap holds across processes, give or take tasks started in
        the same instant by two processes."""
        limit = self.svc.settings.provider_concurrency
        if limit <= 0 or await self.svc.store.count_active(task.provider) < limit:
            return False
        await lifecycle.update(self.svc.store, task, now, deadline=now + QUEUE_RECHECK_S)
        return True

    async def _submission(self, task: Task, provider: Provider) -> Submission:
        style = self.svc.catalogue.get(task.style)
        inputs = [
            await self._input_ref(task, i, item, provider) for i, item in enumerate(task.inputs)
        ]
        return Submission(
            task_id=task.id,
            attempt=task.attempts,
            model=task.model,
            prompt=style.render(task.prompt),
            negative_prompt=style.negative_prompt,
            callback_url=self.callback_url(task),
            inputs=tuple(inputs),
            num_outputs=task.num_outputs,
            params=task.params,
        )

    def callback_url(self, task: Task) -> str:
        base = self.svc.settings.public_url.rstrip("/")
        return f"{base}/v1/callbacks/{task.provider}/{task.id}?token={task.callback_token}"

    async def _input_ref(
        self, task: Task, index: int, item: dict[str, str], provider: Provider
    ) -> str:
        """A reference to the input the provider can use: a data URI or a signed URL."""
        svc = self.svc
        if "upload" in item:
            data = await svc.blobs.get(item["upload"])
        else:
            fetched = await self.input_fetcher.fetch(item["url"])
            data = fetched.data
        limits = provider.limits
        prepared = await asyncio.to_thread(
            prepare_input, data, max_side=limits.max_side, formats=limits.formats, data_uri=False
        )
        assert isinstance(prepared, bytes)
        if limits.accepts_data_uri and len(prepared) <= DATA_URI_MAX_BYTES:
            ref = await asyncio.to_thread(
                prepare_input,
                prepared,
                max_side=limits.max_side,
                formats=limits.formats,
                data_uri=True,
            )
            assert isinstance(ref, str)
            return ref
        key = f"inputs/{task.id}/{index}"
        await svc.blobs.put(key, prepared, sniff_content_type(prepared) or "image/jpeg")
        return await svc.blobs.url(key, int(svc.deadlines.ai_hard_cap_s))

    async def _submit(self, provider: Provider, submission: Submission) -> str:
        """Submit, retrying transient failures inside the step (honouring Retry-After)."""
        for attempt in range(1, SUBMIT_TRIES + 1):
            try:
                return await provider.submit(submission)
            except PermanentProviderError:
                raise
            except ProviderError as exc:
                if attempt == SUBMIT_TRIES:
                    raise
                wait = backoff_s(attempt, 0.5, self.rng.random())
                if isinstance(exc, ProviderRateLimited) and exc.retry_after_s:
                    wait = min(exc.retry_after_s, 30.0)
                log.warning("submit_retry", error=exc.message, wait_s=round(wait, 2))
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _submitted(self, task: Task, provider: Provider, job_id: str) -> None:
        """Record the job id (processing → ai_processing); apply an outcome that raced ahead."""
        svc = self.svc
        now = svc.now()
        early: dict[str, Any] = {}

        def changes(t: Task) -> dict[str, Any]:
            early.clear()
            early.update(t.early_outcome or {})
            return {
                "provider_job_id": job_id,
                "attempt_log": open_attempt(t, job_id, now),
                "early_outcome": None,
            }

        result = await lifecycle.advance(
            svc.store,
            task.id,
            Event.SUBMITTED,
            now,
            svc.deadlines,
            detail=f"{task.provider} job {job_id}",
            changes=changes,
            guard=lambda t: t.lease_owner == self.owner and t.attempts == task.attempts,
        )
        if isinstance(result, lifecycle.Refused):
            log.info("submit_orphaned", job_id=job_id, state=result.task.state.value)
            await self._cancel_quietly(provider, job_id, task.model)
            return
        log.info("task_submitted", job_id=job_id, provider=task.provider)
        if early:
            outcome = Outcome(
                status=early["status"],
                job_id=early["job_id"],
                outputs=tuple(early.get("outputs", ())),
                reason=early.get("reason"),
                retryable=early.get("retryable", True),
            )
            await self.apply_outcome(task.id, outcome)

    async def _adopt_early(self, task: Task) -> None:
        """A success arrived while the task was in processing: adopt it instead of submitting."""
        early = task.early_outcome or {}
        job_id = str(early["job_id"])
        now = self.svc.now()
        result = await lifecycle.advance(
            self.svc.store,
            task.id,
            Event.SUBMITTED,
            now,
            self.svc.deadlines,
            detail=f"adopted {task.provider} job {job_id} that had already succeeded",
            changes=lambda t: {
                "provider_job_id": job_id,
                "attempt_log": open_attempt(t, job_id, now)
                if attempt_of(t, job_id) is None
                else t.attempt_log,
                "early_outcome": None,
            },
            guard=lambda t: t.lease_owner == self.owner,
        )
        if isinstance(result, lifecycle.Refused):
            return
        outcome = Outcome("succeeded", job_id, tuple(early.get("outputs", ())))
        await self.apply_outcome(task.id, outcome)

    # --- outcomes ------------------------------------------------------------------------------

    async def apply_outcome(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome (from a webhook or a poll) monotonically; say what happened.

        ``task`` is the record if the caller has just read it (the webhook receiver has)."""
        svc = self.svc
        if task is None or task.id != task_id:
            task = await svc.store.get_task(task_id)
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
        current = task.provider_job_id
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
            },
            guard=lambda t: t.provider_job_id == current,
            known=task,
        )
        if isinstance(result, lifecycle.Refused):
            return "already_applied"
        if late and current and current != outcome.job_id:
            await self._cancel_quietly(svc.providers.get(task.provider), current, task.model)
        return "late_success" if late else "succeeded"

    async def _defer(self, task: Task, outcome: Outcome) -> str:
        """Keep an outcome that arrived before the submit was recorded (or for a task backing off
        before its next attempt); the processing step applies it."""
        if task.early_outcome and task.early_outcome.get("status") == "succeeded":
            return "already_deferred"
        if outcome.status != "succeeded" and task.early_outcome:
            return "already_deferred"
        early = {
            "status": outcome.status,
            "job_id": outcome.job_id,
            "outputs": list(outcome.outputs),
            "reason": outcome.reason,
            "retryable": outcome.retryable,
        }
        updated = await lifecycle.update(self.svc.store, task, self.svc.now(), early_outcome=early)
        if updated is None:
            return await self.apply_outcome(task.id, outcome)  # the record moved: decide again
        if not updated.lease_held(self.svc.now()) and outcome.status == "succeeded":
            self.spawn(self.process(task.id))
        return "deferred"

    async def retry_or_fail(
        self,
        task_id: str,
        code: str,
        message: str,
        retryable: bool,
        *,
        expected_job: str | None = None,
        provider_fault: bool = False,
        outcome: str = "failed",
    ) -> str:
        """Another attempt after a backoff if the failure allows one, else ``failed`` (refunded)."""
        svc = self.svc
        now = svc.now()
        task = await svc.store.get_task(task_id)
        if task is None or task.terminal:
            return "after_terminal"
        if expected_job is not None and task.provider_job_id != expected_job:
            return "stale"
        if retryable and task.attempts < svc.deadlines.max_attempts:
            delay = backoff_s(task.attempts, svc.deadlines.retry_backoff_s, self.rng.random())

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
                svc.deadlines,
                detail=f"{code}: {message}"[:300],
                delay_s=delay,
                changes=changes,
                guard=lambda t: expected_job is None or t.provider_job_id == expected_job,
            )
            if not isinstance(result, lifecycle.Refused):
                log.info("task_retry", code=code, attempt=result.attempts, delay_s=round(delay, 2))
                self.spawn_at(now + delay, task_id)
                return "retry"
            if result.task.terminal or result.task.provider_job_id != task.provider_job_id:
                return "already_applied"
        return await self.fail(task_id, code, message, expected_job=expected_job, outcome=outcome)

    def _fallback(self, task: Task) -> dict[str, Any]:
        """The next provider of the style's fallback list, for a failure that was the provider's."""
        style = self.svc.catalogue.get(task.style)
        chain = [task.provider, *[p for p in style.fallbacks if p != task.provider]]
        usable = [p for p in chain if p in self.svc.providers]
        if len(usable) < 2:
            return {}
        nxt = (
            usable[(usable.index(task.provider) + 1) % len(usable)]
            if task.provider in usable
            else usable[0]
        )
        if nxt == task.provider:
            return {}
        from service.api import default_model

        return {"provider": nxt, "model": default_model(self.svc, nxt)}

    async def fail(
        self,
        task_id: str,
        code: str,
        message: str,
        *,
        expected_job: str | None = None,
        outcome: str = "failed",
    ) -> str:
        """Any non-terminal state → failed, with the refund written by the same compare-and-set."""
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
            guard=lambda t: expected_job is None or t.provider_job_id == expected_job,
        )
        if isinstance(result, lifecycle.Refused):
            return "already_applied"
        log.warning("task_failed", code=code, error=message)
        await svc.blobs.delete_prefix(f"outputs/{task_id}/")
        if result.provider_job_id:
            await self._cancel_quietly(
                svc.providers.get(result.provider), result.provider_job_id, result.model
            )
        return "failed"

    # --- reconciliation (the reaper's ai_processing branch) -------------------------------------

    async def reconcile(self, task: Task, now: float) -> None:
        """Poll the provider for an overdue job: adopt a success, extend while running within the
        hard cap, otherwise retry (or fail after the last attempt)."""
        svc = self.svc
        claimed = await lifecycle.update(svc.store, task, now, deadline=now + svc.deadlines.lease_s)
        if claimed is None or claimed.provider_job_id is None:
            return  # another reaper or a webhook got there first
        structlog.contextvars.bind_contextvars(task_id=task.id)
        provider = svc.providers.get(claimed.provider)
        attempt = attempt_of(claimed, claimed.provider_job_id)
        started = attempt.submitted_at if attempt and attempt.submitted_at else claimed.updated_at
        over_cap = now - started >= svc.deadlines.ai_hard_cap_s
        outcome: Outcome | None = None
        if provider is not None:
            try:
                outcome = await provider.poll(claimed.provider_job_id, claimed.model)
            except PermanentProviderError as exc:
                log.warning("poll_refused", error=exc.message)
                await self._timeout(claimed, f"provider no longer knows the job: {exc.message}")
                return
            except ProviderError as exc:
                log.warning("poll_failed", error=exc.message)
        svc.extras.setdefault("counters", {}).setdefault("reconciliations", 0)
        if outcome is not None and outcome.final:
            svc.extras["counters"]["reconciliations"] += 1
            log.info("reconciled_by_poll", status=outcome.status)
            await self.apply_outcome(claimed.id, outcome)
            return
        if over_cap:
            await self._timeout(claimed, "no result within the hard cap")
            return
        remaining = started + svc.deadlines.ai_hard_cap_s - now
        extend = min(svc.deadlines.ai_deadline_s, remaining)
        await lifecycle.advance(
            svc.store,
            claimed.id,
            Event.EXTEND,
            now,
            svc.deadlines,
            detail="provider still running" if outcome else "poll failed; waiting",
            delay_s=extend,
            guard=lambda t: t.provider_job_id == claimed.provider_job_id,
        )

    async def _timeout(self, task: Task, message: str) -> None:
        job = task.provider_job_id
        await self._cancel_quietly(self.svc.providers.get(task.provider), job, task.model)
        await self.retry_or_fail(
            task.id,
            "timeout",
            message,
            True,
            expected_job=job,
            provider_fault=True,
            outcome="timeout",
        )

    async def cancel_job(self, task: Task) -> None:
        if task.provider_job_id:
            await self._cancel_quietly(
                self.svc.providers.get(task.provider), task.provider_job_id, task.model
            )

    async def _cancel_quietly(
        self, provider: Provider | None, job_id: str | None, model: str
    ) -> None:
        if provider is None or job_id is None:
            return
        try:
            await provider.cancel(job_id, model)
        except ProviderError as exc:
            log.info("provider_cancel_failed", job_id=job_id, error=exc.message)

    # --- watermarking: copy outputs, watermark, store -------------------------------------------

    async def watermark(self, task_id: str) -> None:
        """watermarking → completed: download outputs, watermark, store under deterministic keys."""
        svc = self.svc
        task = await svc.store.get_task(task_id)
        now = svc.now()
        if task is None or task.state is not State.WATERMARKING:
            return
        claimed = await lifecycle.take_lease(
            svc.store, task, self.owner, now, svc.deadlines.lease_s
        )
        if claimed is None:
            return
        structlog.contextvars.bind_contextvars(task_id=task_id)
        try:
            outputs = await self._render_outputs(claimed)
        except FetchError as exc:
            if exc.retryable and claimed.step_retries < MAX_STEP_RETRIES:
                await self._hand_back(claimed, exc.message)
            else:
                await self.fail(task_id, "output_unavailable", exc.message)
            return
        except HooklineError as exc:
            await self.fail(task_id, exc.code, exc.message)
            return
        result = await lifecycle.advance(
            svc.store,
            task_id,
            Event.FINISHED,
            svc.now(),
            svc.deadlines,
            changes=lambda t: {"outputs": tuple(outputs)},
            guard=lambda t: t.lease_owner == self.owner,
        )
        if not isinstance(result, lifecycle.Refused):
            log.info("task_completed", outputs=len(outputs))

    async def _hand_back(self, task: Task, reason: str) -> None:
        """Give up the lease after a transient failure; the step runs again after a backoff (the
        result is already paid for, so a flaky file host must not throw it away)."""
        now = self.svc.now()
        delay = backoff_s(
            task.step_retries + 1, self.svc.deadlines.retry_backoff_s, self.rng.random()
        )
        current = await self.svc.store.get_task(task.id)
        if current is None or current.lease_owner != self.owner or current.state is not task.state:
            return
        handed = await lifecycle.update(
            self.svc.store,
            current,
            now,
            lease_owner=None,
            lease_expires=None,
            deadline=now + delay,
            step_retries=current.step_retries + 1,
        )
        if handed is not None:
            log.warning("step_handed_back", reason=reason, retry_in_s=round(delay, 2))
            self.spawn_at(now + delay, task.id)

    async def _render_outputs(self, task: Task) -> list[Output]:
        urls = list(task.provider_outputs)
        provider = self.svc.providers.get(task.provider)
        outputs: list[Output] = []
        for index, url in enumerate(urls):
            data = await self._download(task, provider, url, index)
            rendered = await asyncio.to_thread(apply_watermark, data, self.watermark_cfg)
            key = output_key(task.id, index, rendered.content_type.split("/")[-1])
            await self.svc.blobs.put(key, rendered.data, rendered.content_type)
            outputs.append(Output(key, rendered.width, rendered.height, rendered.content_type))
        return outputs

    async def _download(self, task: Task, provider: Provider | None, url: str, index: int) -> bytes:
        """Fetch one output with retries; an expired URL is refreshed once by polling the job."""
        fetcher = self.output_fetchers.get(task.provider) or self.input_fetcher
        headers = provider.fetch_headers(url) if provider else {}
        refreshed = False
        for attempt in range(1, FETCH_TRIES + 1):
            try:
                return (await fetcher.fetch(url, headers=headers)).data
            except FetchError as exc:
                if not exc.retryable and not refreshed and provider and task.provider_job_id:
                    refreshed = True
                    fresh = await self._fresh_url(provider, task, index)
                    if fresh and fresh != url:
                        url = fresh
                        continue
                if not exc.retryable or attempt == FETCH_TRIES:
                    raise
                await asyncio.sleep(backoff_s(attempt, 0.5, self.rng.random()))
        raise AssertionError("unreachable")

    async def _fresh_url(self, provider: Provider, task: Task, index: int) -> str | None:
        assert task.provider_job_id is not None
        try:
            outcome = await provider.poll(task.provider_job_id, task.model)
        except ProviderError:
            return None
        if outcome.status == "succeeded" and index < len(outcome.outputs):
            return outcome.outputs[index]
        return None
