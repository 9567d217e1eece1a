"""The reaper: finds overdue tasks through the deadline index and hands each to an action.

Several reapers may run at once: every action begins with a compare-and-set (a lease claim for
pending/processing/watermarking, a deadline claim for ai_processing), so exactly one acts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal, Protocol

import structlog

from statemachine import clock
from statemachine.states import State
from statemachine.store import TaskStore
from statemachine.task import Task

log = structlog.get_logger()

Plan = Literal["dispatch", "reconcile", "skip"]


def plan(task: Task, now: float) -> Plan:
    """What an overdue task needs. Pure."""
    if task.terminal or task.deadline is None or task.deadline > now:
        return "skip"
    if task.state is State.AI_PROCESSING:
        return "reconcile"
    if task.lease_held(now):
        return "skip"  # a live lease whose deadline lagged; the holder is still working
    return "dispatch"


class ReaperActions(Protocol):
    async def dispatch(self, task: Task) -> bool:
        """Run the task's step now (it claims its own lease); False when this process already
        has it in hand (running, or waiting for a free step), so nothing new was started."""

    async def reconcile(self, task: Task, now: float) -> None:
        """An ai_processing task past its deadline: claim it, poll, adopt/extend/retry/fail."""


class Reaper:
    """Runs passes every ``interval_s``; each pass handles up to ``batch`` overdue tasks."""

    def __init__(
        self,
        store: TaskStore,
        actions: ReaperActions,
        *,
        interval_s: float,
        batch: int = 500,
        concurrency: int = 32,
        now: Callable[[], float] = clock.now,
    ) -> None:
        self.store = store
        self.actions = actions
        self.interval_s = interval_s
        self.batch = batch
        self.now = now
        self._slots = asyncio.Semaphore(concurrency)

    async def run_pass(self) -> int:
        """One pass; returns how many overdue tasks were handed to an action (a task this
        process already has in hand is not counted: a backlog of them is no reason to loop)."""
        now = self.now()
        try:
            repaired = await self.store.reconcile(now)
        except Exception as exc:  # a poisoned repair must not stop the recovery of overdue tasks
            log.exception("reaper_repair_failed", error=repr(exc))
            repaired = 0
        if repaired:
            log.warning("reaper_repaired_half_done_writes", count=repaired)
        tasks = await self.store.overdue(now, self.batch)
        jobs = [self._act(what, task, now) for task in tasks if (what := plan(task, now)) != "skip"]
        return sum(await asyncio.gather(*jobs)) if jobs else 0

    async def _act(self, what: Plan, task: Task, now: float) -> bool:
        """Whether the action started something (a dispatch of a task already in hand did not)."""
        async with self._slots:
            structlog.contextvars.bind_contextvars(task_id=task.id)
            try:
                if what == "dispatch":
                    return await self.actions.dispatch(task)
                await self.actions.reconcile(task, now)
                return True
            except Exception as exc:
                log.exception("reaper_action_failed", action=what, error=repr(exc))
                return True
            finally:
                structlog.contextvars.unbind_contextvars("task_id")

    async def run(self) -> None:
        """Passes forever, ``interval_s`` apart (sooner when a full batch was found)."""
        while True:
            try:
                handled = await self.run_pass()
            except Exception as exc:
                log.exception("reaper_pass_failed", error=repr(exc))
                handled = 0
            await asyncio.sleep(0 if handled >= self.batch else self.interval_s)
