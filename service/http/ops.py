"""The operations routes: live progress (SSE), the seed's KPIs, Prometheus metrics, health and
readiness, the dashboard. What they serve is computed elsewhere: the SSE stream in
service/http/sse.py, the KPIs and metrics in service/ops/.
"""

from __future__ import annotations

import asyncio
import hmac

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.http import dashboard, sse
from service.http.errors import AuthError, MalformedRequest
from service.http.requests import caller
from service.http.state import runtime
from service.http.views import Status
from service.ops.stats import DEFAULT_WINDOW_S, MAX_WINDOW_S, compute_kpis
from service.settings import Settings
from statemachine.clock import iso


def parse_window(raw: str | None) -> int:
    """``window_s`` from the query: whole seconds, 1 to 90 days; 400 otherwise."""
    if raw is None or raw == "":
        return DEFAULT_WINDOW_S
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WINDOW_S:
        raise MalformedRequest(
            f"window_s must be whole seconds from 1 to {MAX_WINDOW_S}", code="bad_window"
        )
    return int(raw)


async def stats(request: Request) -> Response:
    """``GET /v1/stats?window_s=``: the KPIs of the caller's tasks (an admin's: everyone's)."""
    rt = runtime(request)
    user = await caller(request)
    window_s = parse_window(request.query_params.get("window_s"))
    since = rt.now() - window_s
    owner = None if user.is_admin else user.name
    tasks = await rt.store.tasks_since(since, owner)
    body = await asyncio.to_thread(compute_kpis, tasks, window_s)  # CPU work off the event loop
    body["since"] = iso(since)
    body["scope"] = "all" if owner is None else "own"
    return JSONResponse(body)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: open, or behind ``Authorization: Bearer <HOOKLINE_METRICS_TOKEN>``."""
    rt = runtime(request)
    token = rt.settings.metrics_token
    if token is not None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise AuthError("a valid metrics token is required", code="bad_metrics_token")
    return Response(await rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    body: Status = {"status": "ok"}
    return JSONResponse(body)


async def readyz(request: Request) -> Response:
    rt = runtime(request)
    await rt.store.ping()
    await rt.blobs.ping()
    body: Status = {"status": "ready"}
    return JSONResponse(body)


def routes(settings: Settings) -> list[BaseRoute]:
    return [
        Route("/v1/tasks/{task_id}/events", sse.task_events, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *dashboard.routes(settings),
    ]
