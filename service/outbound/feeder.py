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

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

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


@dataclass(frozen=True, slots=True)
class _Owner:
    endpoints: tuple[Endpoint, ...]
    has_secret: bool
    until: float


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class OutboxFeeder:
    """A Watcher handler queuing outbound messages; ``wake`` is called when some were new."""

    def __init__(
        self,
        store: TaskStore,
        outbox: Outbox,
        render: Render,
        *,
        wake: Callable[[], None],
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._render = render
        self._wake = wake
        self._cache_s = cache_s
        self._clock = clock
        self._owners: dict[str, _Owner] = {}
        self.queued = 0

    def forget(self, owner: str) -> None:
        """Drop the owner's cached endpoints (this process just changed them)."""
        self._owners.pop(owner, None)

    async def handle(self, event: FeedEvent) -> None:
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
        new = await self._outbox.enqueue(messages)
        if new:
            self.queued += new
            self._wake()

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
