"""The runtime of one hookline process: every resource it holds and every loop it runs, built in
one place apart from HTTP, so the app, the CLI, benches and tests build the same thing.

    build_runtime(settings)   the objects, typed (no I/O yet)
    await runtime.start()     open the store (retrying in the background while it is down) and
                              start the loops the process's roles ask for
    await runtime.close()     stop the loops, let running steps finish, close what was opened

Roles (``HOOKLINE_ROLES``): ``dispatcher`` runs the change-feed watcher that starts steps,
``reaper`` the deadline-index backstop and the retention pass (old feed events and delivery
records pruned in bounded batches); either builds the step runner. Without both a process runs
no step at all (``--roles api``). Every process runs the live watchers (SSE fan-out, metrics).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import structlog

from callbacks.provider import Provider
from callbacks.receiver import WebhookReceiver
from callbacks.simulator import Simulator
from callbacks.transport import new_client
from service.background import Background
from service.blobs.base import BlobStore
from service.blobs.local import LocalBlobStore, load_or_create_secret
from service.blobs.s3 import S3BlobStore, split_endpoint
from service.media.budget import MemoryBudget
from service.media.fetch import Resolver, SafeFetcher, isolated_resolver, system_resolver
from service.media.watermark import WatermarkConfig
from service.ops.live import live_watchers
from service.ops.metrics import Metrics
from service.outbound.deliverer import Deliverer, Note
from service.outbound.feeder import OutboxFeeder, Render
from service.providers import (
    PROJECT_WEBHOOKS,
    build_pacing,
    build_providers,
    default_output_hosts,
    sim_base_url_for,
)
from service.settings import Settings
from service.steps.dispatcher import Backstop, Dispatcher
from service.steps.outcomes import OutcomeApplier
from service.steps.pacing import Pacing
from service.steps.processing import ProcessingStep
from service.steps.runner import StepRunner
from service.steps.watermarking import WatermarkingStep
from service.styles import Catalogue
from service.timings import Timings
from statemachine import clock
from statemachine.errors import StoreError, Unavailable
from statemachine.feed import Broadcaster, Watcher
from statemachine.mongo_feed import MongoChangeFeed
from statemachine.mongo_outbox import MongoOutbox
from statemachine.mongo_store import MongoStore
from statemachine.mongo_timeline import MongoTimeline
from statemachine.outbox import Backoff, Outbox
from statemachine.reaper import Reaper
from statemachine.retention import Retention
from statemachine.sqlite_feed import SqliteFeed
from statemachine.sqlite_outbox import SqliteOutbox
from statemachine.sqlite_store import SqliteStore
from statemachine.sqlite_timeline import SqliteTimeline
from statemachine.states import State
from statemachine.store import ChangeFeed, TaskStore
from statemachine.timeline import Timeline

log = structlog.get_logger()

OUTPUT_MAX_BYTES = 50_000_000
SPARE_CONNECTIONS: Final = 32  # polls, cancels, secret fetches beside the steps and deliveries
OUTPUT_FETCH_TIMEOUT_S = 60.0
INPUT_FETCH_TIMEOUT_S = 30.0
# lookups of names users chose (input URLs, webhook destinations) on their own threads at once:
# a hostile name whose DNS never answers holds one of these, nothing else of the process
USER_LOOKUPS_AT_ONCE = 16
PROVIDER_TIMEOUT_S = 30.0
# feed events the outbox feeder handles at once: each needs a task read and a write, which the
# store batches when they come together (one at a time it fell behind completions)
FEEDER_CONCURRENCY = 32


def outbound_limits(settings: Settings) -> httpx.Limits:
    """The shared outbound client's pool: a connection for every step and every webhook
    delivery that may be in flight at once, and some to spare; a request waiting for a free
    connection spends its connect timeout waiting (a submit would fail as unreachable)."""
    total = settings.step_concurrency + settings.webhook_concurrency + SPARE_CONNECTIONS
    return httpx.Limits(max_connections=total, max_keepalive_connections=total)


@dataclass
class Runtime:
    """Everything one process holds. ``runner`` is None in a process that runs no steps."""

    settings: Settings
    store: TaskStore
    feed: ChangeFeed
    blobs: BlobStore
    http: httpx.AsyncClient
    providers: dict[str, Provider]
    catalogue: Catalogue
    timings: Timings
    background: Background
    outcomes: OutcomeApplier
    receiver: WebhookReceiver
    broadcaster: Broadcaster
    metrics: Metrics
    input_fetcher: SafeFetcher
    output_fetchers: dict[str, SafeFetcher]
    runner: StepRunner | None
    media_budget: MemoryBudget
    pacing: Pacing
    # outbound webhooks: the outbox (None on a store with no outbox adapter), its deliverer (in a
    # dispatcher process), and how a task looks in a message — the HTTP layer's view, handed over
    # by create_app; without it this process queues no messages
    outbox: Outbox | None = None
    deliverer: Deliverer | None = None
    feeder: OutboxFeeder | None = None
    render_task: Render | None = None
    # each task's notes (submits, webhooks, polls, deliveries) beside the store; None on a store
    # with no timeline adapter
    timeline: Timeline | None = None
    # how names users chose (input URLs, webhook destinations) are resolved: on threads of their
    # own, a bounded number at once (service/media/fetch.py isolated_resolver)
    user_lookups: Resolver = system_resolver
    simulator: Simulator | None = None
    now: Callable[[], float] = clock.now
    _loops: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    async def start(self) -> None:
        """Open the store (a store that is down does not stop the process: readiness is false
        and requests answer 503 until a background retry opens it), then start the loops."""
        settings = self.settings
        companions: list[Opens] = [self.outbox] if self.outbox is not None else []
        if self.timeline is not None:
            companions.append(self.timeline)
        opener = asyncio.create_task(open_store(self.store, *companions), name="open-store")
        if not await _opened_soon(opener, settings.store_timeout_s + 1):
            log.error("store_unavailable_at_startup", store=settings.store_url.split("?")[0])
        roles = settings.role_set()
        loops: list[tuple[str, Coroutine[Any, Any, None]]] = []
        if self.runner is not None and "dispatcher" in roles:
            dispatcher = Dispatcher(self.store, self.runner)
            # Starting fresh at the head: older events are the reaper's to recover, not a
            # history to replay.
            watcher = Watcher(
                "dispatcher", self.feed, self.store, dispatcher.handle, start_at_head=True
            )
            loops.append(("dispatcher", _after(opener, watcher.run())))
        if self.deliverer is not None and self.render_task is not None and self.outbox is not None:
            feeder = self.feeder = OutboxFeeder(
                self.store,
                self.outbox,
                self.render_task,
                wake=self.deliverer.wake,
                max_pending=settings.webhook_max_pending,
                on_dropped=self.metrics.on_webhooks_dropped,
            )
            self.deliverer.on_disabled = feeder.forget
            # Messages are for changes from now on: an endpoint hears nothing from before it was
            # registered, and a fresh outbox does not replay the feed's history.
            watcher = Watcher(
                "outbox",
                self.feed,
                self.store,
                feeder.handle,
                start_at_head=True,
                concurrency=FEEDER_CONCURRENCY,
            )
            loops.append(("outbox", _after(opener, watcher.run())))
            loops.append(("deliverer", _after(opener, self.deliverer.run())))
        if self.runner is not None and "reaper" in roles:
            backstop = Backstop(self.runner, self.outcomes)
            reaper = Reaper(
                self.store, backstop, interval_s=settings.reaper_interval_s, now=self.now
            )
            loops.append(("reaper", reaper.run()))
            retention = Retention(
                self.store,
                feed_retention_s=settings.feed_retention_s,
                deliveries_retention_s=settings.deliveries_retention_s,
                batch=settings.prune_batch,
                now=self.now,
                outbox=self.outbox,
                outbox_retention_s=settings.webhook_retention_s,
            )
            loops.append(("retention", _after(opener, retention.run())))
        for name, watch in live_watchers(self.feed, self.store, self.broadcaster, self.metrics):
            loops.append((name, watch))
        self._loops = [asyncio.create_task(coro, name=name) for name, coro in loops]
        self._loops.append(opener)
        log.info(
            "hookline_started",
            roles=sorted(roles),
            store=settings.store_url.split("?")[0],
            provider=settings.provider,
        )

    async def close(self) -> None:
        """Stop the loops, give running steps their grace period, close every resource."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self.runner is not None:
            await self.runner.close()
        await self.background.close(grace_s=5.0)
        if self.simulator is not None:
            await self.simulator.close()
        await self.http.aclose()
        await self.blobs.close()
        await self.store.close()

    async def drain(self) -> None:
        """Wait until no step and no background work is running (tests)."""
        while (self.runner is not None and self.runner.busy) or self.background.busy:
            if self.runner is not None:
                await self.runner.drain()
            await self.background.drain()


def build_runtime(
    settings: Settings,
    *,
    simulator: Simulator | None = None,
    store: TaskStore | None = None,
    feed: ChangeFeed | None = None,
    blobs: BlobStore | None = None,
    http: httpx.AsyncClient | None = None,
    providers: dict[str, Provider] | None = None,
    input_fetcher: SafeFetcher | None = None,
    output_fetchers: dict[str, SafeFetcher] | None = None,
    media_budget: MemoryBudget | None = None,
    now: Callable[[], float] = clock.now,
    rng: random.Random | None = None,
    owner: str | None = None,
) -> Runtime:
    """The runtime ``settings`` describe; any part may be given instead (tests and benches
    replace the store, the providers, the fetchers or the clock)."""
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    rng = rng or random.Random()
    if store is None:
        store, feed = build_store(settings)
    elif feed is None:
        raise ValueError("a store given without its feed")
    assert feed is not None
    blobs = blobs if blobs is not None else build_blob_store(settings)
    http = http or new_client(
        timeout=httpx.Timeout(PROVIDER_TIMEOUT_S), limits=outbound_limits(settings)
    )
    if providers is None:
        sim_base = sim_base_url_for(settings) if simulator is not None else None
        sim_secret = simulator.config.webhook_secret if simulator is not None else None
        providers = build_providers(settings, http, sim_base_url=sim_base, sim_secret=sim_secret)
    catalogue = Catalogue.load(settings.styles_path)
    timings = Timings(settings, {name: p.arrival for name, p in providers.items()})
    pacing = build_pacing(settings, providers, now=now)
    background = Background("background")
    timeline = build_timeline(store, settings)
    outcomes = OutcomeApplier(
        store,
        providers,
        catalogue,
        timings,
        blobs,
        background,
        default_model=settings.default_model,
        now=now,
        rng=rng,
        pacing=pacing,
        timeline=timeline,
    )
    broadcaster = Broadcaster()
    receiver = WebhookReceiver(
        store,
        providers,
        outcomes,
        now=now,
        spawn=background.spawn,
        pace=lambda name: pacing.take(name, "poll"),
        project_level=PROJECT_WEBHOOKS,
        timeline=timeline,
    )
    metrics = Metrics(
        store,
        providers,
        reconciliations=lambda: outcomes.reconciliations,
        sse_clients=lambda: broadcaster.count,
    )
    receiver.on_rejected = metrics.on_webhook_rejected
    # one budget of bytes for every image fetch and decode of the process
    media_budget = media_budget or MemoryBudget(settings.media_memory_budget_bytes)
    user_lookups = isolated_resolver(USER_LOOKUPS_AT_ONCE)
    if input_fetcher is None:
        input_fetcher = SafeFetcher(
            http,
            allow_hosts=settings.input_host_set(),
            max_bytes=settings.max_upload_bytes,
            timeout_s=INPUT_FETCH_TIMEOUT_S,
            resolver=user_lookups,
            budget=media_budget,
        )
    if output_fetchers is None:
        output_fetchers = build_output_fetchers(
            settings, http, list(providers), budget=media_budget
        )
    runner = None
    if settings.role_set() & {"dispatcher", "reaper"}:
        runner = _build_runner(
            settings,
            store=store,
            blobs=blobs,
            providers=providers,
            catalogue=catalogue,
            timings=timings,
            outcomes=outcomes,
            pacing=pacing,
            input_fetcher=input_fetcher,
            output_fetchers=output_fetchers,
            media_budget=media_budget,
            now=now,
            rng=rng,
            owner=owner or f"{socket.gethostname()}:{os.getpid()}",
        )
    outbox = build_outbox(store)
    deliverer = None
    if outbox is not None and "dispatcher" in settings.role_set():
        deliverer = build_deliverer(settings, outbox, http, now, resolver=user_lookups)
        deliverer.on_outcome = metrics.on_webhook_outcome
        if timeline is not None:
            deliverer.note = _delivery_notes(timeline)
    metrics.outbox = outbox
    return Runtime(
        settings=settings,
        store=store,
        feed=feed,
        blobs=blobs,
        http=http,
        providers=providers,
        catalogue=catalogue,
        timings=timings,
        background=background,
        outcomes=outcomes,
        receiver=receiver,
        broadcaster=broadcaster,
        metrics=metrics,
        input_fetcher=input_fetcher,
        output_fetchers=output_fetchers,
        runner=runner,
        media_budget=media_budget,
        pacing=pacing,
        outbox=outbox,
        deliverer=deliverer,
        timeline=timeline,
        simulator=simulator,
        now=now,
        user_lookups=user_lookups,
    )


def _build_runner(
    settings: Settings,
    *,
    store: TaskStore,
    blobs: BlobStore,
    providers: dict[str, Provider],
    catalogue: Catalogue,
    timings: Timings,
    outcomes: OutcomeApplier,
    pacing: Pacing,
    input_fetcher: SafeFetcher,
    output_fetchers: dict[str, SafeFetcher],
    media_budget: MemoryBudget,
    now: Callable[[], float],
    rng: random.Random,
    owner: str,
) -> StepRunner:
    processing = ProcessingStep(
        store,
        blobs,
        providers,
        catalogue,
        timings,
        outcomes,
        input_fetcher,
        public_url=settings.public_url,
        pacing=pacing,
        user_concurrency=settings.user_concurrency,
        sync_calls=settings.sync_calls,
        budget=media_budget,
        rng=rng,
        inputs_by_url=settings.inputs_by_url,
    )
    watermarking = WatermarkingStep(
        store,
        blobs,
        providers,
        timings,
        output_fetchers,
        WatermarkConfig.from_settings(settings),
        public_fetcher=input_fetcher,
        budget=media_budget,
        rng=rng,
    )
    return StepRunner(
        store,
        outcomes,
        {
            State.PENDING: processing,
            State.PROCESSING: processing,
            State.WATERMARKING: watermarking,
        },
        owner=owner,
        lease_s=timings.base.lease_s,
        retry_backoff_s=timings.base.retry_backoff_s,
        max_lost_leases=settings.max_lost_leases,
        now=now,
        concurrency=settings.step_concurrency,
        backlog=settings.step_backlog,
        rng=rng,
    )


# --- parts ----------------------------------------------------------------------------------------


def build_store(settings: Settings) -> tuple[TaskStore, ChangeFeed]:
    """The store and change feed named by ``HOOKLINE_STORE_URL``."""
    url = settings.store_url
    if url.startswith("sqlite:"):
        sqlite = SqliteStore.from_url(url)
        return sqlite, SqliteFeed(sqlite)
    if url.startswith(("mongodb:", "mongodb+srv:")):
        # Change streams are MongoDB's feed; the extra event collection would cost a round trip
        # per transition (bench/mongo_ops.py: 13 → 8 per successful task).
        mongo = MongoStore.from_url(url, event_log=False, timeout_s=settings.store_timeout_s)
        return mongo, MongoChangeFeed(mongo.db)
    raise ValueError(f"HOOKLINE_STORE_URL must be sqlite:/// or mongodb://, got {url!r}")


def _delivery_notes(timeline: Timeline) -> Note:
    """Each outbound try, told to its task's timeline."""

    async def note(task_id: str, at: float, data: dict[str, object]) -> None:
        await timeline.note(task_id, "delivery", at, data)

    return note


def build_outbox(store: TaskStore) -> Outbox | None:
    """The outbox beside ``store`` (its tables in the same file or database); None for a store
    with no outbox adapter (a test's stand-in)."""
    if isinstance(store, SqliteStore):
        return SqliteOutbox(store)
    if isinstance(store, MongoStore):
        return MongoOutbox(store.db)
    return None


def build_timeline(store: TaskStore, settings: Settings) -> Timeline | None:
    """The timeline beside ``store`` (its table in the same file, its collection in the same
    database), bounded by ``HOOKLINE_TIMELINE_MAX_NOTES``; None for a store with no timeline
    adapter (a test's stand-in)."""
    if isinstance(store, SqliteStore):
        return SqliteTimeline(store, max_notes=settings.timeline_max_notes)
    if isinstance(store, MongoStore):
        return MongoTimeline(store.db, max_notes=settings.timeline_max_notes)
    return None


def build_deliverer(
    settings: Settings,
    outbox: Outbox,
    http: httpx.AsyncClient,
    now: Callable[[], float],
    *,
    resolver: Resolver = system_resolver,
) -> Deliverer:
    """The outbox's sender: destinations under the input fetches' SSRF rules, plus
    ``HOOKLINE_WEBHOOK_HOSTS``."""
    fetcher = SafeFetcher(
        http,
        allow_hosts=settings.webhook_host_set(),
        max_bytes=0,
        timeout_s=settings.webhook_timeout_s,
        resolver=resolver,
    )
    return Deliverer(
        outbox,
        fetcher,
        Backoff(settings.webhook_retry_base_s, settings.webhook_retry_horizon_s),
        lease_s=settings.webhook_lease_s,
        concurrency=settings.webhook_concurrency,
        poll_s=settings.webhook_poll_s,
        now=now,
        per_destination=settings.webhook_per_destination,
    )


def build_blob_store(settings: Settings) -> BlobStore:
    """The adapter named by ``settings.blob_url``.

    ``file://var/blobs`` (relative to the working directory), ``file:///abs/path``, or
    ``s3://bucket[/prefix]`` with ``s3_endpoint`` (``host:port`` or ``http(s)://host:port``; an
    explicit scheme decides ``secure``), ``s3_access_key``, ``s3_secret_key``, ``s3_region``,
    ``s3_public_endpoint``. Local file URLs are signed with ``secret_key``, or with a key created
    once under ``var_dir``.
    """
    url = settings.blob_url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"HOOKLINE_BLOB_URL must be file://… or s3://…, got {url!r}")
    if scheme == "file":
        if not rest:
            raise ValueError("HOOKLINE_BLOB_URL file:// needs a path")
        secret = (
            settings.secret_key.get_secret_value().encode()
            if settings.secret_key is not None
            else load_or_create_secret(settings.var_dir)
        )
        return LocalBlobStore(Path(rest), settings.public_url, secret)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError("HOOKLINE_BLOB_URL s3:// needs a bucket")
        if not settings.s3_endpoint:
            raise ValueError("HOOKLINE_S3_ENDPOINT is required with an s3:// blob URL")
        endpoint, secure = split_endpoint(settings.s3_endpoint, default_secure=settings.s3_secure)
        return S3BlobStore(
            endpoint,
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            bucket,
            secure=secure,
            region=settings.s3_region,
            prefix=prefix.strip("/"),
            public_endpoint=settings.s3_public_endpoint,
        )
    raise ValueError(f"unknown blob store scheme {scheme!r} in HOOKLINE_BLOB_URL")


def build_output_fetchers(
    settings: Settings,
    http: httpx.AsyncClient,
    names: list[str],
    *,
    budget: MemoryBudget | None = None,
) -> dict[str, SafeFetcher]:
    """One SSRF-safe fetcher per provider, allowed the provider's output hosts."""
    fetchers: dict[str, SafeFetcher] = {}
    configured = settings.output_host_set()
    for name in names:
        hosts = set(configured if configured is not None else default_output_hosts(name))
        if name == "sim":
            hosts.add(_host_port(settings.public_url))
        fetchers[name] = SafeFetcher(
            http,
            allow_hosts=hosts,
            max_bytes=OUTPUT_MAX_BYTES,
            timeout_s=OUTPUT_FETCH_TIMEOUT_S,
            budget=budget,
        )
    return fetchers


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.host}:{port}"


class Opens(Protocol):
    async def open(self) -> None: ...


async def open_store(
    store: TaskStore, *companions: Opens, first_wait_s: float = 0.5, max_wait_s: float = 30
) -> None:
    """Open the store, then its companions (the outbox, which keep their tables beside it),
    retrying with backoff while it is unreachable. Until it opens, requests that need it answer
    503 and /readyz says not ready; the watchers retry on their own."""
    wait = first_wait_s
    while True:
        try:
            await store.open()
            for companion in companions:
                await companion.open()
        except (Unavailable, StoreError) as exc:
            log.warning("store_open_failed", error=exc.message, retry_in_s=wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, max_wait_s)
        else:
            log.info("store_opened")
            return


async def _opened_soon(opener: asyncio.Task[None], wait_s: float) -> bool:
    """Wait for the first attempt(s) to open the store."""
    done, _ = await asyncio.wait({opener}, timeout=wait_s)
    if opener in done:
        opener.result()  # a bug (not unavailability) surfaces here
        return True
    return False


async def _after(opener: asyncio.Task[None], work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` once the store is open."""
    try:
        await asyncio.shield(opener)
    except BaseException:
        work.close()
        raise
    await work
