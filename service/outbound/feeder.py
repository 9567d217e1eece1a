"""From the change feed to the outbox: which destinations hear of a change, and what they get.

A feed event becomes messages when its owner has an endpoint that wants its event type (and was
registered by then), or when it ends the task and the task names its own destination. The body is
``{"type", "created_at", "data"}`` with ``data`` the task as ``GET /v1/tasks/{id}`` shows it,
rendered once when the message is queued (the HTTP layer hands the renderer over: how a task looks
is its business). For a change that is not the last, ``data`` may already show a later state than
``type`` names; ``type`` and ``created_at`` are the event's.

Endpoints and owners' secrets are read through a small per-owner cache (``cache_s``): a change of
them made by another replica is seen within that time. A feed event handled twice queues nothing
twice (message ids are derived), so the watcher's at-least-once delivery is enough.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
import structlog

from statemachine.clock import iso
from statemachine.errors import StoreError, Unavailable
from statemachine.outbox import (
    TASK_DESTINATION,
    TASK_DESTINATION_EVENTS,
    Endpoint,
    Message,
    Outbox,
    event_type,
    message_id,
)
from statemachine.store import FeedEvent, TaskStore
from statemachine.task import Task

Render = Callable[[Task], Awaitable[dict[str, Any]]]

MAX_CACHED_OWNERS: Final = 10_000
RETRY_FIRST_S: Final = 0.1
RETRY_MAX_S: Final = 10.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Owner:
    endpoints: tuple[Endpoint, ...]
    has_secret: bool
    until: float


class OutboxFeeder:
    """A Watcher handler queuing outbound messages; ``wake`` is called when some were new."""

    def __init__(
        self,
        store: TaskStore,
        outbox: Outbox,
        render: Render,
        *,
        wake: Callable[[], None],
        max_pending: int = 10_000,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._render = render
        self._wake = wake
        self._cache_s = cache_s
        self._clock = clock
        self._owners: dict[str, _Owner] = {}
        self._max_pending = max_pending
        self.on_dropped = on_dropped
        self.queued = 0
        self.dropped = 0

    def forget(self, owner: str) -> None:
        """Drop the owner's cached endpoints (this process just changed them)."""
        self._owners.pop(owner, None)

    async def handle(self, event: FeedEvent) -> None:
        """Queue the event's messages. A store that fails is tried again (with a growing wait)
        until it answers: the watcher moves past an event only once its messages are stored, so
        an outage delays messages and loses none."""
        wait = RETRY_FIRST_S
        while True:
            try:
                await self._handle(event)
                return
            except (StoreError, Unavailable) as exc:
                log.warning("outbox.queue_failed", task=event.task_id, error=exc.message)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_S)

    async def _handle(self, event: FeedEvent) -> None:
        kind = event_type(event.dest)
        owner = await self._owner(event.owner)
        endpoints = [e for e in owner.endpoints if e.wants(kind) and e.created_at <= event.at]
        own = owner.has_secret and kind in TASK_DESTINATION_EVENTS
        if not endpoints and not own:
            return
        task = await self._store.get_task(event.task_id)
        if task is None:
            return
        targets = [(e.id, e.url) for e in endpoints]
        if own and task.webhook is not None:
            targets.append((TASK_DESTINATION, task.webhook))
        if not targets:
            return
        body = orjson.dumps(
            {"type": kind, "created_at": iso(event.at), "data": await self._render(task)}
        )
        messages = [
            Message(
                id=message_id(destination, task.id, event.version),
                owner=task.owner,
                task_id=task.id,
                event=kind,
                endpoint_id=destination,
                url=url,
                body=body,
                created_at=event.at,
                queued_at=event.at,
                next_at=event.at,
            )
            for destination, url in targets
        ]
        new = await self._outbox.enqueue(messages, max_pending=self._max_pending)
        if new < len(messages):
            # new is also short of len(messages) for a replayed event: only a full owner drops
            dropped = await self._over_cap(messages)
            if dropped:
                self.dropped += dropped
                log.warning("outbox.dropped", owner=task.owner, task=task.id, messages=dropped)
                if self.on_dropped is not None:
                    self.on_dropped(dropped)
        if new:
            self.queued += new
            self._wake()

    async def _over_cap(self, messages: list[Message]) -> int:
        """How many of ``messages`` are not stored (neither new nor queued before)."""
        missing = 0
        for m in messages:
            if await self._outbox.get_message(m.id) is None:
                missing += 1
        return missing

    async def _owner(self, name: str) -> _Owner:
        now = self._clock()
        found = self._owners.get(name)
        if found is not None and found.until > now:
            return found
        endpoints = tuple(await self._outbox.endpoints(name))
        has_secret = await self._outbox.owner_secret(name) is not None
        if len(self._owners) >= MAX_CACHED_OWNERS:
            self._owners.clear()
        found = _Owner(endpoints, has_secret, now + self._cache_s)
        self._owners[name] = found
        return found
