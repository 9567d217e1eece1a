"""Operations: live progress (SSE), metrics, KPIs, dashboard. Wired by service/app.py through
``routes()`` and ``start()``.

``start`` runs two live-only feed watchers in the process::

    feed ──▶ Watcher("sse") ──▶ Broadcaster ──▶ GET /v1/tasks/{id}/events (one subscription each)
    feed ──▶ Watcher("metrics") ──▶ Metrics.observe ──▶ GET /metrics

They are separate so a slow store read for the metrics never delays a live event.
"""

from __future__ import annotations

import asyncio

import structlog
from starlette.routing import BaseRoute, Route

from service.http import dashboard, sse
from service.ops import metrics, stats
from service.runtime import Services
from service.settings import Settings
from statemachine.feed import Broadcaster, Handler, Watcher

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
    """Background loops of the operations side (feed watchers); cancelled at shutdown."""
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
    # Live only: starts at the feed's head and saves nothing (SSE clients resume by their own
    # Last-Event-ID; Prometheus counters start at zero with the process).
    watcher = Watcher(name, svc.feed, svc.store, handler, start_at_head=True, persist=False)
    try:
        await watcher.run()
    finally:
        if broadcaster is not None:
            broadcaster.close()  # open streams end; their clients resume by Last-Event-ID
