"""The processing step (pending/processing → ai_processing): prepare the inputs, render the prompt,
take a provider slot, submit the job with a callback URL, record the provider's job id.

Inputs are fetched and checked before a slot is taken (``holds_slot``): a slow input holds no
slot of its provider, and a user holds at most a fair share of them (``user_concurrency``).

Submits are paced by the provider's submit quota (service/steps/pacing.py): a token free within
``SUBMIT_TOKEN_WAIT_S`` is waited for; otherwise the task is handed back (uncounted) until there
will be one, so a backlog for a slow-quota provider waits in the store, not in memory.

**Synchronous providers** (``arrival`` "sync", Seedream): the provider's answer to the request is
the outcome, so the step makes the call itself, under its lease (heartbeats keep it while the
call runs, tens of seconds), at most ``sync_calls`` at once per provider in this process (and
within the provider's slots, like any job). This is the one place where a worker waits on the
AI: there is no job to come back to and nothing would call back. The call's answer is recorded
(processing → ai_processing with the adapter's job id) and applied at once (→ watermarking). A
crash mid-call loses the call: its lease expires and the step runs again (the provider may have
made, and billed, an image nobody receives; a crash between the record and the apply leaves the
task in ai_processing until its deadline, when the timeout retries it).

The job id is recorded by the same compare-and-set that moves the task to ``ai_processing``,
guarded by the lease and the attempt, so a step that lost its lease while submitting cancels its
orphaned job instead of recording it. An outcome that raced ahead of that write (a fast provider
calling back from inside ``submit``) was deferred onto the task and is applied right after it.

Every submit (each try, and each synchronous call) is noted on the task's timeline: the job id or
the error, the HTTP status of the provider's answer, the latency, the attempt. The adapters return
only a job id, so the status is read by ``callbacks.http.answered_statuses``, which hears the
answers ``request_answer`` (every adapter's one way to send) gets in the submit's own context.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Literal

import structlog

from callbacks.errors import PermanentProviderError, ProviderError, ProviderRateLimited
from callbacks.http import answered_statuses, error_status
from callbacks.provider import Limits, Outcome, Provider, Submission, SyncProvider
from service.blobs.base import BlobStore, derived_key
from service.media.budget import MemoryBudget, run_within
from service.media.fetch import FetchError, SafeFetcher
from service.media.images import (
    CONTENT_TYPES,
    conforms,
    expected_format,
    plan_decode,
    prepare_input,
    sniff_content_type,
)
from service.steps.outcomes import OutcomeApplier
from service.steps.pacing import Pacing, fair_share
from service.steps.runner import Lease
from service.styles import Catalogue
from service.timings import Timings
from statemachine import lifecycle
from statemachine.attempts import attempt_of, open_attempt
from statemachine.decide import backoff_s
from statemachine.errors import HooklineError, NotFound, StoreError, Unavailable
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Task
from statemachine.timeline import elapsed_ms, submit_note

log = structlog.get_logger()

SUBMIT_TRIES: Final = 3
DATA_URI_MAX_BYTES: Final = 256_000
# How a stored input reaches a provider that takes data URIs (HOOKLINE_INPUTS_BY_URL): "auto", by
# its signed URL when that URL is public https (the provider can fetch it), else inline;
# "always", by URL (the provider reaches hookline's files by another route); "never", inline.
InputsByUrl = Literal["auto", "always", "never"]
UPLOAD_REFS_KEPT: Final = 4096  # uploads whose provider-ready key and size a process remembers
# uploads whose data URI a process keeps (each of at most DATA_URI_MAX_BYTES, 341 KB as base64:
# 11 MB at most): every task sending one of them inline shares the one string instead of
# reading, checking and encoding the upload again and holding a copy of its own (each submit
# still makes its own JSON body)
UPLOAD_URIS_KEPT: Final = 32
MIN_INPUT_URL_TTL_S: Final = 600  # a stored input's signed URL lasts the attempt, at least this
SUBMIT_TOKEN_WAIT_S: Final = 2.0  # a submit waits this long for a quota token, else hands back
QUEUE_RECHECK_S: Final = 1.0  # a task waiting for a slot of its provider is offered again after
USER_RECHECK_S: Final = 5.0  # ... for a slot its owner may take: behind other users' tasks


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
        pacing: Pacing,
        user_concurrency: int = 0,
        sync_calls: int = 8,
        budget: MemoryBudget | None = None,
        rng: random.Random | None = None,
        inputs_by_url: InputsByUrl = "auto",
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.providers = providers
        self.catalogue = catalogue
        self.timings = timings
        self.outcomes = outcomes
        self.input_fetcher = input_fetcher
        self.public_url = public_url.rstrip("/")
        self.pacing = pacing
        self.user_concurrency = user_concurrency  # 0: a quarter of the provider's slots
        self.sync_calls = sync_calls
        self.inputs_by_url = inputs_by_url
        # "always": every URL; otherwise decided by the first one (None: not seen yet)
        self._blob_urls_public: bool | None = True if inputs_by_url == "always" else None
        self._sync_slots: dict[str, asyncio.Semaphore] = {}
        self.budget = budget  # shared by every fetch and decode of the process
        # one slot check-and-take at a time per provider in this process: no overshoot here
        self._slot_locks: dict[str, asyncio.Lock] = {}
        self._preparing = KeyedLocks()  # one look at an upload for some limits at a time
        # (upload, limits) -> (the key the provider gets, its size): uploads never change, so
        # once an upload was looked at for some limits, a task sending it by URL reads nothing
        self._upload_refs: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self._upload_uris: OrderedDict[tuple[str, str], str] = OrderedDict()  # same key: URI
        self.rng = rng or random.Random()

    async def ready(self, task: Task, now: float) -> bool:
        """Not while a retry's backoff runs; a pending task waits while no slot is free for it."""
        if task.state not in (State.PENDING, State.PROCESSING):
            return False
        backing_off = task.deadline is not None and task.deadline > now
        if task.state is State.PROCESSING and not task.lease_held(now) and backing_off:
            return False  # the dispatcher's timer or the reaper comes back at the deadline
        if task.state is State.PENDING and (wait := await self._no_slot(task)) is not None:
            await lifecycle.update(self.store, task, now, deadline=now + wait)
            return False
        return True

    async def _no_slot(self, task: Task) -> float | None:
        """How long the task should wait before it is offered again, or None when a slot is
        free: its provider's (``provider_concurrency`` jobs in flight) and its owner's share of
        them (``user_concurrency``), so one user's backlog cannot hold every slot. A task over its
        owner's share waits longer than one waiting for the provider, behind other users' tasks.

        Counted in the store (jobs in ai_processing, and processing tasks that took a slot), so
        the caps hold across processes, give or take tasks that take a slot in the same instant in
        two processes."""
        slots = self.pacing.concurrency(task.provider)
        if slots <= 0:
            return None
        if await self.store.count_active(task.provider) >= slots:
            return QUEUE_RECHECK_S
        share = fair_share(slots, self.user_concurrency)
        if await self.store.count_active(task.provider, task.owner) >= share:
            return USER_RECHECK_S
        return None

    async def _take_slot(self, lease: Lease) -> bool:
        """With the inputs ready, take a provider slot for the submit, or hand the task back to
        wait for one (slow inputs never hold a slot). The check and the take are one step per
        provider in this process; across processes, two may take the last slot in one instant."""
        task = lease.task
        lock = self._slot_locks.setdefault(task.provider, asyncio.Lock())
        async with lock:
            wait = await self._no_slot(task)
            if wait is None:
                now = self.outcomes.now()

                def taken(t: Task) -> Task | lifecycle.Refused:
                    if not lease.holds(t) or t.state is not State.PROCESSING:
                        return lifecycle.Refused(t, "the lease is no longer held")
                    return t.with_changes(version=t.version + 1, updated_at=now, holds_slot=True)

                # The lease's newest record is the first try (if something moved it on, the
                # race reads it again), saving a read per submit.
                result = await lifecycle.race(self.store, task.id, taken, known=lease.latest)
                if isinstance(result, lifecycle.Refused):
                    return False
                lease.wrote(result)
                return True
        await lease.runner.hand_back(lease, "no provider slot", delay_s=wait, counted=False)
        return False

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
            if not await self._take_slot(lease) or not await self._paced(lease):
                return
            if provider.arrival == "sync" and isinstance(provider, SyncProvider):
                outcome = await self._generate(provider.name, provider, submission)
                job_id = outcome.job_id
            else:
                outcome = None
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
            if outcome is None:
                await self._submitted(lease, provider, job_id)
            else:
                await self._answered(lease, outcome)

    async def _paced(self, lease: Lease) -> bool:
        """A submit token of the task's provider, now or within ``SUBMIT_TOKEN_WAIT_S``; else
        the task is handed back until there will be one (uncounted: nothing failed)."""
        name = lease.task.provider
        wait = self.pacing.reserve(name, "submit", SUBMIT_TOKEN_WAIT_S)
        if wait is None:
            delay = self.pacing.wait_s(name, "submit") + self.rng.random()
            await lease.runner.hand_back(lease, "submit quota", delay_s=delay, counted=False)
            return False
        if wait:
            await asyncio.sleep(wait)
        return True

    async def _generate(self, name: str, provider: SyncProvider, submission: Submission) -> Outcome:
        """A synchronous provider's call, at most ``sync_calls`` at once per provider."""
        slots = self._sync_slots.setdefault(name, asyncio.Semaphore(self.sync_calls))
        async with slots:
            started = time.perf_counter()
            with answered_statuses() as answers:
                try:
                    outcome = await provider.generate(submission)
                except ProviderError as exc:
                    self._note_submit(name, submission, 1, started, answers, exc, sync=True)
                    if isinstance(exc, ProviderRateLimited) and exc.retry_after_s:
                        self.pacing.pause(name, "submit", exc.retry_after_s)
                    raise
            self._note_submit(name, submission, 1, started, answers, answer=outcome, sync=True)
            return outcome

    async def _answered(self, lease: Lease, outcome: Outcome) -> None:
        """A synchronous call's outcome: recorded as the attempt's job, then applied."""
        task = lease.task
        detail = f"{task.provider} answered {outcome.status} ({outcome.job_id})"
        if await self._record_job(lease, outcome.job_id, detail, new_job=True) is not None:
            await self.outcomes.apply(task.id, outcome)

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
        """A reference to the input the provider can use: a data URI, a signed URL of a stored
        copy, or the user's own URL when what it serves already conforms to the provider's
        limits (nothing decoded then)."""
        limits = provider.limits
        ttl_s = max(MIN_INPUT_URL_TTL_S, int(self.timings.for_task(task).ai_hard_cap_s))
        if "upload" in item:
            return await self._upload_ref(item["upload"], limits, ttl_s)
        url = item["url"]
        fetched = await self.input_fetcher.fetch(url)
        fits = await asyncio.to_thread(_conforms, fetched.data, limits)
        if fits and fetched.final_url == url and self.input_fetcher.reachable_by_anyone(url):
            return url  # the provider fetches it itself, as we just did
        data = await self._prepare(fetched.data, limits)
        key = f"inputs/{task.id}/{index}.{_extension(data)}"
        await self.blobs.put(key, data, _content_type(data))
        return await self._stored_ref(key, data, limits, ttl_s)

    async def _upload_ref(self, upload: str, limits: Limits, ttl_s: int) -> str:
        """An upload's reference for ``limits``, looked at once per process: then every task
        gets its URL without a read, or shares its one data URI. The first task of a burst
        makes it; the others wait for it instead of each reading and encoding their own."""
        seen = (upload, _variant(limits))
        known = await self._known_ref(seen, limits, ttl_s)
        if known is not None:
            return known
        async with self._preparing.hold(f"ref:{upload}:{seen[1]}"):
            known = await self._known_ref(seen, limits, ttl_s)
            if known is not None:
                return known
            key, data = await self._upload_for(upload, limits)
            self._upload_refs[seen] = (key, len(data))
            if len(self._upload_refs) > UPLOAD_REFS_KEPT:
                self._upload_refs.popitem(last=False)
            ref = await self._stored_ref(key, data, limits, ttl_s)
            if ref.startswith("data:"):
                self._upload_uris[seen] = ref
                if len(self._upload_uris) > UPLOAD_URIS_KEPT:
                    self._upload_uris.popitem(last=False)
            return ref

    async def _known_ref(self, seen: tuple[str, str], limits: Limits, ttl_s: int) -> str | None:
        """The reference of an upload this process has looked at for these limits, if any."""
        known = self._upload_refs.get(seen)
        if known is None:
            return None
        self._upload_refs.move_to_end(seen)
        if self._by_url(limits, known[1]):
            return await self.blobs.url(known[0], ttl_s)
        inline = self._upload_uris.get(seen)
        if inline is not None:
            self._upload_uris.move_to_end(seen)
        return inline

    async def _stored_ref(self, key: str, data: bytes, limits: Limits, ttl_s: int) -> str:
        """A stored input's reference: its signed URL or its data URI (``_by_url``)."""
        if self._blob_urls_public is None and self.inputs_by_url == "auto":
            # a property of the blob store: decided once, on the first stored input's URL
            url = await self.blobs.url(key, ttl_s)
            self._blob_urls_public = self.input_fetcher.reachable_by_anyone(url)
        if self._by_url(limits, len(data)):
            # a few hundred bytes instead of the image, in the submit and every echo of it
            return await self.blobs.url(key, ttl_s)
        return f"data:{_content_type(data)};base64,{base64.b64encode(data).decode('ascii')}"

    def _by_url(self, limits: Limits, size: int) -> bool:
        """Whether a stored input of ``size`` bytes goes to the provider by URL: always when
        the provider takes no data URI or the input is too large for one, else as
        ``HOOKLINE_INPUTS_BY_URL`` says (``auto``: when the blob store's URLs are public)."""
        if not limits.accepts_data_uri or size > DATA_URI_MAX_BYTES:
            return True
        return self.inputs_by_url == "always" or (
            self.inputs_by_url == "auto" and self._blob_urls_public is True
        )

    async def _upload_for(self, upload: str, limits: Limits) -> tuple[str, bytes]:
        """An upload as the provider accepts it: the upload itself when it conforms (uploads are
        normalised when they arrive: no metadata, upright), else its one prepared copy for these
        limits (``derived/…``), made by the first task that needs it and reused by every other,
        in this process and the next. In this process one task at a time looks (``_upload_ref``
        holds the upload's lock); in two processes, both write the same bytes to the same key."""
        data = await self.blobs.get(upload)
        if await asyncio.to_thread(_conforms, data, limits):
            return upload, data
        plan = await asyncio.to_thread(plan_decode, data, fit=limits.max_side, shrink=True)
        fmt = expected_format(plan.mode, limits.formats)
        key = derived_key(upload, _variant(limits), CONTENT_TYPES[fmt].split("/")[-1])
        try:
            return key, await self.blobs.get(key)
        except NotFound:
            pass
        prepared = await self._prepare(data, limits)
        await self.blobs.put(key, prepared, _content_type(prepared))
        return key, prepared

    async def _prepare(self, data: bytes, limits: Limits) -> bytes:
        """The input as the provider accepts it, decoded with its peak memory reserved."""
        plan = await asyncio.to_thread(plan_decode, data, fit=limits.max_side, shrink=True)
        return await run_within(
            self.budget,
            plan.peak_bytes,
            prepare_input,
            data,
            max_side=limits.max_side,
            formats=limits.formats,
            data_uri=False,
        )

    async def _submit(self, provider: Provider, submission: Submission) -> str:
        """Submit, retrying transient failures inside the step (honouring Retry-After)."""
        for attempt in range(1, SUBMIT_TRIES + 1):
            started = time.perf_counter()
            with answered_statuses() as answers:
                try:
                    job_id = await provider.submit(submission)
                except ProviderError as exc:
                    self._note_submit(provider.name, submission, attempt, started, answers, exc)
                    if isinstance(exc, PermanentProviderError) or attempt == SUBMIT_TRIES:
                        raise
                    wait = backoff_s(attempt, 0.5, self.rng.random())
                    if isinstance(exc, ProviderRateLimited) and exc.retry_after_s:
                        wait = min(exc.retry_after_s, 30.0)
                        self.pacing.pause(provider.name, "submit", exc.retry_after_s)
                    log.warning("submit_retry", error=exc.message, wait_s=round(wait, 2))
                else:
                    self._note_submit(
                        provider.name, submission, attempt, started, answers, job_id=job_id
                    )
                    return job_id
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _note_submit(
        self,
        provider: str,
        submission: Submission,
        tried: int,
        started: float,
        answers: list[int],
        error: ProviderError | None = None,
        *,
        job_id: str | None = None,
        answer: Outcome | None = None,
        sync: bool = False,
    ) -> None:
        """Note one submit try (or synchronous call) on the task's timeline: its job id, or its
        error, with the HTTP status of the provider's last answer (an error's own status first)."""
        status = error_status(error) if error is not None else None
        if status is None and answers:
            status = answers[-1]
        data = submit_note(
            provider,
            submission.model,
            submission.attempt,
            tried,
            elapsed_ms(started),
            job_id=answer.job_id if answer is not None else job_id,
            status_code=status,
            error=error,
            sync=sync,
            outcome=answer.status if answer is not None else None,
        )
        self.outcomes.note(submission.task_id, "submit", data)

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
                "polls": 0,  # the poll schedule starts again for a new job
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
            known=lease.latest,
        )
        return None if isinstance(result, lifecycle.Refused) else early


def _conforms(data: bytes, limits: Limits) -> bool:
    return conforms(data, max_side=limits.max_side, formats=limits.formats)


def _variant(limits: Limits) -> str:
    """The name of a provider's input limits in a derived key: ``2048-jpeg-png-webp``."""
    return "-".join([str(limits.max_side), *(f.lower() for f in limits.formats)])


def _content_type(data: bytes) -> str:
    return sniff_content_type(data) or "image/jpeg"


def _extension(data: bytes) -> str:
    return _content_type(data).split("/")[-1]


class KeyedLocks:
    """One ``asyncio.Lock`` per key while anyone holds or waits for it (the table stays small)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
