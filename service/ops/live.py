"""The live watchers every process runs: change feed → SSE fan-out, change feed → metrics.

    feed ──▶ Watcher("sse") ──▶ Broadcaster ──▶ GET /v1/tasks/{id}/events (one subscription each)
    feed ──▶ Watcher("metrics") ──▶ Metrics.observe ──▶ GET /metrics

They are separate so a slow store read for the metrics never delays a live event. Both are live
only: they start at the feed's head and save nothing (SSE clients resume by their own
Last-Event-ID; Prometheus counters start at zero with the process).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from service.ops.metrics import Metrics
from statemachine.feed import Broadcaster, Handler, Watcher
from statemachine.store import ChangeFeed, TaskStore


def live_watchers(
    feed: ChangeFeed, store: TaskStore, broadcaster: Broadcaster, metrics: Metrics
) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """The two watchers, named, to run as background tasks until cancelled."""
    return [
        ("ops-sse", _watch(feed, store, "sse", broadcaster.publish, broadcaster)),
        ("ops-metrics", _watch(feed, store, "metrics", metrics.observe)),
    ]


async def _watch(
    feed: ChangeFeed,
    store: TaskStore,
    name: str,
    handler: Handler,
    broadcaster: Broadcaster | None = None,
) -> None:
    watcher = Watcher(name, feed, store, handler, start_at_head=True, persist=False)
    try:
        await watcher.run()
    finally:
        if broadcaster is not None:
            broadcaster.close()  # open streams end; their clients resume by Last-Event-ID
