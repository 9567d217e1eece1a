"""The processing step (pending/processing → ai_processing): prepare the inputs, render the prompt,
submit the job with a callback URL, record the provider's job id.

The job id is recorded by the same compare-and-set that moves the task to ``ai_processing``,
guarded by the lease and the attempt, so a step that lost its lease while submitting cancels its
orphaned job instead of recording it. An outcome that raced ahead of that write (a fast provider
calling back from inside ``submit``) was deferred onto the task and is applied right after it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any, Final

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, ProviderRateLimited
from callbacks.provider import Outcome, Provider, Submission
from service.blobs.base import BlobStore
from service.media.fetch import FetchError, SafeFetcher
from service.media.images import prepare_input, sniff_content_type
from service.steps.outcomes import OutcomeApplier
from service.steps.runner import Lease
from service.styles import Catalogue
from service.timings import Timings
from statemachine import lifecycle
from statemachine.attempts import attempt_of, open_attempt
from statemachine.decide import backoff_s
from statemachine.errors import HooklineError, StoreError, Unavailable
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Task

log = structlog.get_logger()

SUBMIT_TRIES: Final = 3
DATA_URI_MAX_BYTES: Final = 256_000
QUEUE_RECHECK_S: Final = 1.0  # a pending task over its provider's limit is offered again after this


class ProcessingStep:
    """Submits a task's job to its provider."""

    def __init__(
        self,
        store: TaskStore,
        blobs: BlobStore,
        providers: Mapping[str, Provider],
        catalogue: Catalogue,
        timings: Timings,
        outcomes: OutcomeApplier,
        input_fetcher: SafeFetcher,
        *,
        public_url: str,
        provider_concurrency: int,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.providers = providers
        self.catalogue = catalogue
        self.timings = timings
        self.outcomes = outcomes
        self.input_fetcher = input_fetcher
        self.public_url = public_url.rstrip("/")
        self.provider_concurrency = provider_concurrency
        self.rng = rng or random.Random()

    async def ready(self, task: Task, now: float) -> bool:
        """Not while a retry's backoff runs; a pending task waits while its provider is full."""
        if task.state not in (State.PENDING, State.PROCESSING):
            return False
        backing_off = task.deadline is not None and task.deadline > now
        if task.state is State.PROCESSING and not task.lease_held(now) and backing_off:
            return False  # the dispatcher's timer or the reaper comes back at the deadline
        return not (task.state is State.PENDING and await self._provider_full(task, now))

    async def _provider_full(self, task: Task, now: float) -> bool:
        """True if the task's provider has its limit of jobs in flight; the task then stays
        pending with a near deadline, so the reaper offers it again (oldest deadline first).

        Counted in the store, so the cap holds across processes, give or take tasks started in
        the same instant by two processes."""
        limit = self.provider_concurrency
        if limit <= 0 or await self.store.count_active(task.provider) < limit:
            return False
        await lifecycle.update(self.store, task, now, deadline=now + QUEUE_RECHECK_S)
        return True

    async def run(self, lease: Lease) -> None:
        claimed = lease.task
        if claimed.early_outcome and claimed.early_outcome.get("status") == "succeeded":
            await self._adopt_early(lease)
            return
        provider = self.providers.get(claimed.provider)
        if provider is None:
            message = f"provider {claimed.provider} is not configured"
            await lease.failed("unknown_provider", message, retryable=False)
            return
        try:
            submission = await self._submission(claimed, provider)
            job_id = await self._submit(provider, submission)
        except FetchError as exc:
            code = "input_unavailable" if exc.retryable else exc.code
            await lease.failed(code, exc.message, retryable=exc.retryable)
        except PermanentProviderError as exc:
            await lease.failed(exc.code, exc.message, retryable=False)
        except ProviderError as exc:
            await lease.failed(exc.code, exc.message, retryable=True)
        except (Unavailable, StoreError) as exc:
            await lease.transient(exc)
        except HooklineError as exc:
            await lease.failed(exc.code, exc.message, retryable=False)
        else:
            await self._submitted(lease, provider, job_id)

    async def _submission(self, task: Task, provider: Provider) -> Submission:
        style = self.catalogue.get(task.style)
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
        return (
            f"{self.public_url}/v1/callbacks/{task.provider}/{task.id}?token={task.callback_token}"
        )

    async def _input_ref(
        self, task: Task, index: int, item: dict[str, str], provider: Provider
    ) -> str:
        """A reference to the input the provider can use: a data URI or a signed URL."""
        if "upload" in item:
            data = await self.blobs.get(item["upload"])
        else:
            fetched = await self.input_fetcher.fetch(item["url"])
            data = fetched.data
        limits = provider.limits
        prepared = await asyncio.to_thread(
            prepare_input, data, max_side=limits.max_side, formats=limits.formats, data_uri=False
        )
        if limits.accepts_data_uri and len(prepared) <= DATA_URI_MAX_BYTES:
            return await asyncio.to_thread(
                prepare_input,
                prepared,
                max_side=limits.max_side,
                formats=limits.formats,
                data_uri=True,
            )
        key = f"inputs/{task.id}/{index}"
        await self.blobs.put(key, prepared, sniff_content_type(prepared) or "image/jpeg")
        return await self.blobs.url(key, int(self.timings.for_task(task).ai_hard_cap_s))

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

    async def _submitted(self, lease: Lease, provider: Provider, job_id: str) -> None:
        """Record the job id; apply an outcome that raced ahead of the record."""
        task = lease.task
        early = await self._record_job(lease, job_id, f"{task.provider} job {job_id}", new_job=True)
        if early is None:
            log.info("submit_orphaned", job_id=job_id)
            await self.outcomes.cancel_quietly(task.provider, job_id, task.model)
        elif early:
            await self.outcomes.apply(task.id, Outcome.from_record(early))

    async def _adopt_early(self, lease: Lease) -> None:
        """A success arrived while the task was in processing: adopt it instead of submitting."""
        task = lease.task
        early = Outcome.from_record(task.early_outcome or {})
        detail = f"adopted {task.provider} job {early.job_id} that had already succeeded"
        if await self._record_job(lease, early.job_id, detail, new_job=False) is not None:
            await self.outcomes.apply(task.id, Outcome("succeeded", early.job_id, early.outputs))

    async def _record_job(
        self, lease: Lease, job_id: str, detail: str, *, new_job: bool
    ) -> dict[str, Any] | None:
        """processing → ai_processing with ``job_id`` as the task's job, guarded by this lease and
        this attempt. A ``new_job`` opens the current attempt (job ids are unique per provider
        only, so an earlier attempt elsewhere may carry the same id); an adopted earlier job keeps
        the attempt it already has. Returns the outcome that was deferred
        on the task meanwhile (``{}``: none), or None if the write was refused (the lease is lost:
        the job is an orphan)."""
        task = lease.task
        now = self.outcomes.now()
        early: dict[str, Any] = {}

        def changes(t: Task) -> dict[str, Any]:
            early.clear()
            early.update(t.early_outcome or {})
            opened = not new_job and attempt_of(t, job_id) is not None
            return {
                "provider_job_id": job_id,
                "attempt_log": t.attempt_log if opened else open_attempt(t, job_id, now),
                "early_outcome": None,
                "step_retries": 0,  # the hand-back and lost-lease budgets are per step
                "lost_leases": 0,
            }

        result = await lifecycle.advance(
            self.store,
            task.id,
            Event.SUBMITTED,
            now,
            self.timings.for_task(task),
            detail=detail,
            changes=changes,
            guard=lambda t: lease.holds(t) and t.attempts == task.attempts,
        )
        return None if isinstance(result, lifecycle.Refused) else early
