"""The Starlette app factory: the routes, the middleware, the one error mapping, and a lifespan
that starts and closes the process's runtime (service/runtime.py).

The provider simulator is mounted under ``/sim`` only when ``settings.simulator`` is on (``serve
--demo`` or ``HOOKLINE_SIMULATOR=true``); without it there is no ``/sim`` route and no "sim"
provider, and a default provider of "sim" stops the start with ``SimulatorOff``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount

from callbacks.simulator import create_simulator_app
from service.blobs.local import LocalBlobStore
from service.http import docs, openapi, ops, outbound, tasks, timeline, uploads, webhooks
from service.http.errors import EXCEPTION_HANDLERS
from service.http.files import file_route
from service.http.middleware import RequestContext
from service.http.ratelimit import RateLimiter
from service.http.state import Web
from service.http.watch import WatchCors
from service.logging import configure_logging
from service.media.fetch import SafeFetcher
from service.providers import (
    fetch_input_through,
    require_simulator,
    sim_config,
    sim_input_fetcher,
    with_sim_token,
)
from service.runtime import Runtime, build_runtime
from service.settings import Settings
from statemachine.task import Task


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> Starlette:
    """The hookline ASGI app over ``runtime`` (built from ``settings`` when not given). Roles
    (``HOOKLINE_ROLES``) pick the background loops the runtime runs. ``SimulatorOff`` when the
    default provider is "sim" but the simulator is off."""
    settings = settings or (runtime.settings if runtime is not None else Settings())
    configure_logging(settings.log_level, settings.log_format)
    sim_app: Starlette | None = None
    sim_fetcher: SafeFetcher | None = None
    if runtime is None:
        require_simulator(settings)
        if settings.simulator:
            # one token for this start, read by the simulator and the "sim" provider alike
            settings = with_sim_token(settings)
            sim_fetcher = sim_input_fetcher(settings)
            sim_app = create_simulator_app(
                sim_config(settings), fetch_input=fetch_input_through(sim_fetcher)
            )
        runtime = build_runtime(settings, simulator=sim_app.state.sim if sim_app else None)
    web = Web(runtime, RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst))
    rt = runtime

    async def render(task: Task) -> dict[str, Any]:
        # a message may be retried until the horizon: its output URLs must outlast it
        ttl_s = max(settings.file_url_ttl_s, int(settings.webhook_retry_horizon_s) + 3600)
        return dict(await tasks.linked_task_json(rt, task, url_ttl_s=ttl_s))

    runtime.render_task = render  # outbound webhooks carry the task as GET /v1/tasks/{id} shows it

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await runtime.start()
        try:
            yield {"web": web}
        finally:
            await runtime.close()  # closes the simulator too
            if sim_fetcher is not None:
                await sim_fetcher.aclose()

    routes: list[BaseRoute] = [
        *tasks.routes(),
        *timeline.routes(),
        *uploads.routes(),
        *webhooks.routes(),
        *outbound.routes(),
        *ops.routes(settings),
        *openapi.routes(),
        *docs.routes(settings),
    ]
    if isinstance(runtime.blobs, LocalBlobStore):
        routes.append(file_route(runtime.blobs))
    if sim_app is not None:
        routes.append(Mount("/sim", app=sim_app))
    # Watch links' CORS (``*``, no credentials) sits outside the configured CORS, so the two
    # never both answer one request (service/http/watch.py).
    middleware = [Middleware(RequestContext), Middleware(WatchCors)]
    origins = settings.cors_origin_list()
    if origins:  # CORS is off unless origins are configured
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.runtime = runtime  # for tests, benches and the CLI; handlers use request.state
    app.state.web = web
    return app
