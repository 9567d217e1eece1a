"""The inbound webhook receiver: authenticate, check the job, de-duplicate, record the outcome,
answer at once.

The answer never waits for heavy work: applying an outcome is one or two store writes; downloads
and watermarking happen later, in the step the resulting feed event starts.

One delivery goes through these checks, in order; a refusal changes nothing, stores nothing and
polls nothing:

1. the provider is configured and the task exists (404 ``unknown_provider``/``unknown_task``),
   the callback token is the task's (constant time; 401 ``bad_token``), the task ran on this
   provider (401 ``wrong_provider``);
2. the adapter authenticates and parses the body (``Provider.verify``: signature, timestamp,
   fal's account, a job id within the grammar);
3. **job identity**: the delivery's job must be the task's own — its current job on this provider
   (``provider_job_id``) or a job of its attempt log on this provider (``attempt_log[*].job_id``)
   — before anything is applied, stored (deliveries table, ``early_outcome``) or polled. Any other
   job is 404 ``unknown_job`` (the provider may retry; nothing was remembered), except in the
   submit window below.
4. de-duplication: a delivery with an outcome by its delivery id; a trigger (an outcome-less
   delivery, BFL) by its job id (below).

**The fast provider.** A provider may call back from inside ``submit()``, before the processing
step has recorded the job id; the delivery then names a job the task does not know yet. It is
accepted only in the *submit window* — the task in ``processing`` on this provider, its step's
lease live, no job recorded for the attempt — and even then nothing about it is stored or polled:
the delivery is held in this process's memory (at most ``MAX_HELD_JOBS_PER_TASK`` jobs per task
and ``MAX_HELD_JOBS`` in all) and a background waiter re-reads the task until the job is recorded,
then handles the delivery exactly as if it had arrived a moment later; if the window closes first
(another job recorded, the step failed or lost its lease, ``hold_max_s`` passed) the delivery is
dropped. Why neither of the simpler rules:

- the per-task callback token alone does not bind a job to a task: it is the same for every
  attempt, a trigger's body is not signed, and a signed body proves only that the provider sent
  it, not for which task. Whoever holds a callback URL could name any job of the operator's
  account (another user's) and have its result adopted.
- a confirming poll proves that the job exists in the operator's account, not that it is this
  task's; and polling a job the body names is the hole being closed.

Only the recorded job id binds a job to a task, so the receiver waits for it; it is read from the
store, so the waiter works whichever process ran the submit. The price: if the worker dies between
the provider's answer and the record, the held delivery dies with this process's memory and the
task's next run submits again (a generation paid twice in that rare crash), as the design's rule
"the provider job id is recorded before anything else depends on it" asks.

**Triggers** (``Delivery.outcome`` None) make the receiver poll. They are de-duplicated by job id,
not by delivery id (a BFL trigger's body is unsigned, so its delivery id is whatever it says):
once a poll gave the job's final outcome, the marker ``trigger:<job id>`` in the deliveries table
answers every later trigger for that job ``duplicate``; and in this process one poller per job
coalesces the triggers that arrive while it polls, or within ``trigger_cooldown_s`` after a poll
that was not final, into at most one more poll per cooldown. A thousand triggers for a finished
job cost one poll. Every poll first waits for the provider's poll quota (``pace``).

**Project-level webhooks** (``handle_project``; OpenAI's, configured once per project): the URL
names no task and carries no token, so the signature is the whole authentication and comes
first; the delivery's job is then mapped to its task through the stored job id
(``TaskStore.task_by_job``: the task's current job). A job no task holds is 404 ``unknown_job``
(the provider retries; a job recorded a moment later is found then, and the reaper's poll is the
backstop). Events the adapter does not act on (``WebhookRejected`` code ``ignored_event``) are
acknowledged with 200 so the provider stops sending them.

**The timeline** (statemachine/timeline.py): every delivery for a task that exists, whose token
matched (a project-level one: whose job mapped to a task), leaves a note — its delivery id, whether
it verified, why it was refused, what it said and what became of it, its headers with secrets
redacted — and so does every poll a trigger makes. A delivery with a wrong token leaves none: it
proves nothing about who sent it, and whoever knows a task id could otherwise fill its timeline.
Notes are written in the background (``spawn``), after the answer is decided: no store round trip
is added in front of the 2xx, and a failing note is logged, never answered.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, WebhookRejected
from callbacks.http import error_status
from callbacks.provider import Delivery, Outcome, Provider
from statemachine.errors import HooklineError, NotFound, Unavailable
from statemachine.states import State
from statemachine.store import TaskStore
from statemachine.task import Task
from statemachine.timeline import Timeline, elapsed_ms, note_quietly, poll_note, redact_headers

log = structlog.get_logger()

MAX_HELD_JOBS_PER_TASK: Final = 4  # a submit makes one job; more is a retry storm or an attack
MAX_HELD_JOBS: Final = 1024
MAX_HELD_DELIVERIES_PER_JOB: Final = 4
HOLD_MAX_S: Final = 30.0
HOLD_FIRST_RECHECK_S: Final = 0.01
HOLD_MAX_RECHECK_S: Final = 0.5
TRIGGER_COOLDOWN_S: Final = 2.0
POLL_TRIES: Final = 3
TRIGGER_MARKER: Final = "trigger:"


class OutcomeSink(Protocol):
    async def apply(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome monotonically; return a word for what happened. ``task`` is
        the record as just read, if the caller has it."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the receiver answers: an HTTP status and a small JSON body."""

    status: int
    body: dict[str, Any]


def is_tasks_job(task: Task, provider: str, job_id: str) -> bool:
    """Whether ``job_id`` on ``provider`` is the task's current job or one of its attempts'."""
    if task.provider == provider and task.provider_job_id == job_id:
        return True
    return any(a.provider == provider and a.job_id == job_id for a in task.attempt_log)


def in_submit_window(task: Task, provider: str, now: float) -> bool:
    """Whether the task's processing step may be inside ``submit()`` on ``provider`` right now:
    in processing, under a live lease, with no job recorded for the current attempt."""
    return (
        task.state is State.PROCESSING
        and task.provider == provider
        and task.lease_held(now)
        and task.provider_job_id is None
        and not any(a.number == task.attempts and a.job_id for a in task.attempt_log)
    )


def job_model(task: Task, provider: str, job_id: str) -> str:
    """The model a job of the task ran on (an earlier attempt's may differ from the task's)."""
    if task.provider == provider and task.provider_job_id == job_id:
        return task.model
    attempt = next(
        (a for a in task.attempt_log if a.provider == provider and a.job_id == job_id), None
    )
    return attempt.model if attempt is not None else task.model


def trigger_key(job_id: str) -> str:
    """The deliveries-table id that marks a triggered job as polled to its final outcome."""
    return TRIGGER_MARKER + job_id


@dataclass(slots=True)
class _Seen:
    """What the checks learnt of one delivery before its answer, for its timeline note: when it
    arrived, the task (once the token matched), the verified delivery (once the adapter accepted
    it)."""

    at: float
    task: Task | None = None
    delivery: Delivery | None = None


@dataclass(slots=True)
class _Held:
    """Deliveries for a job not yet recorded on their task (the fast-provider race)."""

    task_id: str
    deliveries: list[Delivery] = field(default_factory=list)


class WebhookReceiver:
    """Turns webhook deliveries into outcomes applied to their tasks (module docstring).

    ``hold_max_s`` bounds how long a delivery may wait for its job id to be recorded;
    ``trigger_cooldown_s`` is the least time between two polls of one job for its triggers."""

    def __init__(
        self,
        store: TaskStore,
        providers: Mapping[str, Provider],
        sink: OutcomeSink,
        *,
        now: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_rejected: Callable[[str, str], None] | None = None,
        hold_max_s: float = HOLD_MAX_S,
        trigger_cooldown_s: float = TRIGGER_COOLDOWN_S,
        pace: Callable[[str], Awaitable[None]] | None = None,
        project_level: frozenset[str] = frozenset(),
        timeline: Timeline | None = None,
    ) -> None:
        self.store = store
        self.providers = providers
        self.sink = sink
        self.now = now
        self.spawn = spawn
        self.on_rejected = on_rejected
        self.hold_max_s = hold_max_s
        self.trigger_cooldown_s = trigger_cooldown_s
        self.pace = pace  # waits for a poll token of the named provider
        self.project_level = project_level  # providers with project-level webhooks
        self.timeline = timeline  # where deliveries and polls are noted (None: nowhere)
        self._held: dict[tuple[str, str], _Held] = {}
        self._held_per_task: Counter[str] = Counter()
        # (provider, job) -> another trigger came while its poller was busy or cooling down
        self._pollers: dict[tuple[str, str], bool] = {}

    async def handle(
        self, provider_name: str, task_id: str, token: str, headers: Mapping[str, str], body: bytes
    ) -> Receipt:
        """Handle one delivery. Raises ``WebhookRejected``/``NotFound`` for bad deliveries (both
        logged and counted), ``Unavailable`` when too many deliveries wait for their job."""
        seen = _Seen(self.now())
        try:
            receipt = await self._handle(provider_name, task_id, token, headers, body, seen)
        except HooklineError as exc:
            if isinstance(exc, WebhookRejected | NotFound):
                self._rejected(provider_name, exc)
            self._note_delivery(provider_name, seen, headers, refused=exc)
            raise
        self._note_delivery(provider_name, seen, headers, receipt=receipt)
        return receipt

    async def handle_project(
        self, provider_name: str, headers: Mapping[str, str], body: bytes
    ) -> Receipt:
        """Handle one project-level delivery (module docstring); raises as ``handle``."""
        seen = _Seen(self.now())
        try:
            receipt = await self._handle_project(provider_name, headers, body, seen)
        except HooklineError as exc:
            if exc.code == "ignored_event":
                return Receipt(200, {"status": "ignored"})
            if isinstance(exc, WebhookRejected | NotFound):
                self._rejected(provider_name, exc)
            self._note_delivery(provider_name, seen, headers, refused=exc)
            raise
        self._note_delivery(provider_name, seen, headers, receipt=receipt)
        return receipt

    def _rejected(self, provider_name: str, exc: WebhookRejected | NotFound) -> None:
        """Log and count a refused delivery."""
        log.warning("webhook_rejected", provider=provider_name, reason=exc.code, error=exc.message)
        if self.on_rejected:
            self.on_rejected(provider_name, exc.code)

    def _note_delivery(
        self,
        provider_name: str,
        seen: _Seen,
        headers: Mapping[str, str],
        *,
        receipt: Receipt | None = None,
        refused: HooklineError | None = None,
    ) -> None:
        """Note a delivery on its task's timeline, in the background (module docstring)."""
        if self.timeline is None or seen.task is None:
            return
        delivery = seen.delivery
        said = None
        if delivery is not None:
            said = delivery.outcome.status if delivery.outcome is not None else "trigger"
        data = {
            "provider": provider_name,
            "delivery_id": delivery.delivery_id if delivery is not None else None,
            "job_id": delivery.job_id if delivery is not None else None,
            "verified": delivery is not None,
            "status": said,
            "result": receipt.body.get("status") if receipt is not None else None,
            "reason": refused.code if refused is not None else None,
            "message": refused.message if refused is not None else None,
            "headers": redact_headers(headers),
        }
        self.spawn(note_quietly(self.timeline, seen.task.id, "webhook", seen.at, data))

    async def _handle_project(
        self, provider_name: str, headers: Mapping[str, str], body: bytes, seen: _Seen
    ) -> Receipt:
        provider = self.providers.get(provider_name)
        if provider is None or provider_name not in self.project_level:
            raise NotFound(f"unknown provider {provider_name!r}", code="unknown_provider")
        delivery = await provider.verify(headers, body, self.now())
        if delivery.outcome is not None and delivery.outcome.job_id != delivery.job_id:
            raise WebhookRejected("the outcome names another job", code="malformed_body")
        task = await self.store.task_by_job(provider_name, delivery.job_id)
        if task is None:
            raise NotFound(f"job {delivery.job_id!r} is no task's", code="unknown_job")
        seen.task, seen.delivery = task, delivery
        return await self._accept(provider_name, provider, task, delivery)

    async def _handle(
        self,
        provider_name: str,
        task_id: str,
        token: str,
        headers: Mapping[str, str],
        body: bytes,
        seen: _Seen,
    ) -> Receipt:
        provider = self.providers.get(provider_name)
        if provider is None:
            raise NotFound(f"unknown provider {provider_name!r}", code="unknown_provider")
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task {task_id!r}", code="unknown_task")
        if not hmac.compare_digest(token.encode(), task.callback_token.encode()):
            raise WebhookRejected("callback token does not match the task", code="bad_token")
        seen.task = task
        used = {task.provider, *(a.provider for a in task.attempt_log)}
        if provider_name not in used:
            raise WebhookRejected(
                f"task {task_id} never ran on {provider_name}", code="wrong_provider"
            )
        delivery = await provider.verify(headers, body, self.now())
        seen.delivery = delivery
        if delivery.outcome is not None and delivery.outcome.job_id != delivery.job_id:
            raise WebhookRejected("the outcome names another job", code="malformed_body")
        if not is_tasks_job(task, provider_name, delivery.job_id):
            # verify may have taken a while (a secret or key fetch): judge on the record as it
            # is now, in case the submit was recorded meanwhile
            task = await self.store.get_task(task_id) or task
        if is_tasks_job(task, provider_name, delivery.job_id):
            return await self._accept(provider_name, provider, task, delivery)
        return self._hold(provider_name, task, delivery)

    async def _accept(
        self, provider_name: str, provider: Provider, task: Task, delivery: Delivery
    ) -> Receipt:
        """A delivery for one of the task's jobs: apply its outcome, or poll for it."""
        if delivery.outcome is None:
            return await self._trigger(provider_name, provider, task, delivery.job_id)
        if await self.store.seen_delivery(provider_name, delivery.delivery_id):
            return Receipt(200, {"status": "duplicate"})
        result = await self.sink.apply(task.id, delivery.outcome, task)
        await self.store.record_delivery(provider_name, delivery.delivery_id, task.id, self.now())
        log.info(
            "webhook_applied", provider=provider_name, status=delivery.outcome.status, result=result
        )
        return Receipt(200, {"status": result})

    # -- the fast provider: a job not recorded yet -------------------------------------------

    def _hold(self, provider_name: str, task: Task, delivery: Delivery) -> Receipt:
        """Keep a delivery for a job the task does not know, if the task is in its submit window
        (module docstring); refuse it otherwise."""
        job_id = delivery.job_id
        if not in_submit_window(task, provider_name, self.now()):
            raise NotFound(f"job {job_id!r} is not one of task {task.id}'s", code="unknown_job")
        key = (provider_name, job_id)
        held = self._held.get(key)
        if held is None:
            if (
                self._held_per_task[task.id] >= MAX_HELD_JOBS_PER_TASK
                or len(self._held) >= MAX_HELD_JOBS
            ):
                raise Unavailable(
                    "too many deliveries wait for their job to be recorded; try again later",
                    code="webhook_backlog",
                )
            held = self._held[key] = _Held(task.id)
            self._held_per_task[task.id] += 1
            self.spawn(self._release_when_recorded(provider_name, task.id, job_id))
        elif held.task_id != task.id:
            raise NotFound(f"job {job_id!r} is not one of task {task.id}'s", code="unknown_job")
        ids = {d.delivery_id for d in held.deliveries}
        if delivery.delivery_id not in ids and len(ids) < MAX_HELD_DELIVERIES_PER_JOB:
            held.deliveries.append(delivery)
        log.info("webhook_held", provider=provider_name, job_id=job_id)
        return Receipt(200 if delivery.outcome is not None else 202, {"status": "deferred"})

    async def _release_when_recorded(self, provider_name: str, task_id: str, job_id: str) -> None:
        """Re-read the task until ``job_id`` is recorded on it (then handle the held deliveries)
        or its submit window closes (then drop them)."""
        key = (provider_name, job_id)
        started = self.now()
        wait_s = HOLD_FIRST_RECHECK_S
        try:
            while True:
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, HOLD_MAX_RECHECK_S)
                task = await self.store.get_task(task_id)
                provider = self.providers.get(provider_name)
                if task is None or provider is None:
                    return
                if is_tasks_job(task, provider_name, job_id):
                    held = self._held.pop(key, None)
                    for delivery in held.deliveries if held else ():
                        await self._accept(provider_name, provider, task, delivery)
                    return
                now = self.now()
                if (
                    not in_submit_window(task, provider_name, now)
                    or now - started > self.hold_max_s
                ):
                    log.warning("webhook_dropped", provider=provider_name, job_id=job_id)
                    return
        finally:
            self._held.pop(key, None)
            self._held_per_task[task_id] -= 1
            if self._held_per_task[task_id] <= 0:
                del self._held_per_task[task_id]

    # -- triggers: poll once per job ---------------------------------------------------------

    async def _trigger(
        self, provider_name: str, provider: Provider, task: Task, job_id: str
    ) -> Receipt:
        """A trigger for one of the task's jobs: poll it, at most once per cooldown per job, never
        again once a poll gave its final outcome."""
        if await self.store.seen_delivery(provider_name, trigger_key(job_id)):
            return Receipt(200, {"status": "duplicate"})
        key = (provider_name, job_id)
        if key in self._pollers:
            self._pollers[key] = True  # the poller polls once more after its cooldown
            return Receipt(202, {"status": "polling"})
        self._pollers[key] = False
        model = job_model(task, provider_name, job_id)
        self.spawn(self._poll_trigger(provider_name, provider, task.id, job_id, model))
        return Receipt(202, {"status": "polling"})

    async def _poll_trigger(
        self, provider_name: str, provider: Provider, task_id: str, job_id: str, model: str
    ) -> None:
        key = (provider_name, job_id)
        try:
            while not await self.store.seen_delivery(provider_name, trigger_key(job_id)):
                self._pollers[key] = False
                outcome = await self._poll(provider, task_id, job_id, model)
                if outcome is not None and outcome.final:
                    await self.sink.apply(task_id, outcome)
                    marker = trigger_key(job_id)
                    await self.store.record_delivery(provider_name, marker, task_id, self.now())
                    return
                await asyncio.sleep(self.trigger_cooldown_s)
                if not self._pollers.get(key):
                    return  # no trigger came meanwhile
        finally:
            self._pollers.pop(key, None)

    async def _poll(
        self, provider: Provider, task_id: str, job_id: str, model: str
    ) -> Outcome | None:
        """The provider's answer about the job (None: it could not be had; the reaper is the
        backstop). Transient failures are tried again a few times."""
        for attempt in range(POLL_TRIES):
            if self.pace is not None:
                await self.pace(provider.name)
            started = time.perf_counter()
            try:
                outcome = await provider.poll(job_id, model)
            except PermanentProviderError as exc:
                self._note_poll(task_id, provider.name, job_id, started, error=exc)
                log.warning("webhook_poll_refused", task_id=task_id, error=exc.message)
                return None
            except ProviderError as exc:
                self._note_poll(task_id, provider.name, job_id, started, error=exc)
                log.warning("webhook_poll_failed", task_id=task_id, error=exc.message)
                if attempt + 1 < POLL_TRIES:
                    await asyncio.sleep(0.5 * 2**attempt)
                continue
            self._note_poll(task_id, provider.name, job_id, started, answer=outcome)
            if outcome.job_id != job_id:
                log.warning("webhook_poll_other_job", task_id=task_id, job_id=job_id)
                return None
            return outcome
        return None

    def _note_poll(
        self,
        task_id: str,
        provider_name: str,
        job_id: str,
        started: float,
        *,
        answer: Outcome | None = None,
        error: ProviderError | None = None,
    ) -> None:
        """Note a trigger's poll and its answer on the task's timeline, in the background."""
        if self.timeline is None:
            return
        status = error_status(error) if error is not None else None
        data = poll_note(
            provider_name, job_id, "trigger", elapsed_ms(started), answer, error, status
        )
        self.spawn(note_quietly(self.timeline, task_id, "poll", self.now(), data))
