"""Persisting decisions: read, decide purely, compare-and-set, re-read on a lost race.

``commit`` is the one place a changed record is written: a compare-and-set on (id, state,
version) that publishes a feed event when the record's history grew, and logs one line per stored
transition. ``race`` is the one retry loop around it: a lost race is a normal outcome, so the loop
reads the task again and decides again against what is now stored, and a duplicate event finds its
work already done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from statemachine.decide import Deadlines, NotAllowed, apply, claim, decide, renew
from statemachine.errors import Conflict, NotFound
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Task

log = structlog.get_logger()

MAX_RACES: Final = 50

Changes = Callable[[Task], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Refused:
    """Nothing was written: the change does not apply to the task as it is stored."""

    task: Task
    reason: str


Change = Callable[[Task], "Task | Refused"]


async def commit(store: TaskStore, old: Task, new: Task) -> bool:
    """Compare-and-set ``new`` over ``old``; False if the stored record moved on meanwhile.

    A record whose history grew is a state change: the store publishes its feed event in the same
    write, and one ``transition`` line (task_id, from, to, on: the event, attempt, provider) is
    logged here, for every transition of every task."""
    moved = len(new.history) > len(old.history)
    if not await store.transition(new, old.state, old.version, emit=moved):
        return False
    if moved:
        entry = new.history[-1]
        fields: dict[str, Any] = {
            "task_id": new.id,
            "from": entry.source.value,
            "to": entry.dest.value,
            "on": entry.event,  # structlog keeps "event" for the line's own name
            "attempt": new.attempts,
            "provider": new.provider,
        }
        if entry.detail:
            fields["detail"] = entry.detail
        log.info("transition", **fields)
    return True


async def race(
    store: TaskStore,
    task_id: str,
    change: Change,
    *,
    known: Task | None = None,
    tries: int = MAX_RACES,
) -> Task | Refused:
    """Apply ``change`` to the stored task, retrying lost compare-and-set races.

    ``change(task)`` gives the new record (version + 1) or ``Refused``; it is called again on
    the record as it is after a lost race. ``known`` is a record the caller has just read: the
    first try works on it (saving a read). ``NotFound`` if there is no such task; ``Conflict``
    after ``tries`` lost races.
    """
    for _ in range(tries):
        task = known if known is not None else await store.get_task(task_id)
        known = None
        if task is None:
            raise NotFound(f"task {task_id} not found")
        new = change(task)
        if isinstance(new, Refused):
            return new
        if await commit(store, task, new):
            return new
    raise Conflict(f"task {task_id}: too many concurrent changes", code="contention")


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
    """Apply ``event`` to the stored task (see ``race``).

    ``changes(task)`` gives extra fields for the new record, computed from the record the decision
    was made on. ``guard(task)`` may refuse the event for a reason the machine cannot see (a
    webhook for a job that is no longer current). Returns the new record, or ``Refused``.
    """

    def step(task: Task) -> Task | Refused:
        if guard is not None and not guard(task):
            return Refused(task, "guard refused the event")
        decision = decide(task, event, now, deadlines, detail=detail, delay_s=delay_s)
        if isinstance(decision, NotAllowed):
            return Refused(task, decision.reason)
        return apply(task, decision, **(changes(task) if changes else {}))

    return await race(store, task_id, step, known=known)


async def update(
    store: TaskStore,
    task: Task,
    now: float,
    **changes: Any,
) -> Task | None:
    """Store ``changes`` on ``task`` without a state change (no feed event); None if the record
    moved on since it was read."""
    new = task.with_changes(version=task.version + 1, updated_at=now, **changes)
    return new if await commit(store, task, new) else None


async def take_lease(
    store: TaskStore, task: Task, owner: str, now: float, lease_s: float
) -> Task | None:
    """Claim the lease on ``task`` for ``owner``; None if someone holds it or the record moved on.
    Pending tasks are started (pending → processing) by the same write."""
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
        return new if await commit(store, task, new) else None
    claimed = claim(task, owner, now, lease_s)
    if claimed is None:
        return None
    return claimed if await commit(store, task, claimed) else None


async def renew_lease(
    store: TaskStore, task_id: str, owner: str, now: float, lease_s: float
) -> Task | None:
    """Extend ``owner``'s live lease on the stored task; None if ``owner`` no longer holds it."""

    def extended(task: Task) -> Task | Refused:
        renewed = renew(task, owner, now, lease_s)
        return renewed if renewed is not None else Refused(task, "the lease is not held")

    result = await race(store, task_id, extended)
    return None if isinstance(result, Refused) else result
