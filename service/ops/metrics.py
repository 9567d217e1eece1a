"""Prometheus metrics on a per-process registry, computed from the change feed.

A Watcher hands every feed event to ``Metrics.observe``, which reads the task once and counts:
transitions, time spent in the state just left, provider latency (ai_processing → watermarking),
retries, timeouts, credits debited (creation) and refunded (failed/cancelled with a refund).
Tasks by state are counted in the store at scrape time. The feed watcher starts at the feed's head
when the process starts, so counters are "since this process started" and cover every process's
tasks: across replicas, aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.ops.stats import TIMEOUT_OUTCOMES, state_intervals
from statemachine import clock
from statemachine.outbox import Outbox
from statemachine.states import REFUNDED_STATES, TERMINAL, Event, State
from statemachine.store import FeedEvent, TaskStore

STATE_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600, 1800)
PROVIDER_BUCKETS_S: Final = (0.5, 1, 2, 5, 10, 20, 30, 40, 60, 90, 120, 180, 300, 600)
# Model names come from requests: beyond this many (provider, model) pairs they are "other", so
# no client can grow the label set without bound.
MAX_MODEL_LABELS: Final = 50
MAX_USER_LABELS: Final = 20  # users shown by jobs in flight, the busiest first
MAX_TRACKED_TASKS: Final = 200_000  # tasks whose current state is being timed
OTHER: Final = "other"


class Metrics:
    """Every hookline metric on one ``CollectorRegistry`` owned by this app."""

    def __init__(
        self,
        store: TaskStore,
        providers: Mapping[str, object],
        *,
        reconciliations: Callable[[], int],
        sse_clients: Callable[[], int],
    ) -> None:
        self._store = store
        self._providers = providers  # names only: which providers may become labels
        self._models: set[tuple[str, str]] = set()
        self._entered: OrderedDict[str, float] = OrderedDict()  # task id → entered its state
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Gauge("hookline_tasks", "Tasks by state (all users).", ["state"], registry=r)
        self.user_jobs = Gauge(
            "hookline_user_jobs_in_flight",
            f"Provider jobs in flight of the {MAX_USER_LABELS} users with the most.",
            ["user"],
            registry=r,
        )
        self.transitions = Counter(
            "hookline_transitions",
            "State changes by event and new state.",
            ["event", "to"],
            registry=r,
        )
        self.state_seconds = Histogram(
            "hookline_state_duration_seconds",
            "Time a task spent in a state before leaving it.",
            ["state"],
            buckets=STATE_BUCKETS_S,
            registry=r,
        )
        self.provider_seconds = Histogram(
            "hookline_provider_latency_seconds",
            "Time in ai_processing until the provider's result (ai_succeeded).",
            ["provider", "model"],
            buckets=PROVIDER_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter("hookline_retries", "Attempts retried.", ["provider"], registry=r)
        self.timeouts = Counter(
            "hookline_timeouts", "Provider attempts that timed out.", ["provider"], registry=r
        )
        self.webhook_rejected = Counter(
            "hookline_webhook_rejected",
            "Webhook deliveries refused (bad signature or token, unknown task, ...).",
            ["provider", "code"],
            registry=r,
        )
        self.credits_debited = Counter(
            "hookline_credits_debited", "Credits charged at task creation.", registry=r
        )
        self.credits_refunded = Counter(
            "hookline_credits_refunded", "Credits given back on failed/cancelled.", registry=r
        )
        self.outbound = Counter(
            "hookline_outbound_deliveries",
            "Outbound webhook tries by outcome (delivered, retried, failed, gone, undeliverable;"
            " dropped: messages not queued, their owner over HOOKLINE_WEBHOOK_MAX_PENDING).",
            ["outcome"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "hookline_outbox_depth", "Outbound webhook messages not yet settled.", registry=r
        )
        self.outbox_oldest = Gauge(
            "hookline_outbox_oldest_pending_seconds",
            "Age of the oldest outbound webhook message not yet settled (0: none).",
            registry=r,
        )
        self.outbox: Outbox | None = None  # set by the runtime when the store has one
        r.register(_LiveCollector(reconciliations, sse_clients))

    # --- fed by the change feed -----------------------------------------------------------------

    async def observe(self, event: FeedEvent) -> None:
        """Count one feed event (a Watcher handler).

        Time in a state is the gap since the task's previous event seen here (the first event of
        a task after this process started gives no sample). The task itself is read only for
        events that need its fields: creation (cost), refunds, retries and timeouts, and the end
        of the AI's work (provider and model) — two reads for a task that succeeds."""
        self.transitions.labels(event=event.event, to=event.dest.value).inc()
        self._time_state(event)
        ai_done = event.source is State.AI_PROCESSING and event.dest is State.WATERMARKING
        settles = event.dest in REFUNDED_STATES or event.event == Event.RETRY.value
        if event.source is not None and not ai_done and not settles:
            return
        task = await self._store.get_task(event.task_id)
        if task is None:
            return
        if event.source is None:
            self.credits_debited.inc(task.cost)
            return
        if event.dest in REFUNDED_STATES and task.refunded:
            self.credits_refunded.inc(task.cost)
        if event.event == Event.RETRY.value:
            self.retries.labels(provider=self._provider(task.provider)).inc()
        for attempt in task.attempt_log:
            if attempt.outcome in TIMEOUT_OUTCOMES and attempt.finished_at == event.at:
                self.timeouts.labels(provider=self._provider(attempt.provider)).inc()
        if ai_done:
            for stay in state_intervals(task):
                if stay.end == event.at and stay.state is State.AI_PROCESSING:
                    provider, model = self._model(task.provider, task.model)
                    self.provider_seconds.labels(provider, model).observe(stay.duration_s)

    def _time_state(self, event: FeedEvent) -> None:
        if event.source is not None and event.source == event.dest:
            return  # an extension: the stay goes on
        entered = self._entered.pop(event.task_id, None)
        if entered is not None and event.source is not None:
            self.state_seconds.labels(state=event.source.value).observe(event.at - entered)
        if event.dest not in TERMINAL:
            self._entered[event.task_id] = event.at
            if len(self._entered) > MAX_TRACKED_TASKS:
                self._entered.popitem(last=False)

    def on_webhook_outcome(self, outcome: str) -> None:
        self.outbound.labels(outcome=outcome).inc()

    def on_webhooks_dropped(self, n: int) -> None:
        """Messages not queued because their owner had HOOKLINE_WEBHOOK_MAX_PENDING unsettled."""
        self.outbound.labels(outcome="dropped").inc(n)

    def on_webhook_rejected(self, provider: str, code: str) -> None:
        """The webhook receiver's ``on_rejected`` callback."""
        self.webhook_rejected.labels(provider=self._provider(provider), code=code[:64]).inc()

    def _provider(self, name: str) -> str:
        # The provider comes from the callback URL too: only configured names become labels.
        return name if name in self._providers else OTHER

    def _model(self, provider: str, model: str) -> tuple[str, str]:
        pair = (self._provider(provider), model[:200])
        if pair in self._models:
            return pair
        if len(self._models) >= MAX_MODEL_LABELS:
            return pair[0], OTHER
        self._models.add(pair)
        return pair

    # --- scraping -------------------------------------------------------------------------------

    async def render(self) -> bytes:
        """The exposition text; counts tasks by state, and the busiest users' jobs in flight, in
        the store first (users beyond the top ``MAX_USER_LABELS`` get no label: bounded)."""
        counts = await self._store.count_by_state(None)
        for state, n in counts.items():
            self.tasks.labels(state=state.value).set(n)
        busiest = await self._store.active_by_owner(None, MAX_USER_LABELS)
        self.user_jobs.clear()
        for user, n in busiest.items():
            self.user_jobs.labels(user=user[:64]).set(n)
        if self.outbox is not None:
            depth = await self.outbox.depth()
            self.outbox_depth.set(depth.pending)
            oldest = depth.oldest_created_at
            self.outbox_oldest.set(max(0.0, clock.now() - oldest) if oldest is not None else 0.0)
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Values read from the running process at scrape time."""

    def __init__(self, reconciliations: Callable[[], int], sse_clients: Callable[[], int]) -> None:
        self._reconciliations = reconciliations
        self._sse_clients = sse_clients

    def collect(self) -> Iterator[Metric]:
        reconciled = CounterMetricFamily(
            "hookline_reconciliations",
            "Overdue ai_processing tasks settled by polling the provider (lost webhooks).",
        )
        reconciled.add_metric([], float(self._reconciliations()))
        yield reconciled
        clients = GaugeMetricFamily("hookline_sse_clients", "Open live-progress streams.")
        clients.add_metric([], float(self._sse_clients()))
        yield clients
