"""Operations: live progress (SSE), metrics, KPIs, dashboard. Wired by service/app.py through
``routes()`` and ``start()``."""

from __future__ import annotations

import asyncio

from starlette.routing import BaseRoute

from service.context import Services
from service.settings import Settings


def routes(settings: Settings) -> list[BaseRoute]:
    """The operations routes."""
    return []


async def start(svc: Services) -> list[asyncio.Task[None]]:
    """Background loops of the operations side (feed watchers); cancelled at shutdown."""
    return []
