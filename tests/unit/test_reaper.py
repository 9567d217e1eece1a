"""The reaper's every branch on a fake clock: no sleeps, a real SQLite store, a provider the test
drives by hand."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from callbacks.errors import PermanentProviderError, RetryableProviderError
from callbacks.provider import Outcome
from service.blobs.local import LocalBlobStore
from service.media.fetch import FetchError, FetchResult
from service.runtime import Runtime, build_runtime
from service.settings import Settings
from service.steps.dispatcher import Backstop, Dispatcher
from service.steps.outcomes import OutcomeApplier
from service.steps.processing import ProcessingStep
from service.steps.runner import StepRunner
from statemachine import lifecycle
from statemachine.decide import Deadlines
from statemachine.errors import Unavailable
from statemachine.reaper import Reaper, plan
from statemachine.sqlite_feed import SqliteFeed
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, State, is_valid_path
from statemachine.task import Task
from tests.support.factories import make_task
from tests.support.manual_provider import ManualProvider

DEADLINES = Deadlines(
    handoff_s=10,
    lease_s=60,
    ai_deadline_s=100,
    ai_hard_cap_s=300,
    retry_backoff_s=2,
    max_attempts=3,
)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "purple").save(buf, "PNG")
    return buf.getvalue()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class StaticFetcher:
    """Stands in for the SSRF-safe fetcher: every output URL yields the same image."""

    async def fetch(self, url: str, **_: Any) -> FetchResult:
        return FetchResult(png(), "image/png", url)


@dataclass
class World:
    store: SqliteStore
    clock: FakeClock
    provider: ManualProvider
    runtime: Runtime
    reaper: Reaper
    later: list[tuple[float, str]] = field(default_factory=list)

    @property
    def runner(self) -> StepRunner:
        assert self.runtime.runner is not None
        return self.runtime.runner

    @property
    def outcomes(self) -> OutcomeApplier:
        return self.runtime.outcomes

    @property
    def processing(self) -> ProcessingStep:
        step = self.runner.steps[State.PROCESSING]
        assert isinstance(step, ProcessingStep)
        return step

    async def task(self, **changes: Any) -> Task:
        """A stored task with the given fields (default: pending, due in handoff_s)."""
        now = self.clock()
        changes.setdefault("id", f"tsk_{len(self.later)}_{now}")
        task = make_task(
            now=now,
            provider="manual",
            prompt="a cat",
            callback_token="tok",
            deadline=now + DEADLINES.handoff_s,
            **changes,
        )
        task, _ = await self.store.create_task(task)
        return task

    async def reap(self) -> int:
        """One reaper pass, then wait for the steps it started in the background."""
        handled = await self.reaper.run_pass()
        await self.runtime.drain()
        return handled

    async def dispatch_since(self, position: str | None) -> None:
        """Hand the feed events after ``position`` to a dispatcher, as the feed watcher does."""
        dispatcher = Dispatcher(self.store, self.runner)
        for event in await self.store.feed_after(position, 1000):
            await dispatcher.handle(event)
        await self.runtime.drain()

    async def get(self, task_id: str) -> Task:
        task = await self.store.get_task(task_id)
        assert task is not None
        return task

    async def submitted(self) -> Task:
        """A task that went pending → processing → ai_processing with a job at the provider."""
        task = await self.task()
        await self.runner.run(task.id)
        task = await self.get(task.id)
        assert task.state is State.AI_PROCESSING
        return task


def world_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        handoff_s=DEADLINES.handoff_s,
        lease_s=DEADLINES.lease_s,
        ai_deadline_s=DEADLINES.ai_deadline_s,
        ai_hard_cap_s=DEADLINES.ai_hard_cap_s,
        retry_backoff_s=DEADLINES.retry_backoff_s,
        max_attempts=DEADLINES.max_attempts,
        **overrides,
    )


@contextlib.asynccontextmanager
async def make_world(
    tmp_path: Path, *, provider: ManualProvider | None = None, **overrides: Any
) -> AsyncIterator[World]:
    """A runtime on a real SQLite store and a fake clock, its only provider driven by hand
    (``provider``: one set up by the test, e.g. with another ``arrival`` or ``quota``); no
    background loops run (the test runs reaper passes and steps itself)."""
    store = SqliteStore(tmp_path / "t.db")
    await store.open()
    await store.create_user("alice", 100, is_admin=False, key_hash="h", now=0)
    clock = FakeClock()
    http = provider.http if provider is not None else httpx.AsyncClient()
    provider = provider or ManualProvider(http=http, output_url="https://outputs.example/1.png")
    fetcher: Any = StaticFetcher()
    runtime = build_runtime(
        world_settings(tmp_path, **overrides),
        store=store,
        feed=SqliteFeed(store),
        blobs=LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:1", b"k" * 32),
        http=http,
        providers={"manual": provider},
        input_fetcher=fetcher,
        output_fetchers={"manual": fetcher},
        now=clock,
        owner="w1",
    )
    assert runtime.runner is not None
    backstop = Backstop(runtime.runner, runtime.outcomes)
    world = World(store, clock, provider, runtime, Reaper(store, backstop, interval_s=1, now=clock))
    # Steps the dispatcher would start later on its own are recorded instead (no real time).
    runtime.runner.start_at = lambda when, task_id: world.later.append((when, task_id))  # type: ignore[method-assign]
    try:
        yield world
    finally:
        await runtime.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path) as world:
        yield world


def history(task: Task) -> list[str]:
    return [h.event for h in task.history]


def valid(task: Task) -> bool:
    return is_valid_path([(h.source, h.dest, Event(h.event)) for h in task.history])


# --- plan: pure ---------------------------------------------------------------------------------


def test_plan_skips_tasks_not_due_terminal_or_under_a_live_lease() -> None:
    base = make_task(now=0, deadline=10)
    assert plan(base, now=5) == "skip"
    assert plan(base, now=10) == "dispatch"
    leased = base.with_changes(state=State.PROCESSING, lease_owner="w", lease_expires=20)
    assert plan(leased, now=15) == "skip"
    assert plan(leased, now=25) == "dispatch"
    assert plan(base.with_changes(state=State.AI_PROCESSING), now=10) == "reconcile"
    assert plan(base.with_changes(state=State.COMPLETED, deadline=None), now=99) == "skip"


# --- pending / processing / watermarking --------------------------------------------------------


async def test_a_pending_task_the_dispatcher_missed_is_dispatched(world: World) -> None:
    task = await world.task()
    assert await world.reap() == 0  # not due yet
    world.clock.advance(DEADLINES.handoff_s)
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.provider_job_id == "job1"


async def test_work_of_a_dead_worker_is_taken_over_when_its_lease_expires(world: World) -> None:
    task = await world.task()
    dead = await lifecycle.take_lease(world.store, task, "dead-worker", world.clock(), 60)
    assert dead is not None and dead.state is State.PROCESSING
    world.clock.advance(30)
    assert await world.reap() == 0  # lease still live
    world.clock.advance(31)
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and len(world.provider.jobs) == 1
    assert valid(task)


async def die_holding_the_lease(world: World, task_id: str, owner: str) -> Task:
    """A worker claims the task's step and dies (kill -9): its lease expires unreleased."""
    task = await world.get(task_id)
    held = await lifecycle.take_lease(world.store, task, owner, world.clock(), DEADLINES.lease_s)
    assert held is not None
    world.clock.advance(DEADLINES.lease_s + 1)
    return held


async def test_a_step_that_keeps_killing_its_worker_fails_with_worker_lost(world: World) -> None:
    """No poison loops: every lost lease counts against the task; at the limit (3 by default)
    the task fails with its refund instead of being run again."""
    task = await world.task()
    for n, owner in enumerate(("w-a", "w-b", "w-c"), start=1):
        held = await die_holding_the_lease(world, task.id, owner)
        assert held.lost_leases == n - 1  # the claim counted the death before it
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.FAILED and task.refunded
    assert task.error is not None and task.error.code == "worker_lost"
    assert world.provider.jobs == {}  # the poison was never run again
    user = await world.store.get_user("alice")
    assert user is not None and user.balance == 100


async def test_a_lost_lease_below_the_limit_is_run_again_and_counted(world: World) -> None:
    task = await world.task()
    await die_holding_the_lease(world, task.id, "w-dead")
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and len(world.provider.jobs) == 1
    assert task.lost_leases == 0  # counted on the claim, reset once the step moved on
    assert "start" in history(task) and valid(task)


async def test_the_count_is_per_step_and_a_death_in_the_next_step_counts_once(
    world: World,
) -> None:
    task = await world.submitted()
    assert task.lost_leases == 0
    await world.outcomes.apply(task.id, world.provider.finish("job1"))
    held = await die_holding_the_lease(world, task.id, "w-dead")
    assert held.lost_leases == 0 and held.state is State.WATERMARKING
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.COMPLETED and task.lost_leases == 1


async def test_watermarking_with_an_expired_lease_is_finished_by_another_worker(
    world: World,
) -> None:
    task = await world.submitted()
    world.provider.finish("job1")
    assert await world.outcomes.apply(task.id, world.provider.jobs["job1"].outcome) == ("succeeded")
    task = await world.get(task.id)
    dead = await lifecycle.take_lease(world.store, task, "dead-worker", world.clock(), 60)
    assert dead is not None
    world.clock.advance(61)
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.COMPLETED and len(task.outputs) == 1
    assert history(task) == ["start", "submitted", "ai_succeeded", "finished"]


# --- ai_processing: poll first ------------------------------------------------------------------


async def test_an_overdue_job_that_succeeded_is_adopted_not_paid_twice(world: World) -> None:
    task = await world.submitted()
    world.provider.finish("job1")  # succeeded, but the webhook was lost
    world.clock.advance(DEADLINES.ai_deadline_s)
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.WATERMARKING and task.attempts == 1
    assert world.provider.polls == ["job1"] and len(world.provider.jobs) == 1
    assert world.outcomes.reconciliations == 1


async def test_a_job_still_running_within_the_hard_cap_gets_more_time(world: World) -> None:
    task = await world.submitted()
    world.clock.advance(DEADLINES.ai_deadline_s)
    await world.reap()
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and history(task)[-1] == "extend"
    assert task.deadline == world.clock() + DEADLINES.ai_deadline_s
    assert world.provider.cancels == []


async def test_extensions_stop_at_the_hard_cap(world: World) -> None:
    task = await world.submitted()
    world.clock.advance(DEADLINES.ai_deadline_s * 2.5)
    await world.reap()
    task = await world.get(task.id)
    remaining = DEADLINES.ai_hard_cap_s - DEADLINES.ai_deadline_s * 2.5
    assert task.deadline == pytest.approx(world.clock() + remaining)


async def test_a_job_past_the_hard_cap_is_cancelled_and_retried_with_backoff(
    world: World,
) -> None:
    task = await world.submitted()
    world.clock.advance(DEADLINES.ai_hard_cap_s)
    head = await world.store.feed_head()
    await world.reap()
    await world.dispatch_since(head)  # the dispatcher sees the retry and schedules its step
    task = await world.get(task.id)
    assert task.state is State.PROCESSING and task.attempts == 2
    assert world.provider.cancels == ["job1"]
    assert task.lease_owner is None and task.provider_job_id is None
    delay = task.deadline - world.clock()  # type: ignore[operator]
    assert 0.5 * DEADLINES.retry_backoff_s <= delay <= 1.5 * DEADLINES.retry_backoff_s
    assert [a.outcome for a in task.attempt_log] == ["timeout"]
    assert world.later == [(task.deadline, task.id)]
    # Not before the backoff is over...
    assert await world.reap() == 0
    await world.runner.run(task.id)
    assert (await world.get(task.id)).state is State.PROCESSING
    # ...then the next attempt is submitted.
    world.clock.advance(delay)
    assert await world.reap() == 1
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.provider_job_id == "job2"
    assert valid(task)


async def test_backoff_grows_exponentially_between_attempts(world: World) -> None:
    task = await world.submitted()
    delays = []
    for _ in range(2):
        world.clock.advance(DEADLINES.ai_hard_cap_s)
        await world.reap()
        task = await world.get(task.id)
        delays.append(task.deadline - world.clock())  # type: ignore[operator]
        world.clock.advance(delays[-1])
        await world.reap()
    assert 1 <= delays[0] <= 3 and 2 <= delays[1] <= 6


async def test_a_failed_job_is_retried_and_the_last_failure_fails_with_one_refund(
    world: World,
) -> None:
    task = await world.submitted()
    for attempt in (1, 2, 3):
        job = (await world.get(task.id)).provider_job_id
        assert job == f"job{attempt}"
        world.provider.finish(job, "failed", reason="boom")
        world.clock.advance(DEADLINES.ai_deadline_s)
        await world.reap()  # polls, finds the failure
        task = await world.get(task.id)
        if attempt < 3:
            assert task.state is State.PROCESSING and task.attempts == attempt + 1
            world.clock.advance(10)
            await world.reap()  # backoff over: next attempt submitted
    assert task.state is State.FAILED and task.refunded and task.attempts == 3
    assert task.error is not None and task.error.code == "provider_failed"
    user = await world.store.get_user("alice")
    assert user is not None and user.balance == 100
    assert [e.kind for e in await world.store.ledger("alice")] == ["grant", "debit", "refund"]
    assert valid(task)


async def test_a_provider_that_forgot_the_job_404_gets_a_retry(world: World) -> None:
    task = await world.submitted()
    del world.provider.jobs["job1"]  # poll answers 404 → PermanentProviderError
    world.clock.advance(DEADLINES.ai_deadline_s)
    await world.reap()
    task = await world.get(task.id)
    assert task.state is State.PROCESSING and task.attempts == 2
    assert task.error is not None and task.error.code == "timeout"


async def test_garbage_from_polls_waits_until_the_hard_cap_then_retries(world: World) -> None:
    task = await world.submitted()
    world.provider.poll_error = RetryableProviderError("not JSON")
    world.clock.advance(DEADLINES.ai_deadline_s)
    await world.reap()
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.history[-1].detail == "poll failed; waiting"
    world.clock.advance(DEADLINES.ai_hard_cap_s)
    await world.reap()
    task = await world.get(task.id)
    assert task.state is State.PROCESSING and task.attempts == 2


async def test_two_reapers_never_act_on_one_task(world: World) -> None:
    task = await world.submitted()
    world.provider.finish("job1")
    world.clock.advance(DEADLINES.ai_deadline_s)
    other = Reaper(
        world.store, Backstop(world.runner, world.outcomes), interval_s=1, now=world.clock
    )

    handled = await asyncio.gather(world.reaper.run_pass(), other.run_pass())
    await world.runtime.drain()
    assert sum(handled) == 2  # both saw it overdue...
    assert world.provider.polls == ["job1"]  # ...one claimed it and polled
    task = await world.get(task.id)
    assert history(task).count("ai_succeeded") == 1


async def test_a_webhook_and_the_reaper_racing_end_in_one_state(world: World) -> None:
    task = await world.submitted()
    outcome = world.provider.finish("job1")
    world.clock.advance(DEADLINES.ai_deadline_s)

    results = await asyncio.gather(world.outcomes.apply(task.id, outcome), world.reaper.run_pass())
    await world.runtime.drain()
    task = await world.get(task.id)
    assert task.state is State.WATERMARKING and history(task).count("ai_succeeded") == 1
    assert results[0] in ("succeeded", "already_applied", "ignored")


async def test_a_failure_webhook_for_an_earlier_attempt_changes_nothing(world: World) -> None:
    task = await world.submitted()
    world.clock.advance(DEADLINES.ai_hard_cap_s)
    await world.reap()
    world.clock.advance(10)
    await world.reap()
    task = await world.get(task.id)
    assert task.provider_job_id == "job2"
    stale = Outcome("failed", "job1", reason="late failure")
    assert await world.outcomes.apply(task.id, stale) == "stale"
    assert (await world.get(task.id)).version == task.version


async def test_a_webhook_for_a_cancelled_task_changes_nothing(world: World) -> None:
    task = await world.submitted()
    cancelled = await lifecycle.advance(
        world.store, task.id, Event.CANCEL, world.clock(), DEADLINES
    )
    assert isinstance(cancelled, Task)
    outcome = world.provider.finish("job1")
    assert await world.outcomes.apply(task.id, outcome) == "after_terminal"
    assert (await world.get(task.id)).version == cancelled.version


async def test_a_retryable_submit_failure_is_retried_inside_the_step(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sleep = asyncio.sleep

    async def no_sleep(seconds: float) -> None:
        # The submit's backoff passes at once; the lease heartbeat (the same asyncio.sleep,
        # lease_s / 3) keeps its pace instead of renewing in a tight loop.
        await real_sleep(seconds if seconds >= world.runner.lease_s / 3 else 0)

    monkeypatch.setattr("service.steps.processing.asyncio.sleep", no_sleep)
    world.provider.submit_errors = [RetryableProviderError("503"), RetryableProviderError("503")]
    task = await world.task()
    await world.runner.run(task.id)
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.attempts == 1


async def test_a_step_already_running_in_this_process_is_not_run_twice(world: World) -> None:
    """The dispatcher has the task (a live lease of this worker); the reaper's dispatch of the
    same task must not submit it a second time."""
    task = await world.task()
    mine = await lifecycle.take_lease(world.store, task, world.runner.owner, world.clock(), 60)
    assert mine is not None
    world.clock.advance(DEADLINES.handoff_s)
    await world.runner.run(task.id)
    world.runner.offer(await world.get(task.id))
    assert world.provider.jobs == {}
    assert (await world.get(task.id)).version == mine.version


# --- regressions from the review of races -------------------------------------------------------


async def test_a_success_that_lands_during_the_timeout_poll_wins(world: World) -> None:
    """The reaper polls past the hard cap and hears "running"; meanwhile the webhook applies the
    success. The timeout must not fail (and refund) a result the provider delivered."""
    task = await world.submitted()
    success = Outcome("succeeded", "job1", (world.provider.output_url,))

    async def webhook_meanwhile(job_id: str) -> None:
        assert await world.outcomes.apply(task.id, success) == "succeeded"

    world.provider.on_poll = webhook_meanwhile
    world.clock.advance(DEADLINES.ai_hard_cap_s)
    await world.reap()
    task = await world.get(task.id)
    assert task.state in (State.WATERMARKING, State.COMPLETED) and not task.refunded
    assert world.provider.cancels == []


async def test_a_worker_that_lost_its_lease_cannot_fail_the_task(world: World) -> None:
    """Worker w1's submit runs past its lease; w2 takes the task over and submits it; w1's
    submit then errors. w1's failure must not touch w2's attempt."""
    task = await world.task()

    async def taken_over_meanwhile(job: Any) -> None:
        world.clock.advance(DEADLINES.lease_s + 1)
        stale = await world.get(task.id)
        other = await lifecycle.take_lease(world.store, stale, "w2", world.clock(), 60)
        assert other is not None
        result = await lifecycle.advance(
            world.store,
            task.id,
            Event.SUBMITTED,
            world.clock(),
            DEADLINES,
            changes=lambda t: {"provider_job_id": "jobX"},
        )
        assert isinstance(result, Task)
        raise PermanentProviderError("422 from the provider")

    world.provider.on_submit = taken_over_meanwhile
    await world.runner.run(task.id)
    await world.runtime.drain()
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.provider_job_id == "jobX"
    assert not task.refunded and world.provider.cancels == []


async def test_a_blob_store_blip_hands_the_step_back_instead_of_failing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = await world.submitted()
    await world.outcomes.apply(task.id, world.provider.finish("job1"))
    blobs = world.runtime.blobs
    real_put = blobs.put
    failures = [Unavailable("blob store down", code="blob_store_down")]

    async def flaky_put(key: str, data: bytes, content_type: str) -> None:
        if failures:
            raise failures.pop()
        await real_put(key, data, content_type)

    monkeypatch.setattr(blobs, "put", flaky_put)
    await world.runner.run(task.id)
    task = await world.get(task.id)
    assert task.state is State.WATERMARKING and task.step_retries == 1
    assert task.lease_owner is None and task.deadline is not None
    world.clock.advance(task.deadline - world.clock())
    await world.reap()
    assert (await world.get(task.id)).state is State.COMPLETED


async def test_an_input_url_that_is_down_for_now_gets_another_attempt(world: World) -> None:
    class DownFetcher:
        async def fetch(self, url: str, **_: Any) -> FetchResult:
            raise FetchError("503 from the host", code="http_status", retryable=True)

    world.processing.input_fetcher = DownFetcher()  # type: ignore[assignment]
    task = await world.task()
    await world.store.transition(
        task.with_changes(version=2, inputs=({"url": "https://img.example/a.png"},)),
        State.PENDING,
        1,
        emit=False,
    )
    await world.runner.run(task.id)
    task = await world.get(task.id)
    assert task.state is State.PROCESSING and task.attempts == 2
    assert task.error is not None and task.error.code == "input_unavailable"


async def test_a_failing_webhook_makes_no_outbound_call_before_its_answer(world: World) -> None:
    task = await world.submitted()
    for _ in range(2):
        world.clock.advance(DEADLINES.ai_hard_cap_s)
        await world.reap()
        world.clock.advance(10)
        await world.reap()
    task = await world.get(task.id)
    assert task.attempts == 3 and task.provider_job_id == "job3"
    cancels_before = list(world.provider.cancels)
    failed = world.provider.finish("job3", "failed", reason="boom")
    assert await world.outcomes.apply(task.id, failed) == "failed"
    assert world.provider.cancels == cancels_before  # the job failed: nothing to cancel
    task = await world.get(task.id)
    assert task.state is State.FAILED and task.refunded


async def test_a_stale_outcome_of_a_finished_attempt_is_not_deferred(world: World) -> None:
    task = await world.submitted()
    world.clock.advance(DEADLINES.ai_hard_cap_s)
    await world.reap()  # job1 timed out: processing, backing off
    task = await world.get(task.id)
    assert task.state is State.PROCESSING
    late_cancel = Outcome("cancelled", "job1")
    assert await world.outcomes.apply(task.id, late_cancel) == "stale"
    assert (await world.get(task.id)).early_outcome is None


async def test_the_reaper_does_not_wait_for_the_steps_it_starts(world: World) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_submit(job: Any) -> None:
        entered.set()
        await release.wait()

    world.provider.on_submit = slow_submit
    task = await world.task()
    world.clock.advance(DEADLINES.handoff_s)
    assert await world.reaper.run_pass() == 1  # returns while the submit is still running
    await asyncio.wait_for(entered.wait(), 10)
    assert (await world.get(task.id)).state is State.PROCESSING
    assert await world.reaper.run_pass() == 0  # its lease is live: not dispatched twice
    release.set()
    await world.runtime.drain()
    assert (await world.get(task.id)).state is State.AI_PROCESSING
    assert len(world.provider.jobs) == 1


# --- fallbacks and per-provider timings --------------------------------------------------------


async def test_a_provider_failure_moves_the_next_attempt_to_the_styles_fallback(
    tmp_path: Path,
) -> None:
    styles = tmp_path / "styles.toml"
    styles.write_text(
        '[styles.fb]\nprompt_template = "{prompt}"\ncost = 5\nfallbacks = ["backup"]\n'
    )
    async with make_world(tmp_path, styles_path=styles) as world:
        await _falls_back(world)


async def _falls_back(world: World) -> None:
    second = ManualProvider(http=world.provider.http, output_url="https://o/2.png", name="backup")
    world.runtime.providers["backup"] = second
    task = await world.task(style="fb")
    await world.runner.run(task.id)
    failed = world.provider.finish("job1", "failed", reason="CUDA out of memory")
    assert await world.outcomes.apply(task.id, failed) == "retry"
    task = await world.get(task.id)
    assert task.provider == "backup" and task.attempts == 2
    world.clock.advance(10)
    await world.reap()
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and list(second.jobs) == [task.provider_job_id]
    assert [a.provider for a in task.attempt_log] == ["manual", "backup"]


async def test_max_attempts_can_be_set_per_provider(tmp_path: Path) -> None:
    timings = {"manual": {"max_attempts": 1}}
    async with make_world(tmp_path, provider_timings=timings) as world:
        task = await world.submitted()
        failed = world.provider.finish("job1", "failed", reason="interrupted")
        assert await world.outcomes.apply(task.id, failed) == "failed"
        assert (await world.get(task.id)).refunded


# --- regressions from the final review ------------------------------------------------------------


async def test_the_hand_back_budget_is_per_step(world: World) -> None:
    """Hand-backs spent while submitting must not use up the watermarking step's budget."""
    task = await world.task(step_retries=5)
    await world.runner.run(task.id)
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING and task.step_retries == 0
    await world.outcomes.apply(task.id, world.provider.finish("job1"))
    assert (await world.get(task.id)).step_retries == 0


async def test_a_store_blip_does_not_stop_the_lease_heartbeat(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.runner.lease_s = 0.03  # beats every 10 ms
    task = await world.task()
    held = await lifecycle.take_lease(world.store, task, world.runner.owner, world.clock(), 60)
    assert held is not None
    real_get = world.store.get_task
    blips = [Unavailable("store blip")]

    async def flaky_get(task_id: str) -> Task | None:
        if blips:
            raise blips.pop()
        return await real_get(task_id)

    monkeypatch.setattr(world.store, "get_task", flaky_get)
    beat = asyncio.create_task(world.runner.beat(task.id))
    try:
        async with asyncio.timeout(10):
            while (await real_get(task.id)).version == held.version:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
    finally:
        beat.cancel()
    assert not blips  # the blip happened, and a later beat still renewed the lease


async def test_steps_beyond_the_concurrency_wait_as_ids_then_in_the_store(tmp_path: Path) -> None:
    """Two steps at once, three task ids in the backlog; the other offers are dropped and those
    tasks wait in the store until the reaper finds them by their deadlines."""
    async with make_world(tmp_path, step_concurrency=2, step_backlog=3) as w:
        gate = asyncio.Event()

        async def held(job: Any) -> None:
            await gate.wait()

        w.provider.on_submit = held
        tasks = [await w.task(id=f"tsk_burst_{i}") for i in range(7)]
        for task in tasks:
            w.runner.start(task.id)
        w.runner.start(tasks[3].id)  # already in the backlog: not twice
        async with asyncio.timeout(10):
            while len(w.provider.jobs) < 2:
                await asyncio.sleep(0.01)
        assert w.runner.work.busy == 2  # two drivers: no coroutine per waiting task
        assert w.runner.busy == 5 and w.runner.dropped == 2
        # overdue while in hand: a reaper pass starts nothing new, so it counts none (a count
        # of a full batch would make it loop without a pause)
        w.clock.advance(DEADLINES.handoff_s + 1)
        assert await w.reaper.run_pass() == 0
        gate.set()
        await w.runtime.drain()
        states = [(await w.get(t.id)).state for t in tasks]
        assert states == [State.AI_PROCESSING] * 5 + [State.PENDING] * 2
        await w.reap()
        assert {(await w.get(t.id)).state for t in tasks} == {State.AI_PROCESSING}
        assert len(w.provider.jobs) == 7
