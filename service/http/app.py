"""The app factory and its lifespan: every resource is created here and closed here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from callbacks.receiver import WebhookReceiver
from callbacks.simulator import SimConfig, create_simulator_app
from service.blobs.base import build_blob_store
from service.blobs.local import LocalBlobStore, file_route
from service.http import docs, openapi, ops, tasks, uploads
from service.http.errors import EXCEPTION_HANDLERS
from service.http.middleware import RequestContext
from service.http.ratelimit import RateLimiter
from service.logging import configure_logging
from service.media.fetch import SafeFetcher
from service.media.watermark import WatermarkConfig
from service.providers import build_providers, default_output_hosts, sim_base_url_for
from service.runtime import Services
from service.settings import Settings
from service.steps.dispatcher import Dispatcher
from service.steps.worker import Worker
from service.styles import Catalogue
from statemachine.errors import StoreError, Unavailable
from statemachine.feed import Watcher
from statemachine.reaper import Reaper
from statemachine.store import ChangeFeed, TaskStore

log = structlog.get_logger()

WEBHOOK_MAX_BYTES = 1_000_000


def build_store(settings: Settings) -> tuple[TaskStore, ChangeFeed]:
    """The store and change feed named by ``HOOKLINE_STORE_URL``."""
    url = settings.store_url
    if url.startswith("sqlite:"):
        from statemachine.sqlite_feed import SqliteFeed
        from statemachine.sqlite_store import SqliteStore

        store = SqliteStore.from_url(url)
        return store, SqliteFeed(store)
    if url.startswith(("mongodb:", "mongodb+srv:")):
        from statemachine.mongo_feed import MongoChangeFeed
        from statemachine.mongo_store import MongoStore

        # Change streams are MongoDB's feed; the extra event collection would cost a round trip
        # per transition (bench/mongo_ops.py: 13 → 8 per successful task).
        mongo = MongoStore.from_url(url, event_log=False, timeout_s=settings.store_timeout_s)
        return mongo, MongoChangeFeed(mongo.db)
    raise ValueError(f"HOOKLINE_STORE_URL must be sqlite:/// or mongodb://, got {url!r}")


async def open_store(
    store: TaskStore, *, first_wait_s: float = 0.5, max_wait_s: float = 30
) -> None:
    """Open the store, retrying with backoff while it is unreachable. Until it opens, requests
    that need it answer 503 and /readyz says not ready; the watchers retry on their own."""
    wait = first_wait_s
    while True:
        try:
            await store.open()
        except (Unavailable, StoreError) as exc:
            log.warning("store_open_failed", error=exc.message, retry_in_s=wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, max_wait_s)
        else:
            log.info("store_opened")
            return


async def _opened_soon(opener: asyncio.Task[None], wait_s: float) -> bool:
    """Wait for the first attempt(s) to open the store; a store that is down does not stop the
    process from starting."""
    done, _ = await asyncio.wait({opener}, timeout=wait_s)
    if opener in done:
        opener.result()  # a bug (not unavailability) surfaces here
        return True
    return False


async def run_watcher(watcher: Watcher, opener: asyncio.Task[None]) -> None:
    """Run ``watcher`` once the store is open."""
    await asyncio.shield(opener)
    await watcher.run()


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.host}:{port}"


def output_fetchers(
    settings: Settings, http: httpx.AsyncClient, names: list[str]
) -> dict[str, SafeFetcher]:
    """One SSRF-safe fetcher per provider, allowed the provider's output hosts."""
    fetchers: dict[str, SafeFetcher] = {}
    for name in names:
        if settings.output_hosts is not None:
            hosts = {h.strip() for h in settings.output_hosts.split(",") if h.strip()}
        else:
            hosts = set(default_output_hosts(name))
        if name == "sim":
            hosts.add(_host_port(settings.public_url))
        fetchers[name] = SafeFetcher(http, allow_hosts=hosts, max_bytes=50_000_000, timeout_s=60)
    return fetchers


def create_app(settings: Settings | None = None) -> Starlette:
    """The hookline ASGI app. Roles (``HOOKLINE_ROLES``) pick the background loops it runs."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    blobs = build_blob_store(settings)
    sim_app = None
    if settings.provider == "sim":
        sim_app = create_simulator_app(SimConfig.from_settings(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        store, feed = build_store(settings)
        opener = asyncio.create_task(open_store(store), name="open-store")
        if not await _opened_soon(opener, settings.store_timeout_s + 1):
            log.error("store_unavailable_at_startup", store=settings.store_url.split("?")[0])
        http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=False)
        sim_base = sim_base_url_for(settings) if sim_app is not None else None
        sim_secret = sim_app.state.sim.config.webhook_secret if sim_app is not None else None
        providers = build_providers(settings, http, sim_base_url=sim_base, sim_secret=sim_secret)
        svc = Services(
            settings=settings,
            store=store,
            feed=feed,
            blobs=blobs,
            http=http,
            providers=providers,
            catalogue=Catalogue.load(settings.styles_path),
            limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
            deadlines=settings.deadlines(),
        )
        input_hosts = {h.strip() for h in settings.input_hosts.split(",") if h.strip()}
        worker = Worker(
            svc,
            owner=f"{socket.gethostname()}:{os.getpid()}",
            input_fetcher=SafeFetcher(
                http, allow_hosts=input_hosts, max_bytes=settings.max_upload_bytes, timeout_s=30
            ),
            output_fetchers=output_fetchers(settings, http, list(providers)),
            watermark=WatermarkConfig.from_settings(settings),
        )
        receiver = WebhookReceiver(store, providers, worker, now=svc.now, spawn=worker.spawn)
        svc.extras.update(worker=worker, receiver=receiver)
        app.state.services_ref = svc  # for tests and the CLI; handlers use request.state
        loops: list[asyncio.Task[None]] = []
        roles = settings.role_set()
        if "dispatcher" in roles:
            dispatcher = Dispatcher(store, worker)
            # Starting fresh at the head: older events are the reaper's to recover, not a
            # history to replay.
            watcher = Watcher("dispatcher", feed, store, dispatcher.handle, start_at_head=True)
            loops.append(asyncio.create_task(run_watcher(watcher, opener), name="dispatcher"))
        if "reaper" in roles:
            reaper = Reaper(store, worker, interval_s=settings.reaper_interval_s, now=svc.now)
            loops.append(asyncio.create_task(reaper.run(), name="reaper"))
        loops.extend(await ops.start(svc))
        log.info(
            "hookline_started",
            roles=sorted(roles),
            store=settings.store_url.split("?")[0],
            provider=settings.provider,
        )
        loops.append(opener)
        try:
            yield {"services": svc}
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await worker.close()
            if sim_app is not None:
                await sim_app.state.sim.close()
            await http.aclose()
            await blobs.close()
            await store.close()

    routes: list[BaseRoute] = [
        *tasks.routes(),
        Route("/v1/uploads", uploads.create_upload, methods=["POST"]),
        Route("/v1/callbacks/{provider}/{task_id}", webhook, methods=["POST"]),
        *ops.routes(settings),
        *openapi.routes(),
        *docs.routes(settings),
    ]
    if isinstance(blobs, LocalBlobStore):
        routes.append(file_route(blobs))
    if sim_app is not None:
        routes.append(Mount("/sim", app=sim_app))
    middleware = [Middleware(RequestContext)]
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
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
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )


async def webhook(request: Request) -> Response:
    """``POST /v1/callbacks/{provider}/{task_id}?token=…``: the provider's webhook."""
    svc: Services = request.state.services
    receiver: WebhookReceiver = svc.extras["receiver"]
    body = await tasks.read_body(request, WEBHOOK_MAX_BYTES)
    receipt = await receiver.handle(
        request.path_params["provider"],
        request.path_params["task_id"],
        request.query_params.get("token", ""),
        request.headers,
        body,
    )
    return JSONResponse(receipt.body, status_code=receipt.status)
