"""The step runner: runs the leased steps of one process (processing, watermarking).

A step runs only under a lease claimed by compare-and-set, so any number of runners (processes)
may be offered the same task and exactly one works on it. While it works, the lease is renewed
(a heartbeat every third of it), so a slow but healthy step is not taken over. A step that meets a
transient failure (a blob store or file host blip) hands the task back with a backoff, a bounded
number of times; the reaper finds it again by its deadline. A step whose worker dies holding the
lease is run again by another worker, a bounded number of times (``max_lost_leases``): then the
task fails (``worker_lost``), so an input that kills the process cannot loop forever. At
shutdown running steps get a grace period (a submit cut short would be paid for twice), then are
cancelled.

At most ``concurrency`` steps run at once (``HOOKLINE_STEP_CONCURRENCY``), each on a driver that
takes the next task id from a bounded backlog when its step ends; an offer beyond the backlog
(``HOOKLINE_STEP_BACKLOG``) is dropped, and the task waits in the store until the reaper finds it
by its deadline. A burst of 2,000 creates is then 128 steps in flight and 1,872 ids, not 2,000
steps each holding its inputs in memory.

Who offers work: the dispatcher (the change feed) and the reaper (the backstop), nobody else; see
service/steps/dispatcher.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

from service.background import Background
from service.steps.outcomes import OutcomeApplier
from statemachine import lifecycle
from statemachine.decide import backoff_s, lease_lost, release
from statemachine.errors import Conflict, HooklineError, NotFound
from statemachine.rules import LeaseLost
from statemachine.states import State
from statemachine.store import TaskStore
from statemachine.task import Task

log = structlog.get_logger()

MAX_HAND_BACKS: Final = 5  # hand-backs of one step after transient failures before the task fails
HAND_BACK_TRIES: Final = 5  # compare-and-set tries of one hand-back (the heartbeat bumps versions)
CLOSE_GRACE_S: Final = 10.0


class Step(Protocol):
    """One leased step: ``ready`` looks at the task before a lease is claimed (it may decline, or
    postpone the task in the store), ``run`` does the work on the claimed record."""

    async def ready(self, task: Task, now: float) -> bool: ...

    async def run(self, lease: Lease) -> None: ...


@dataclass(slots=True)
class Lease:
    """A step's hold on its task: the record as claimed, the runner that holds it, and the
    newest record this lease wrote (the claim, then each of the step's own writes and lease
    renewals). A step's next write tries ``latest`` first instead of reading the task again;
    if something else moved the record on, the compare-and-set fails and the write reads it."""

    task: Task
    runner: StepRunner
    latest: Task = field(init=False)

    def __post_init__(self) -> None:
        self.latest = self.task

    def wrote(self, task: Task) -> None:
        """``task`` was written under this lease: the newest record so far unless a newer one
        (a renewal or another of the step's writes, landing in between) is already known."""
        if task.version > self.latest.version:
            self.latest = task

    @property
    def owner(self) -> str:
        return self.runner.owner

    async def failed(self, code: str, message: str, *, retryable: bool) -> str:
        """The step cannot finish: retry or fail the task, if this lease still holds it."""
        return await self.runner.outcomes.step_failed(
            self.task, code, message, retryable=retryable, owner=self.owner
        )

    async def transient(self, exc: HooklineError, code: str | None = None) -> None:
        """A failure that may pass: hand the step back (bounded), then fail the task."""
        await self.runner.transient(self, exc, code)

    def holds(self, task: Task) -> bool:
        """A guard for the step's own writes: the lease is still this runner's."""
        return task.lease_owner == self.owner


class StepRunner:
    """Runs steps for the states in ``steps`` under leases named ``owner``."""

    def __init__(
        self,
        store: TaskStore,
        outcomes: OutcomeApplier,
        steps: Mapping[State, Step],
        *,
        owner: str,
        lease_s: float,
        retry_backoff_s: float,
        max_lost_leases: int,
        now: Callable[[], float],
        concurrency: int,
        backlog: int,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.outcomes = outcomes
        self.steps = steps
        self.owner = owner
        self.lease_s = lease_s
        self.retry_backoff_s = retry_backoff_s
        self.max_lost_leases = max_lost_leases
        self.now = now
        self.rng = rng or random.Random()
        self.concurrency = max(1, concurrency)
        self.backlog_limit = backlog
        self.work = Background("step")  # the drivers: at most ``concurrency`` of them
        self._drivers = 0
        # Task ids offered while every driver is busy, oldest first: a few dozen bytes each, no
        # coroutine, no record. Beyond ``backlog`` an offer is dropped: the task waits in the
        # store, where the reaper finds it by its deadline.
        self._backlog: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0  # offers dropped on a full backlog (the reaper picks those tasks up)
        self._timers: set[asyncio.TimerHandle] = set()
        self._stepping: set[str] = set()  # tasks with a step running in this process

    @property
    def busy(self) -> int:
        """Steps running and task ids waiting for a driver."""
        return self._drivers + len(self._backlog)

    # --- being offered work ----------------------------------------------------------------------

    def start(self, task_id: str) -> None:
        """Run the step the stored task needs, in the background, as soon as a driver is free."""
        self._enqueue(task_id, None)

    def start_at(self, when: float, task_id: str) -> None:
        """Run the step the task needs at ``when`` (after a retry's backoff). Timers are not
        kept over a restart: the reaper finds the task by its stored deadline then."""
        if self.work.closing:
            return
        delay = max(0.0, when - self.now())

        def fire() -> None:
            self._timers.discard(handle)
            self.start(task_id)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def offer(self, task: Task) -> bool:
        """The reaper's way in: start the task's step in the background (unless this process is
        already running one for it) and return at once, so a slow step never holds up a pass."""
        return task.id not in self._stepping and self._enqueue(task.id, task)

    def _enqueue(self, task_id: str, known: Task | None) -> bool:
        """Hand the task to a free driver, else to the backlog (by id: the record is read again
        when its turn comes), else drop the offer: the task is safe in the store. False if
        nothing new was queued (already in the backlog, closing, or dropped)."""
        if self.work.closing or task_id in self._backlog:
            return False
        if self._drivers < self.concurrency:
            self._drivers += 1
            self.work.spawn(self._drive(task_id, known))
        elif len(self._backlog) < self.backlog_limit:
            self._backlog[task_id] = None
        else:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("step_backlog_full", backlog=self.backlog_limit, dropped=self.dropped)
            return False
        return True

    async def _drive(self, task_id: str, known: Task | None) -> None:
        """One driver: run the task's step, then the backlog's oldest, until the backlog is empty
        (or the runner closes: what is left waits in the store)."""
        try:
            while True:
                try:
                    await self.run(task_id, known=known)
                except Exception as exc:
                    log.exception("step_crashed", task_id=task_id, error=repr(exc))
                if not self._backlog or self.work.closing:
                    return
                task_id, _ = self._backlog.popitem(last=False)
                known = None
        finally:
            self._drivers -= 1

    # --- running -------------------------------------------------------------------------------

    async def run(self, task_id: str, *, known: Task | None = None) -> None:
        """Claim the task's lease and run its step; nothing happens if there is no step for its
        state, the step declines, or someone else holds the lease."""
        task = known if known is not None else await self.store.get_task(task_id)
        if task is None:
            return
        step = self.steps.get(task.state)
        if step is None:
            return
        now = self.now()
        if not await step.ready(task, now):
            return
        if await self._poisoned(task, now):
            return
        claimed = await lifecycle.take_lease(self.store, task, self.owner, now, self.lease_s)
        if claimed is None:
            return
        lease = Lease(claimed, self)
        tokens = structlog.contextvars.bind_contextvars(task_id=task.id)
        try:
            async with self._heartbeat(lease):
                await step.run(lease)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    async def _poisoned(self, task: Task, now: float) -> bool:
        """True if the task's step has lost its worker too often to run again: it is failed
        (``worker_lost``, refunded) instead, so an input that kills the process cannot loop."""
        if not lease_lost(task, now) or task.lost_leases + 1 < self.max_lost_leases:
            return False
        assert task.lease_owner is not None
        news = LeaseLost(task.lease_owner, self.max_lost_leases)
        await self.outcomes.settle(task.id, news, known=task)
        return True

    @contextlib.asynccontextmanager
    async def _heartbeat(self, lease: Lease) -> AsyncIterator[None]:
        """While a step works: mark it running here and renew its lease every third of it."""
        task = lease.task
        self._stepping.add(task.id)
        beat = asyncio.create_task(self.beat(task.id, lease), name=f"lease-{task.id}")
        try:
            yield
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            self._stepping.discard(task.id)

    async def beat(self, task_id: str, lease: Lease | None = None) -> None:
        """Renew this runner's lease on ``task_id`` until it is gone or the beat is cancelled
        (each renewal becomes ``lease.latest``)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                held = await lifecycle.renew_lease(
                    self.store, task_id, self.owner, self.now(), self.lease_s
                )
            except Exception as exc:  # a store blip: keep beating, the lease has time left
                log.warning("lease_renewal_failed", task_id=task_id, error=repr(exc))
                continue
            if held is None:
                return  # the lease is gone; the step's own guarded writes will be refused
            if lease is not None:
                lease.wrote(held)

    # --- handing back ----------------------------------------------------------------------------

    async def transient(self, lease: Lease, exc: HooklineError, code: str | None = None) -> None:
        """Hand the step back after a failure that may pass, a bounded number of times; then
        fail the task (with its refund)."""
        if lease.task.step_retries < MAX_HAND_BACKS:
            await self.hand_back(lease, exc.message)
        else:
            await lease.failed(code or exc.code, exc.message, retryable=False)

    async def hand_back(
        self, lease: Lease, reason: str, *, delay_s: float | None = None, counted: bool = True
    ) -> bool:
        """Give up the lease with a backoff (or ``delay_s``) as the task's deadline; the reaper runs
        the step again then (the result may be paid for already: a flaky file host must not throw
        it away). A ``counted`` hand-back spends one of the step's ``MAX_HAND_BACKS``; waiting
        for a provider slot does not. False if the lease was no longer this runner's."""
        now = self.now()
        if delay_s is None:
            delay_s = backoff_s(
                lease.task.step_retries + 1, self.retry_backoff_s, self.rng.random()
            )
        wait = delay_s

        def released(task: Task) -> Task | lifecycle.Refused:
            if not lease.holds(task) or task.state is not lease.task.state:
                return lifecycle.Refused(task, "the lease is no longer held")
            handed = release(task, now, now + wait)
            return handed.with_changes(step_retries=task.step_retries + 1) if counted else handed

        try:
            result = await lifecycle.race(
                self.store, lease.task.id, released, tries=HAND_BACK_TRIES
            )
        except (Conflict, NotFound):
            return False  # the record keeps moving under us: the lease is not ours to give
        if isinstance(result, lifecycle.Refused):
            return False
        if counted:
            log.warning("step_handed_back", reason=reason, retry_in_s=round(wait, 2))
        return True

    # --- stopping --------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until no step is running (tests)."""
        await self.work.drain()

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Drop pending timers (the reaper finds those tasks), give running steps ``grace_s``,
        then cancel them."""
        self.work.closing = True
        self._backlog.clear()  # the reaper finds those tasks by their deadlines
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        await self.work.close(grace_s)
