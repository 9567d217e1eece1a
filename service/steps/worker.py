"""The leased steps that do I/O — submit (processing), copy and watermark outputs (watermarking) —
and the runner that starts them in the background. Every step begins with a lease claimed by
compare-and-set, renews it while it works, and is safe to run again (at-least-once, idempotent
effects). What outcomes do to a task lives in service/outcomes.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, ProviderRateLimited
from callbacks.provider import Outcome, Provider, Submission
from service.blobs.base import output_key
from service.media.fetch import FetchError, SafeFetcher
from service.media.images import prepare_input, sniff_content_type
from service.media.watermark import WatermarkConfig, apply_watermark
from service.runtime import Services
from service.steps.outcomes import Outcomes
from statemachine import lifecycle
from statemachine.attempts import attempt_of, open_attempt
from statemachine.decide import backoff_s, release, renew
from statemachine.errors import HooklineError, StoreError, Unavailable
from statemachine.states import Event, State
from statemachine.task import Output, Task

log = structlog.get_logger()

SUBMIT_TRIES = 3
FETCH_TRIES = 3
DATA_URI_MAX_BYTES = 256_000
QUEUE_RECHECK_S = 1.0  # a pending task over its provider's limit is offered again after this
MAX_STEP_RETRIES = 5  # hand-backs of a step after transient failures before the task fails
HAND_BACK_TRIES = 5
CLOSE_GRACE_S = 10.0  # at shutdown, running steps get this long to finish before cancellation


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
        self.outcomes = Outcomes(svc, self, self.rng)
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._stepping: set[str] = set()  # tasks with a step running in this process
        self._closing = False

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
        if self._closing:
            return  # shutting down: the reaper finds the task by its stored deadline
        delay = max(0.0, when - self.svc.now())
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self.kick(task_id)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def kick(self, task_id: str) -> None:
        """Run the step the task's state needs, now, in the background."""
        self.spawn(self._step_for(task_id))

    async def _step_for(self, task_id: str) -> None:
        task = await self.svc.store.get_task(task_id)
        if task is not None:
            await self._run_step(task)

    async def _run_step(self, task: Task) -> None:
        if task.state is State.WATERMARKING:
            await self.watermark(task.id)
        elif task.state in (State.PENDING, State.PROCESSING):
            await self.process(task.id)

    async def dispatch(self, task: Task) -> None:
        """The reaper's way in: start the task's step in the background (unless this process is
        already running one for it) and return at once, so a slow step never holds up a pass."""
        if task.id not in self._stepping:
            self.spawn(self._run_step(task))

    async def drain(self) -> None:
        """Wait until no step is running (tests; shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop: pending timers are dropped (the reaper finds those tasks), running steps get
        ``grace_s`` to finish — a submit cut short would be paid for twice — then are cancelled."""
        self._closing = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._running:  # work spawned during the grace period is waited for as well
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(list(self._running), timeout=left)
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self._running)

    async def _run_claimed(self, task: Task, body: Callable[[Task], Awaitable[None]]) -> None:
        """Claim ``task``'s lease (nothing happens if someone holds it) and run ``body`` on the
        claimed record while holding it."""
        svc = self.svc
        claimed = await lifecycle.take_lease(
            svc.store, task, self.owner, svc.now(), svc.deadlines.lease_s
        )
        if claimed is None:
            return
        structlog.contextvars.bind_contextvars(task_id=task.id)
        async with self._leased(claimed):
            await body(claimed)

    @contextlib.asynccontextmanager
    async def _leased(self, task: Task) -> AsyncIterator[None]:
        """While a step works: mark it running here and renew its lease (a heartbeat every third
        of the lease), so a slow but healthy step is not taken over by another worker."""
        self._stepping.add(task.id)
        beat = asyncio.create_task(self._heartbeat(task.id), name=f"lease-{task.id}")
        try:
            yield
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            self._stepping.discard(task.id)

    async def _heartbeat(self, task_id: str) -> None:
        lease_s = self.svc.deadlines.lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                held = await self.svc.store.get_task(task_id)
                if held is None:
                    return
                renewed = renew(held, self.owner, self.svc.now(), lease_s)
                if renewed is None:
                    return  # the lease is gone; the step's own guarded writes will be refused
                await self.svc.store.transition(renewed, held.state, held.version, emit=False)
            except Exception as exc:  # a store blip: keep beating, the lease has time left
                log.warning("lease_renewal_failed", task_id=task_id, error=repr(exc))

    # --- outcomes (service/outcomes.py), for the receiver, the reaper and the API ----------------

    async def apply_outcome(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome; see ``Outcomes.apply``."""
        return await self.outcomes.apply(task_id, outcome, task)

    async def reconcile(self, task: Task, now: float) -> None:
        """The reaper's ai_processing branch; see ``Outcomes.reconcile``."""
        await self.outcomes.reconcile(task, now)

    async def cancel_job(self, task: Task) -> None:
        await self.outcomes.cancel_job(task)

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
        await self._run_claimed(task, self._process_claimed)

    async def _process_claimed(self, claimed: Task) -> None:
        out, mine = self.outcomes, self.owner
        if claimed.early_outcome and claimed.early_outcome.get("status") == "succeeded":
            await self._adopt_early(claimed)
            return
        provider = self.svc.providers.get(claimed.provider)
        if provider is None:
            message = f"provider {claimed.provider} is not configured"
            await out.fail(claimed.id, "unknown_provider", message, owner=mine)
            return
        try:
            submission = await self._submission(claimed, provider)
            job_id = await self._submit(provider, submission)
        except FetchError as exc:
            code = "input_unavailable" if exc.retryable else exc.code
            await out.retry_or_fail(claimed.id, code, exc.message, exc.retryable, owner=mine)
        except PermanentProviderError as exc:
            await out.fail(claimed.id, exc.code, exc.message, owner=mine)
        except ProviderError as exc:
            await out.retry_or_fail(claimed.id, exc.code, exc.message, True, owner=mine)
        except (Unavailable, StoreError) as exc:
            await self._transient(claimed, exc)
        except HooklineError as exc:
            await out.fail(claimed.id, exc.code, exc.message, owner=mine)
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
        return await svc.blobs.url(key, int(svc.deadlines_for(task).ai_hard_cap_s))

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
                "step_retries": 0,  # the hand-back budget is per step
            }

        result = await lifecycle.advance(
            svc.store,
            task.id,
            Event.SUBMITTED,
            now,
            svc.deadlines_for(task),
            detail=f"{task.provider} job {job_id}",
            changes=changes,
            guard=lambda t: t.lease_owner == self.owner and t.attempts == task.attempts,
        )
        if isinstance(result, lifecycle.Refused):
            log.info("submit_orphaned", job_id=job_id, state=result.task.state.value)
            await self.outcomes.cancel_quietly(provider, job_id, task.model)
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
            self.svc.deadlines_for(task),
            detail=f"adopted {task.provider} job {job_id} that had already succeeded",
            changes=lambda t: {
                "provider_job_id": job_id,
                "attempt_log": open_attempt(t, job_id, now)
                if attempt_of(t, job_id) is None
                else t.attempt_log,
                "early_outcome": None,
                "step_retries": 0,
            },
            guard=lambda t: t.lease_owner == self.owner,
        )
        if isinstance(result, lifecycle.Refused):
            return
        outcome = Outcome("succeeded", job_id, tuple(early.get("outputs", ())))
        await self.apply_outcome(task.id, outcome)

    # --- watermarking: copy outputs, watermark, store -------------------------------------------

    async def watermark(self, task_id: str) -> None:
        """watermarking → completed: download outputs, watermark, store under deterministic keys."""
        task = await self.svc.store.get_task(task_id)
        if task is None or task.state is not State.WATERMARKING:
            return
        await self._run_claimed(task, self._watermark_claimed)

    async def _watermark_claimed(self, claimed: Task) -> None:
        svc = self.svc
        task_id = claimed.id
        try:
            outputs = await self._render_outputs(claimed)
        except FetchError as exc:
            if exc.retryable:
                await self._transient(claimed, exc, code="output_unavailable")
            else:
                await self.outcomes.fail(
                    task_id, "output_unavailable", exc.message, owner=self.owner
                )
            return
        except (Unavailable, StoreError) as exc:
            await self._transient(claimed, exc)
            return
        except HooklineError as exc:
            await self.outcomes.fail(task_id, exc.code, exc.message, owner=self.owner)
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

    async def _transient(self, task: Task, exc: HooklineError, code: str | None = None) -> None:
        """A failure that may pass (a blob store or file host blip): hand the step back with a
        backoff, a bounded number of times; then fail the task (with its refund)."""
        if task.step_retries < MAX_STEP_RETRIES:
            await self._hand_back(task, exc.message)
        else:
            await self.outcomes.fail(task.id, code or exc.code, exc.message, owner=self.owner)

    async def _hand_back(self, task: Task, reason: str) -> None:
        """Give up the lease after a transient failure; the step runs again after a backoff (the
        result is already paid for, so a flaky file host must not throw it away)."""
        now = self.svc.now()
        delay = backoff_s(
            task.step_retries + 1, self.svc.deadlines.retry_backoff_s, self.rng.random()
        )
        handed = None
        for _ in range(HAND_BACK_TRIES):  # the lease's heartbeat may bump the version meanwhile
            current = await self.svc.store.get_task(task.id)
            if current is None or current.lease_owner != self.owner:
                return
            if current.state is not task.state:
                return
            released = release(current, now, now + delay).with_changes(
                step_retries=current.step_retries + 1
            )
            if await self.svc.store.transition(
                released, current.state, current.version, emit=False
            ):
                handed = released
                break
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
