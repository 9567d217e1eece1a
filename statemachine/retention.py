"""Retention: the change feed, the webhook delivery records and the settled outbound messages
are pruned, a bounded batch a pass.

One pass deletes at most ``batch`` feed events older than ``feed_retention_s``, at most
``batch`` delivery records older than ``deliveries_retention_s`` and, with an outbox, at most
``batch`` outbound messages settled before ``outbox_retention_s`` ago (a pending one is never
pruned), oldest first, through indexes,
so its cost is bounded whatever the backlog. A pass that found a full batch says so (``more``),
and the loop runs the next one after a short pause: a backlog drains steadily without holding the
store's writer for long. The store keeps what must stay (``TaskStore.prune_feed``): the newest
event, and every event after the oldest position a persistent watcher saved. Live-only watchers
(SSE fan-out, metrics) save nothing and start at the head, so they pin nothing; an SSE client
resuming from a pruned position gets the task's current state.

Every process may run it: a pass that races another deletes what is left, never more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from statemachine import clock
from statemachine.outbox import Outbox
from statemachine.store import TaskStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pass deleted, and whether a full batch suggests more is due."""

    feed: int
    deliveries: int
    more: bool
    messages: int = 0


class Retention:
    """One bounded prune pass per ``run_pass(now)``; ``run()`` repeats it every ``interval_s``."""

    def __init__(
        self,
        store: TaskStore,
        *,
        feed_retention_s: float,
        deliveries_retention_s: float,
        batch: int,
        interval_s: float = 60.0,
        backlog_pause_s: float = 0.1,
        now: Callable[[], float] = clock.now,
        outbox: Outbox | None = None,
        outbox_retention_s: float = 7 * 86_400.0,
    ) -> None:
        if feed_retention_s <= 0 or deliveries_retention_s <= 0 or batch < 1:
            raise ValueError("retention periods must be positive and the batch at least 1")
        self.store = store
        self.feed_retention_s = feed_retention_s
        self.deliveries_retention_s = deliveries_retention_s
        self.batch = batch
        self.interval_s = interval_s
        self.backlog_pause_s = backlog_pause_s
        self.now = now
        self.outbox = outbox
        self.outbox_retention_s = outbox_retention_s

    async def run_pass(self, now: float) -> Pruned:
        """Prune one batch of each; the deletions are logged when there were any."""
        feed = await self.store.prune_feed(now - self.feed_retention_s, self.batch)
        deliveries = await self.store.prune_deliveries(
            now - self.deliveries_retention_s, self.batch
        )
        messages = 0
        if self.outbox is not None:
            messages = await self.outbox.prune(now - self.outbox_retention_s, self.batch)
        # ">=": MongoDB deletes whole buckets of events, so a full batch may go a little past.
        more = feed >= self.batch or deliveries >= self.batch or messages >= self.batch
        pruned = Pruned(feed, deliveries, more=more, messages=messages)
        if feed or deliveries or messages:
            log.info("retention_pruned", feed_events=feed, deliveries=deliveries, messages=messages)
        return pruned

    async def run(self) -> None:
        """Passes forever, ``interval_s`` apart (``backlog_pause_s`` while full batches are
        found). A failing pass is logged and retried at the next interval."""
        while True:
            try:
                more = (await self.run_pass(self.now())).more
            except Exception as exc:
                log.exception("retention_pass_failed", error=repr(exc))
                more = False
            await asyncio.sleep(self.backlog_pause_s if more else self.interval_s)
