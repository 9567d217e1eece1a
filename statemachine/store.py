"""The TaskStore port: everything the lifecycle needs persisted, as one Protocol.

Adapters: ``sqlite_store.SqliteStore`` (embedded default) and ``mongo_store.MongoStore``.
One contract suite (tests/contract) runs against every adapter.

Rules every adapter keeps:
- ``transition`` is a compare-and-set on (id, expected_state, expected_version): all of it is
  written or nothing is, and a lost race returns False (never raises).
- A CAS that writes a task in failed/cancelled with ``refunded=True`` also credits ``cost`` back to
  the owner, exactly once per task (a ledger entry under the unique key (task_id, "refund")).
- ``create_task`` debits ``cost`` once (ledger key (task_id, "debit")); an idempotent replay with
  the same (owner, idempotency_key) and request_hash returns the first task and charges nothing.
- Every stored change with ``emit=True`` appends one FeedEvent whose position sorts after all
  earlier ones.
- Retention (``prune_feed``, ``prune_deliveries``) deletes in bounded batches and never deletes the
  newest feed event (``feed_head`` stays meaningful) nor one after the oldest position a watcher
  saved (``save_position``): the retained feed is always a contiguous run ending at the head.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from statemachine.states import State
from statemachine.task import Task

LedgerKind = Literal["grant", "debit", "refund"]


@dataclass(frozen=True, slots=True)
class User:
    """An account. ``rate_limit_per_s`` and ``rate_limit_burst`` are the user's own request
    limits per API key (``rate_limit_per_s`` 0: no limit); None: the process's defaults."""

    name: str
    balance: int
    is_admin: bool
    created_at: float
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    user: str
    kind: LedgerKind
    amount: int  # signed: debits are negative
    at: float
    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One change of one task. ``position`` is opaque and resumable (a sequence number in SQLite,
    a resume token in MongoDB); ``source`` is None for a creation."""

    position: str
    task_id: str
    owner: str
    source: State | None
    dest: State
    event: str
    at: float
    version: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Task]
    next: str | None


class TaskStore(Protocol):
    """Persistence of users, credits, tasks, webhook deliveries, and the change feed."""

    async def open(self) -> None:
        """Create the schema / indexes if missing. Idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` if the store cannot serve requests."""

    # users, keys, credits
    async def create_user(
        self,
        name: str,
        credits: int,
        *,
        is_admin: bool,
        key_hash: str,
        now: float,
        rate_limit_per_s: float | None = None,
        rate_limit_burst: int | None = None,
    ) -> User:
        """Create a user with one API key (stored as its hash) and its own request limits (None:
        the process's defaults). ``Conflict`` if the name exists."""

    async def set_user_limits(
        self, name: str, *, rate_limit_per_s: float | None, rate_limit_burst: int | None
    ) -> User:
        """Replace the user's own request limits (None: the process's defaults); the user as
        stored now. ``NotFound``."""

    async def add_api_key(self, name: str, key_hash: str, now: float) -> None: ...

    async def user_by_key_hash(self, key_hash: str) -> User | None: ...

    async def get_user(self, name: str) -> User | None: ...

    async def grant(self, name: str, amount: int, now: float) -> int:
        """Add ``amount`` credits (a ledger entry); return the new balance. ``NotFound``."""

    async def ledger(self, name: str) -> list[LedgerEntry]:
        """Every ledger entry of ``name``, oldest first."""

    # tasks
    async def create_task(self, task: Task) -> tuple[Task, bool]:
        """Insert ``task`` (state pending, version 1), debit its cost and record its idempotency key
        in one atomic step, and emit a creation FeedEvent. Returns (task, created).

        Same (owner, idempotency_key) and same request_hash → (the first task, False), no charge.
        Same key, other request_hash → ``Conflict``. Balance below cost → ``InsufficientCredits``
        (nothing written).
        """

    async def get_task(self, task_id: str) -> Task | None: ...

    async def task_by_job(self, provider: str, job_id: str) -> Task | None:
        """The non-terminal task whose current job on ``provider`` is ``job_id`` (a provider's
        project-level webhook names only the job), through an index; None if there is none."""

    async def list_tasks(
        self, owner: str | None, state: State | None, limit: int, cursor: str | None
    ) -> Page:
        """Newest first; ``owner`` None lists everyone's. The cursor is opaque and stays correct
        while tasks are inserted (no duplicates, no gaps among the older tasks)."""

    async def transition(
        self, task: Task, expected_state: State, expected_version: int, *, emit: bool = True
    ) -> bool:
        """Compare-and-set: replace the stored task if it is still in (expected_state,
        expected_version). ``task.version`` must be expected_version + 1. With ``emit``, append a
        FeedEvent from ``task.history[-1]``. Refunds as the module docstring says. False if the
        race was lost (nothing written)."""

    async def overdue(self, now: float, limit: int) -> list[Task]:
        """Non-terminal tasks with deadline <= now, earliest deadline first, through an index."""

    async def count_by_state(self, owner: str | None) -> dict[State, int]: ...

    async def count_active(self, provider: str, owner: str | None = None) -> int:
        """Tasks of ``provider`` in processing or ai_processing (its jobs in flight), of ``owner``
        only if given, through an index."""

    async def active_by_owner(self, provider: str | None, limit: int) -> dict[str, int]:
        """Jobs in flight per owner (of ``provider``, or of every provider with None): the
        ``limit`` owners with the most, most first (ties by name), through an index. Owners with
        none are absent. For a metric with bounded labels."""

    async def tasks_since(self, since: float, owner: str | None) -> list[Task]:
        """Tasks created at or after ``since`` (for the KPIs)."""

    # webhook deliveries
    async def seen_delivery(self, provider: str, delivery_id: str) -> bool: ...

    async def record_delivery(
        self, provider: str, delivery_id: str, task_id: str, now: float
    ) -> bool:
        """Remember a processed delivery; False if it was already recorded."""

    async def prune_deliveries(self, before_at: float, limit: int) -> int:
        """Forget up to ``limit`` delivery records recorded before ``before_at`` (oldest first),
        through an index; return how many. A forgotten delivery id is no longer de-duplicated."""

    # change feed
    async def feed_after(self, position: str | None, limit: int) -> list[FeedEvent]:
        """Events after ``position`` (None: from the start), oldest first."""

    async def task_feed_after(
        self, task_id: str, position: str | None, limit: int
    ) -> list[FeedEvent]:
        """Up to ``limit`` events of ``task_id`` after ``position`` (None: from the start), oldest
        first, through an index: the cost grows with the task's events, not with the feed.

        ``BadRequest`` (code ``invalid_position``) for a position that is not one of this feed's;
        ``StoreError`` if the events after ``position`` cannot all be given: code
        ``feed_pruned`` when retention already deleted some of them, or a store whose feed cannot
        be replayed by position (MongoDB without its event log). The caller then starts from the
        task's current state."""

    async def prune_feed(self, before_at: float, limit: int) -> int:
        """Delete up to ``limit`` of the oldest feed events, as long as each is older than
        ``before_at``, not after the oldest saved watcher position, and not the newest event;
        return how many were deleted. The cost is bounded by ``limit`` (MongoDB's event log
        deletes whole buckets: up to one bucket past ``limit``, and none that is not full);
        repeated calls delete a contiguous run from the start of the feed."""

    async def feed_head(self) -> str | None:
        """The position of the newest event, or None if there is none."""

    async def save_position(self, watcher: str, position: str) -> None: ...

    async def load_position(self, watcher: str) -> str | None: ...

    async def reconcile(self, now: float) -> int:
        """Repair half-done multi-write operations (MongoDB); return how many were repaired."""


class ChangeFeed(Protocol):
    """A resumable stream of FeedEvents (SQLite: the event table; MongoDB: change streams)."""

    def subscribe(self, after: str | None) -> AsyncIterator[FeedEvent]:
        """Every event after ``after``, then new ones as they are written, forever."""
        ...
