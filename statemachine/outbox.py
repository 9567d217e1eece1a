"""Outbound webhooks as data: endpoints, the durable outbox of messages, and their attempts.

hookline calls its client back when a task changes (``task.completed`` …). The change feed feeds
an outbox (service/outbound/): one ``Message`` per (destination, task, version), its id derived
from those three, so a feed event handled twice — after a restart, or by two replicas — queues one
message. A deliverer claims due messages with a lease (owner, expiry), sends each, and settles it
with one ``DeliveryAttempt``: delivered, retried later, or failed. A deliverer that dies loses its
lease and another one sends the message again with the same id: at least once, and the id is the
client's de-duplication key.

This module is pure: the records, the event names, the message id and the retry schedule. The
``Outbox`` port is kept by ``sqlite_outbox.SqliteOutbox`` and ``mongo_outbox.MongoOutbox``; one
contract suite (tests/contract/test_outbox_contract.py) runs against both.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from statemachine.states import TERMINAL, State

MessageState = Literal["pending", "delivered", "failed"]

ALL_EVENTS: Final = "task.*"
EVENT_TYPES: Final = frozenset(f"task.{s.value}" for s in State)
DEFAULT_EVENTS: Final = tuple(sorted(f"task.{s.value}" for s in TERMINAL))
# A task's own destination (``webhook`` on POST /v1/tasks) hears how its task ended.
TASK_DESTINATION_EVENTS: Final = frozenset(DEFAULT_EVENTS)
TASK_DESTINATION: Final = "task"  # the endpoint id of a task's own destination in messages


def event_type(dest: State) -> str:
    """The outbound event name of a change into ``dest``: ``task.completed`` …"""
    return f"task.{dest.value}"


def checked_events(events: Iterable[str]) -> tuple[str, ...]:
    """The subscribed event names, sorted and without repeats; ``ValueError`` naming the first
    unknown one. ``task.*`` stands for every change and makes the others redundant."""
    chosen = set(events)
    unknown = sorted(chosen - EVENT_TYPES - {ALL_EVENTS})
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r}")
    if not chosen:
        raise ValueError("at least one event")
    return (ALL_EVENTS,) if ALL_EVENTS in chosen else tuple(sorted(chosen))


def message_id(destination: str, task_id: str, version: int) -> str:
    """The ``webhook-id`` of the message for one task version to one destination: the same every
    time it is derived, so re-handling a feed event never queues a second message."""
    digest = hashlib.sha256(f"{destination}\x00{task_id}\x00{version}".encode()).hexdigest()
    return "msg_" + digest[:32]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A client's registered destination. During a secret rotation ``previous_secret`` signs too,
    until ``previous_until``. ``disabled_at`` is set when the destination answered 410 Gone."""

    id: str
    owner: str
    url: str
    events: tuple[str, ...]
    secret: str
    created_at: float
    previous_secret: str | None = None
    previous_until: float | None = None
    disabled_at: float | None = None
    disabled_reason: str | None = None

    def wants(self, event: str) -> bool:
        return self.disabled_at is None and (ALL_EVENTS in self.events or event in self.events)

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        return _signing(self.secret, self.previous_secret, self.previous_until, now)


@dataclass(frozen=True, slots=True)
class OwnerSecret:
    """The secret that signs messages to tasks' own destinations (one per user)."""

    owner: str
    secret: str
    created_at: float
    previous_secret: str | None = None
    previous_until: float | None = None

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        return _signing(self.secret, self.previous_secret, self.previous_until, now)


def _signing(
    secret: str, previous: str | None, previous_until: float | None, now: float
) -> tuple[str, ...]:
    if previous is not None and previous_until is not None and now < previous_until:
        return (secret, previous)
    return (secret,)


@dataclass(frozen=True, slots=True)
class Message:
    """One event for one destination. ``body`` is the JSON sent, fixed when it was queued.
    ``endpoint_id`` is ``TASK_DESTINATION`` for a task's own destination. ``created_at`` is the
    event's time; ``queued_at`` starts the retry horizon (a replay moves it)."""

    id: str
    owner: str
    task_id: str
    event: str
    endpoint_id: str
    url: str
    body: bytes
    created_at: float
    queued_at: float
    state: MessageState = "pending"
    attempts: int = 0
    next_at: float | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    settled_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try at sending a message: when, what came back (``status_code`` None when nothing
    did: ``error`` says why), how long it took, and when the next try is due (None: none)."""

    message_id: str
    number: int
    at: float
    latency_ms: float
    status_code: int | None = None
    error: str | None = None
    next_retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """The retry schedule: the gap before try n+1 is ``base_s * 2**(n-1)`` times a jitter factor
    in [0.75, 1), so each gap is longer than the one before it; no try is scheduled past
    ``horizon_s`` after the message was queued (the message fails instead)."""

    base_s: float
    horizon_s: float

    def next_at(
        self, attempts: int, queued_at: float, now: float, rng: random.Random | None = None
    ) -> float | None:
        """When to try again after ``attempts`` failed tries, or None once past the horizon."""
        jitter = 0.75 + 0.25 * (rng or random).random()
        gap = self.base_s * 2 ** min(attempts - 1, 40) * jitter
        due = now + gap
        return due if due <= queued_at + self.horizon_s else None


@dataclass(frozen=True, slots=True)
class Depth:
    """The outbox's backlog: messages not yet settled, and the oldest one's queue time."""

    pending: int
    oldest_created_at: float | None


class Outbox(Protocol):
    """Persistence of endpoints, owners' secrets, messages and attempts."""

    async def open(self) -> None:
        """Create the schema / indexes if missing. Idempotent."""

    # endpoints
    async def add_endpoint(self, endpoint: Endpoint, *, max_per_owner: int) -> None:
        """Store a new endpoint; ``Conflict`` (code ``too_many_webhooks``) if the owner already
        has ``max_per_owner``."""

    async def endpoints(self, owner: str) -> list[Endpoint]:
        """The owner's endpoints, oldest first."""

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None: ...

    async def delete_endpoint(self, owner: str, endpoint_id: str) -> bool:
        """Forget the owner's endpoint; False if there is no such endpoint of that owner. Its
        unsent messages fail when they come due."""

    async def rotate_endpoint(
        self, owner: str, endpoint_id: str, secret: str, previous_until: float
    ) -> Endpoint:
        """Make ``secret`` the endpoint's secret; the current one keeps signing until
        ``previous_until``. ``NotFound`` if the owner has no such endpoint."""

    async def disable_endpoint(self, endpoint_id: str, reason: str, now: float) -> None: ...

    # owners' secrets (tasks' own destinations)
    async def owner_secret(self, owner: str) -> OwnerSecret | None: ...

    async def set_owner_secret(self, owner: str, secret: str, now: float, overlap_s: float) -> None:
        """Make ``secret`` the owner's; a secret it replaces keeps signing for ``overlap_s``."""

    # messages
    async def enqueue(self, messages: list[Message], *, max_pending: int) -> int:
        """Store the messages whose ids are new, as long as their owner has fewer than
        ``max_pending`` unsettled messages (the rest are dropped: a user cannot grow the outbox
        without bound); return how many were stored."""

    async def claim(
        self, now: float, worker: str, lease_s: float, limit: int, *, per_destination: int
    ) -> list[Message]:
        """Up to ``limit`` pending messages due by ``now`` (``next_at``) and not leased by a
        live lease, oldest due first, through an index; each is leased to ``worker`` until
        ``now + lease_s``. A message is claimed by one worker at a time, and no destination URL
        holds more than ``per_destination`` live leases: a slow or dead receiver ties up that
        many sends, not every one."""

    async def settle(
        self,
        message: Message,
        worker: str,
        attempt: DeliveryAttempt,
        state: MessageState,
        *,
        keep_attempts: int,
    ) -> bool:
        """Record ``attempt`` and move the message to ``state`` (pending: due again at
        ``attempt.next_retry_at``), releasing the lease — only if ``worker`` still holds it;
        False (nothing written) if not. The message keeps its newest ``keep_attempts``."""

    async def get_message(self, message_id: str) -> Message | None: ...

    async def task_messages(self, task_id: str, limit: int) -> list[Message]:
        """The task's messages, oldest first, through an index."""

    async def attempts(self, message_id: str) -> list[DeliveryAttempt]:
        """The message's attempts, oldest first."""

    async def replay(self, message_id: str, now: float) -> Message | None:
        """Queue the message again, due now, with the same id and body (a replay restarts its
        retry horizon from ``now``); None if there is no such message. ``Conflict`` (code
        ``delivery_in_flight``) while a live lease holds it: it is being sent."""

    async def depth(self) -> Depth: ...

    async def prune(self, before_at: float, limit: int) -> int:
        """Forget up to ``limit`` settled messages (and their attempts) settled before
        ``before_at``, oldest first; return how many."""
