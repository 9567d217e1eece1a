"""Operations: live progress (SSE), metrics, KPIs, dashboard. Wired by service/app.py through
``routes()`` and ``start()``.

``start`` runs two live-only feed watchers in the process::

    feed ──▶ Watcher("sse") ──▶ Broadcaster ──▶ GET /v1/tasks/{id}/events (one subscription each)
    feed ──▶ Watcher("metrics") ──▶ Metrics.observe ──▶ GET /metrics

They are separate so a slow store read for the metrics never delays a live event.
"""

from __future__ import annotations

import asyncio
from typing import cast

import structlog
from starlette.routing import BaseRoute, Route

from service import dashboard, metrics, sse, stats
from service.context import Services
from service.settings import Settings
from statemachine.errors import StoreError
from statemachine.feed import Broadcaster, Handler, Watcher
from statemachine.store import TaskStore

log = structlog.get_logger()


def routes(settings: Settings) -> list[BaseRoute]:
    """The operations routes."""
    return [
        Route("/v1/tasks/{task_id}/events", sse.task_events, methods=["GET"]),
        Route("/v1/stats", stats.stats, methods=["GET"]),
        Route("/metrics", metrics.metrics, methods=["GET"]),
        *dashboard.routes(settings),
    ]


async def start(svc: Services) -> list[asyncio.Task[None]]:
    """Background loops of the operations side (feed watchers); cancelled at shutdown.

    Idempotent: a second call in the same app starts nothing."""
    if "broadcaster" in svc.extras:
        return []
    broadcaster = Broadcaster()
    registry = metrics.Metrics(svc)
    svc.extras.update(broadcaster=broadcaster, metrics=registry)
    receiver = svc.extras.get("receiver")
    if receiver is not None and receiver.on_rejected is None:
        receiver.on_rejected = registry.on_webhook_rejected
    return [
        asyncio.create_task(_watch(svc, "sse", broadcaster.publish, broadcaster), name="ops-sse"),
        asyncio.create_task(_watch(svc, "metrics", registry.observe), name="ops-metrics"),
    ]


async def _watch(
    svc: Services, name: str, handler: Handler, broadcaster: Broadcaster | None = None
) -> None:
    store = cast(TaskStore, _LiveOnly(svc.store))  # Watcher uses only the two position methods
    try:
        await Watcher(name, svc.feed, store, handler).run()
    finally:
        if broadcaster is not None:
            broadcaster.close()  # open streams end; their clients resume by Last-Event-ID


class _LiveOnly:
    """Positions for a watcher that serves only what happens while this process runs: it starts at
    the feed's head and saves nothing (SSE clients resume by their own Last-Event-ID; Prometheus
    counters start at zero with the process)."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store

    async def load_position(self, watcher: str) -> str | None:
        delay_s = 0.1
        while True:
            try:
                return await self._store.feed_head()
            except StoreError as exc:  # a store without an event log: its feed starts at "now"
                log.info("ops.no_feed_head", watcher=watcher, error=exc.message)
                return None
            except Exception as exc:  # not ready yet: starting from the beginning would replay all
                log.warning("ops.feed_head_failed", watcher=watcher, error=repr(exc))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def save_position(self, watcher: str, position: str) -> None:
        return None
