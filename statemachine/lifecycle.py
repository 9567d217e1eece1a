"""Persisting decisions: read, decide purely, compare-and-set, re-read on a lost race.

A lost race is a normal outcome: the loop re-reads the task and decides again against what is now
stored, so a duplicate event finds its work already done and becomes a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statemachine.decide import Deadlines, NotAllowed, apply, claim, decide
from statemachine.errors import Conflict, NotFound
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Task

MAX_RACES = 50

Changes = Callable[[Task], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Refused:
    """The event was not applied: the machine forbids it in the task's current state."""

    task: Task
    reason: str


async def advance(
    store: TaskStore,
    task_id: str,
    event: Event,
    now: float,
    deadlines: Deadlines,
    *,
    detail: str | None = None,
    delay_s: float | None = None,
    changes: Changes | None = None,
    guard: Callable[[Task], bool] | None = None,
    known: Task | None = None,
) -> Task | Refused:
    """Apply ``event`` to the stored task, retrying lost compare-and-set races.

    ``changes(task)`` gives extra fields for the new record, computed from the record the decision
    was made on. ``guard(task)`` may refuse the event for a reason the machine cannot see (a
    webhook for a job that is no longer current). ``known`` is a record the caller has just read:
    the first try decides on it (saving a read); a lost race re-reads. Returns the new record, or
    ``Refused``.
    """
    for _ in range(MAX_RACES):
        task = known if known is not None else await store.get_task(task_id)
        known = None
        if task is None:
            raise NotFound(f"task {task_id} not found")
        if guard is not None and not guard(task):
            return Refused(task, "guard refused the event")
        decision = decide(task, event, now, deadlines, detail=detail, delay_s=delay_s)
        if isinstance(decision, NotAllowed):
            return Refused(task, decision.reason)
        new = apply(task, decision, **(changes(task) if changes else {}))
        if await store.transition(new, task.state, task.version):
            return new
    raise Conflict(f"task {task_id}: too many concurrent changes", code="contention")


async def update(
    store: TaskStore,
    task: Task,
    now: float,
    **changes: Any,
) -> Task | None:
    """Store ``changes`` on ``task`` without a state change (no feed event); None if the record
    moved on since it was read."""
    new = task.with_changes(version=task.version + 1, updated_at=now, **changes)
    if await store.transition(new, task.state, task.version, emit=False):
        return new
    return None


async def take_lease(
    store: TaskStore, task: Task, owner: str, now: float, lease_s: float
) -> Task | None:
    """Claim (or renew) the lease on ``task`` for ``owner``; None if someone else holds it or the
    record moved on. Pending tasks are started (pending → processing) by the same write."""
    if task.state is State.PENDING:
        decision = decide(task, Event.START, now, Deadlines(lease_s=lease_s))
        if isinstance(decision, NotAllowed):
            return None
        new = apply(
            task,
            decision,
            attempts=max(task.attempts, 1),
            lease_owner=owner,
            lease_expires=now + lease_s,
            deadline=now + lease_s,
        )
        return new if await store.transition(new, task.state, task.version) else None
    claimed = claim(task, owner, now, lease_s)
    if claimed is None:
        return None
    return (
        claimed if await store.transition(claimed, task.state, task.version, emit=False) else None
    )
