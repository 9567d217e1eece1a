"""Pure decisions: given a task, an event and the time, what the next record looks like.

Nothing here does I/O. A caller persists the result with the store's compare-and-set and only then
starts side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from statemachine.states import LEASED_STATES, REFUNDED_STATES, TERMINAL, Event, State, next_state
from statemachine.task import HistoryEntry, Task


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long each non-terminal state may last before the reaper looks at the task."""

    handoff_s: float = 10.0  # pending / watermarking: time for a dispatcher to pick the task up
    lease_s: float = 60.0  # processing / watermarking: a worker's lease
    ai_deadline_s: float = 600.0  # ai_processing: until the reaper polls the provider
    ai_hard_cap_s: float = 1800.0  # ai_processing: the most an attempt may run, polls included
    retry_backoff_s: float = 2.0  # base of the exponential backoff between attempts
    max_attempts: int = 3
    # A provider whose outcomes must be asked for (poll-only, or a trigger that may be lost) is
    # polled on a schedule: first ``first_poll_s`` after the submit (its expected latency), then
    # ``poll_interval_s`` doubling with jitter up to ``poll_max_interval_s``, within the hard cap.
    # None: a webhook provider, looked at only at ``ai_deadline_s``.
    first_poll_s: float | None = None
    poll_interval_s: float = 5.0
    poll_max_interval_s: float = 60.0

    @property
    def polled(self) -> bool:
        return self.first_poll_s is not None


@dataclass(frozen=True, slots=True)
class Transition:
    """An allowed transition, ready to persist."""

    source: State
    dest: State
    event: Event
    at: float
    deadline: float | None
    entry: HistoryEntry


@dataclass(frozen=True, slots=True)
class NotAllowed:
    """The machine forbids ``event`` in ``state``; ``reason`` says why in words."""

    state: State
    event: Event
    reason: str


def decide(
    task: Task,
    event: Event,
    now: float,
    deadlines: Deadlines,
    *,
    detail: str | None = None,
    delay_s: float | None = None,
) -> Transition | NotAllowed:
    """Decide ``event`` for ``task`` at ``now``: the new state, its history entry and deadline.

    ``delay_s`` overrides the state's default deadline (a retry's backoff, an extension).
    """
    dest = next_state(task.state, event)
    if dest is None:
        terminal = " (terminal)" if task.state in TERMINAL else ""
        reason = f"{event.value!r} is not allowed in state {task.state.value!r}{terminal}"
        return NotAllowed(task.state, event, reason)
    if event is Event.RETRY and task.attempts >= deadlines.max_attempts:
        return NotAllowed(task.state, event, f"no attempts left ({task.attempts} used)")
    deadline = now + delay_s if delay_s is not None else default_deadline(dest, now, deadlines)
    entry = HistoryEntry(task.state, dest, event.value, now, detail)
    return Transition(task.state, dest, event, now, deadline, entry)


def default_deadline(state: State, now: float, deadlines: Deadlines) -> float | None:
    """When the reaper should look at a task that has just entered ``state``."""
    if state in TERMINAL:
        return None
    if state is State.AI_PROCESSING:
        if deadlines.first_poll_s is not None:
            return now + min(deadlines.first_poll_s, deadlines.ai_deadline_s)
        return now + deadlines.ai_deadline_s
    if state is State.PROCESSING:
        return now + deadlines.lease_s
    return now + deadlines.handoff_s


def apply(task: Task, transition: Transition, **changes: Any) -> Task:
    """The record after ``transition``: new state, deadline, history; version + 1.

    The lease (and a processing step's provider slot) is dropped unless ``changes`` sets one.
    Entering failed/cancelled marks the task
    refunded: the store writes the refund in the same compare-and-set, exactly once.
    """
    fields: dict[str, Any] = {
        "state": transition.dest,
        "version": task.version + 1,
        "updated_at": transition.at,
        "deadline": transition.deadline,
        "history": (*task.history, transition.entry),
        "lease_owner": None,
        "lease_expires": None,
        "holds_slot": False,  # in ai_processing the state itself is the provider slot
    }
    if transition.dest in REFUNDED_STATES:
        fields["refunded"] = True
    fields.update(changes)
    return task.with_changes(**fields)


def claim(task: Task, owner: str, now: float, lease_s: float) -> Task | None:
    """The record with ``owner``'s lease on it, or None while any live lease is held.

    Used to claim work in processing/watermarking; the deadline follows the lease. A live lease
    is exclusive even against its own owner: two coroutines of one process (the dispatcher and
    the reaper) must not both run a step. Extending one's own lease is ``renew``. Claiming over
    a lease that expired unreleased counts a lost lease (``lost_leases``); a claim holds no
    provider slot until its step takes one (``holds_slot``).
    """
    if task.state not in LEASED_STATES and task.state is not State.PENDING:
        return None
    if task.lease_held(now):
        return None
    claimed = _leased(task, owner, now, lease_s).with_changes(holds_slot=False)
    if lease_lost(task, now):
        claimed = claimed.with_changes(lost_leases=task.lost_leases + 1)
    return claimed


def lease_lost(task: Task, now: float) -> bool:
    """True if the task's last worker died holding its lease: it expired without a release (a
    hand-back or a finished step always releases)."""
    return task.lease_owner is not None and not task.lease_held(now)


def renew(task: Task, owner: str, now: float, lease_s: float) -> Task | None:
    """The record with ``owner``'s live lease extended, or None if ``owner`` does not hold it."""
    if task.lease_owner != owner or not task.lease_held(now):
        return None
    return _leased(task, owner, now, lease_s)


def _leased(task: Task, owner: str, now: float, lease_s: float) -> Task:
    expires = now + lease_s
    return task.with_changes(
        version=task.version + 1,
        updated_at=now,
        lease_owner=owner,
        lease_expires=expires,
        deadline=expires,
    )


def release(task: Task, now: float, deadline: float) -> Task:
    """The record with its lease (and any provider slot) dropped and a new deadline (work handed
    back)."""
    return task.with_changes(
        version=task.version + 1,
        updated_at=now,
        lease_owner=None,
        lease_expires=None,
        deadline=deadline,
        holds_slot=False,
    )


def poll_delay_s(polls: int, deadlines: Deadlines, jitter: float) -> float:
    """The wait before the next poll of a job already polled ``polls`` times and still running:
    ``poll_interval_s`` doubling per poll, spread ±50 % by ``jitter`` in [0, 1), at most
    ``poll_max_interval_s``."""
    grown = deadlines.poll_interval_s * (2 ** min(max(polls - 1, 0), 30))
    return float(min(grown, deadlines.poll_max_interval_s) * (0.5 + jitter))


def backoff_s(attempt: int, base_s: float, jitter: float) -> float:
    """Exponential backoff before attempt ``attempt + 1``; ``jitter`` in [0, 1) spreads it ±50 %."""
    return float(base_s * (2 ** max(attempt - 1, 0)) * (0.5 + jitter))
