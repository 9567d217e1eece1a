"""One task's events through an index, and retention of the feed and the delivery records, on
every adapter: what is pruned (old rows, oldest first, a bounded batch per call), what is kept (the
newest event, everything a saved watcher position still needs, everything recent), and that a
read from a pruned position says so instead of skipping silently."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from statemachine import mongo_feed
from statemachine.errors import BadRequest, StoreError
from statemachine.retention import Pruned, Retention
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, State
from statemachine.store import FeedEvent, TaskStore
from statemachine.task import Task
from tests.contract.conftest import T0, Adapter, new_task, step, user_with
from tests.support.logs import captured_logs

FAR_FUTURE = T0 + 10**9


@pytest.fixture
def exact_buckets(adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MongoDB's event log prunes whole buckets (of 128 events): with one event per bucket its
    pruning is exact, as SQLite's is, so the same counts hold. Partial buckets are tested in
    tests/mongo. Set before the first event is written (the store is still empty)."""
    if adapter.kind.startswith("mongo"):
        monkeypatch.setattr(mongo_feed, "FEED_BUCKET_SIZE", 1)
    yield


async def events_at(store: TaskStore, owner: str, times: list[float]) -> list[FeedEvent]:
    """One task created at each time in ``times`` (one creation event each); the whole feed."""
    for at in times:
        await store.create_task(new_task(owner, cost=1, created_at=at))
    return await store.feed_after(None, 10_000)


async def advance(store: TaskStore, task: Task, event: Event, now: float) -> Task:
    nxt = step(task, event, now)
    assert await store.transition(nxt, task.state, task.version)
    return nxt


# one task's events


async def test_task_feed_after_gives_only_that_tasks_events_in_order(store: TaskStore) -> None:
    owner = await user_with(store, 100)
    a, _ = await store.create_task(new_task(owner, cost=1))
    b, _ = await store.create_task(new_task(owner, cost=1))
    a = await advance(store, a, Event.START, T0 + 1)
    b = await advance(store, b, Event.CANCEL, T0 + 2)
    a = await advance(store, a, Event.SUBMITTED, T0 + 3)
    feed = await store.feed_after(None, 100)
    of_a = [e for e in feed if e.task_id == a.id]
    assert [e.event for e in of_a] == ["created", "start", "submitted"]

    assert await store.task_feed_after(a.id, None, 100) == of_a
    assert await store.task_feed_after(a.id, of_a[0].position, 100) == of_a[1:]
    # A position of another task's event: this task's events after it, nothing of the other's.
    b_cancel = next(e.position for e in feed if e.task_id == b.id and e.event == "cancel")
    assert await store.task_feed_after(a.id, b_cancel, 100) == of_a[2:]
    # Paged by ``limit``, continuing from the last position given.
    first = await store.task_feed_after(a.id, None, 2)
    assert first == of_a[:2]
    assert await store.task_feed_after(a.id, first[-1].position, 2) == of_a[2:]
    assert await store.task_feed_after(a.id, feed[-1].position, 100) == []
    assert await store.task_feed_after("no-such-task", None, 100) == []


async def test_task_feed_after_refuses_a_position_that_is_not_one(store: TaskStore) -> None:
    with pytest.raises(BadRequest) as raised:
        await store.task_feed_after("t1", "not-a-position", 10)
    assert raised.value.code == "invalid_position"


async def test_task_feed_goes_through_the_task_index(sqlite_store: SqliteStore) -> None:
    """The SSE resume's query: a search of (task_id, seq), in order, never a scan of the feed."""
    plan = " | ".join(await sqlite_store.explain("task_feed"))
    assert "USING INDEX feed_events_task (task_id=? AND seq>?)" in plan, plan
    assert "SCAN" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan


# pruning the feed


async def test_old_events_are_pruned_in_batches_oldest_first_and_recent_ones_kept(
    store: TaskStore, exact_buckets: None
) -> None:
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0 + i for i in range(10)])
    head = await store.feed_head()
    cutoff = T0 + 7  # events at T0 … T0+6 are older

    assert [await store.prune_feed(cutoff, 3) for _ in range(4)] == [3, 3, 1, 0]
    assert await store.feed_after(None, 100) == feed[7:]
    assert await store.feed_head() == head
    assert await store.prune_feed(cutoff, 3) == 0, "pruning again changes nothing"
    assert await store.feed_after(None, 100) == feed[7:]


async def test_the_newest_event_is_never_pruned(store: TaskStore, exact_buckets: None) -> None:
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0, T0 + 1, T0 + 2])
    assert await store.prune_feed(FAR_FUTURE, 100) == 2
    assert await store.feed_after(None, 100) == feed[-1:]
    assert await store.feed_head() == feed[-1].position
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    assert await store.prune_feed(FAR_FUTURE, 100) == 0


async def test_an_empty_feed_prunes_nothing(store: TaskStore) -> None:
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    assert await store.feed_head() is None


async def test_events_a_saved_watcher_position_still_needs_are_kept(
    store: TaskStore, exact_buckets: None
) -> None:
    """A persistent watcher (the dispatcher) resumes after its saved position: nothing after it
    goes, however old. Live-only watchers save nothing and pin nothing."""
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0 + i for i in range(6)])
    await store.save_position("dispatcher", feed[1].position)
    await store.save_position("other", feed[3].position)
    assert await store.prune_feed(FAR_FUTURE, 100) == 2  # feed[0], feed[1]: it has handled them
    assert await store.feed_after(None, 100) == feed[2:]

    await store.save_position("dispatcher", feed[4].position)
    assert await store.prune_feed(FAR_FUTURE, 100) == 2  # now "other" at feed[3] holds it
    assert await store.feed_after(None, 100) == feed[4:]


async def test_a_saved_position_the_store_cannot_read_keeps_everything(
    store: TaskStore, exact_buckets: None
) -> None:
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0, T0 + 1, T0 + 2])
    await store.save_position("someone", "not-a-position")
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    assert await store.feed_after(None, 100) == feed


async def test_an_event_younger_than_the_cutoff_stops_the_pass(
    store: TaskStore, exact_buckets: None
) -> None:
    """Pruning deletes a run from the start of the feed: an old event written after a recent one
    (another process's clock) waits, so the retained feed has no holes."""
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0, T0 + 100, T0 + 1, T0 + 2])
    assert await store.prune_feed(T0 + 50, 100) == 1
    assert await store.feed_after(None, 100) == feed[1:]


async def test_reading_from_a_pruned_position_says_so(
    store: TaskStore, exact_buckets: None
) -> None:
    """Some of the task's events after the position may be gone: the SSE resume must start from
    the current state rather than send an incomplete history."""
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=1, created_at=T0))
    task = await advance(store, task, Event.START, T0 + 1)
    task = await advance(store, task, Event.SUBMITTED, T0 + 100)
    feed = await store.feed_after(None, 100)
    assert await store.prune_feed(T0 + 50, 100) == 2
    for gone in (None, feed[0].position):
        with pytest.raises(StoreError) as raised:
            await store.task_feed_after(task.id, gone, 100)
        assert raised.value.code == "feed_pruned"
    # From the last pruned event on, every later event is still there.
    assert await store.task_feed_after(task.id, feed[1].position, 100) == feed[2:]


async def test_the_feed_prune_reads_a_bounded_range(sqlite_store: SqliteStore) -> None:
    """The cost of a pass is the batch: a range of the primary key, no scan, no sort."""
    plan = " | ".join(await sqlite_store.explain("prune_feed"))
    assert "SEARCH feed_events USING INTEGER PRIMARY KEY (rowid<?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


# pruning deliveries


async def test_old_deliveries_are_forgotten_in_batches(store: TaskStore) -> None:
    for i in range(5):
        assert await store.record_delivery("sim", f"old-{i}", "t1", T0 + i)
    for i in range(2):
        assert await store.record_delivery("fal", f"new-{i}", "t1", T0 + 100 + i)
    assert [await store.prune_deliveries(T0 + 50, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert not any([await store.seen_delivery("sim", f"old-{i}") for i in range(5)])
    assert all([await store.seen_delivery("fal", f"new-{i}") for i in range(2)])
    assert await store.prune_deliveries(T0 + 50, 2) == 0
    # A forgotten id is no longer de-duplicated (the signature's timestamp tolerance refuses
    # a replay long before retention forgets it).
    assert await store.record_delivery("sim", "old-0", "t1", T0 + 200)


async def test_deliveries_are_pruned_oldest_first(store: TaskStore) -> None:
    for i in (3, 1, 2, 0):
        await store.record_delivery("sim", f"d{i}", "t1", T0 + i)
    assert await store.prune_deliveries(FAR_FUTURE, 2) == 2
    assert [await store.seen_delivery("sim", f"d{i}") for i in range(4)] == [
        False,
        False,
        True,
        True,
    ]


async def test_the_deliveries_prune_goes_through_the_time_index(
    sqlite_store: SqliteStore,
) -> None:
    plan = " | ".join(await sqlite_store.explain("old_deliveries"))
    assert "USING COVERING INDEX deliveries_at (at<?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


# one retention pass


async def test_a_retention_pass_prunes_a_batch_of_each_and_says_when_more_is_due(
    store: TaskStore, exact_buckets: None
) -> None:
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0 + i for i in range(5)])
    for i in range(3):
        await store.record_delivery("sim", f"d{i}", "t1", T0 + i)
    retention = Retention(store, feed_retention_s=3600, deliveries_retention_s=7200, batch=2)
    now = T0 + 7200 + 10  # everything is past both retention periods
    assert await retention.run_pass(now) == Pruned(feed=2, deliveries=2, more=True)
    assert await retention.run_pass(now) == Pruned(feed=2, deliveries=1, more=True)
    assert await retention.run_pass(now) == Pruned(feed=0, deliveries=0, more=False)
    assert await store.feed_after(None, 100) == feed[-1:]  # the newest stays


async def test_a_retention_pass_keeps_what_is_within_its_period(store: TaskStore) -> None:
    owner = await user_with(store, 100)
    feed = await events_at(store, owner, [T0, T0 + 1])
    await store.record_delivery("sim", "d1", "t1", T0)
    retention = Retention(store, feed_retention_s=3600, deliveries_retention_s=3600, batch=100)
    assert await retention.run_pass(T0 + 60) == Pruned(feed=0, deliveries=0, more=False)
    assert await store.feed_after(None, 100) == feed
    assert await store.seen_delivery("sim", "d1")


class ScriptedStore:
    """Answers ``prune_feed`` from a script (a number, or an exception to raise), then blocks."""

    def __init__(self, feed: list[int | Exception]) -> None:
        self.feed = feed
        self.passes = 0
        self.done = asyncio.Event()

    async def prune_feed(self, before_at: float, limit: int) -> int:
        if not self.feed:
            self.done.set()
            await asyncio.Event().wait()  # until the test cancels the loop
        self.passes += 1
        answer = self.feed.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def prune_deliveries(self, before_at: float, limit: int) -> int:
        return 0


async def test_the_retention_loop_survives_a_failing_pass_and_drains_a_backlog() -> None:
    store = ScriptedStore([StoreError("store down"), 10, 10, 3])
    retention = Retention(
        store,  # type: ignore[arg-type]
        feed_retention_s=1,
        deliveries_retention_s=1,
        batch=10,
        interval_s=0,
        backlog_pause_s=0,
    )
    with captured_logs() as logs:
        loop = asyncio.create_task(retention.run())
        await asyncio.wait_for(store.done.wait(), 30)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    assert store.passes == 4
    assert [e["event"] for e in logs if e["event"].startswith("retention_")] == [
        "retention_pass_failed",
        "retention_pruned",
        "retention_pruned",
        "retention_pruned",
    ]


def test_retention_refuses_settings_that_would_delete_everything() -> None:
    with pytest.raises(ValueError):
        Retention(None, feed_retention_s=0, deliveries_retention_s=1, batch=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Retention(None, feed_retention_s=1, deliveries_retention_s=1, batch=0)  # type: ignore[arg-type]


# jobs in flight, per provider and owner


async def in_flight(
    store: TaskStore, owner: str, provider: str, state: State, *, slot: bool = False
) -> Task:
    """A task of ``owner`` and ``provider`` moved to ``state`` (in processing: holding a
    provider slot, as its step does once its inputs are ready, if ``slot``)."""
    task, _ = await store.create_task(new_task(owner, cost=1).with_changes(provider=provider))
    path = {
        State.PENDING: [],
        State.PROCESSING: [Event.START],
        State.AI_PROCESSING: [Event.START, Event.SUBMITTED],
        State.CANCELLED: [Event.CANCEL],
        State.FAILED: [Event.START, Event.FAIL],
    }[state]
    for n, event in enumerate(path, start=1):
        task = await advance(store, task, event, T0 + n)
    if slot:
        taken = task.with_changes(version=task.version + 1, holds_slot=True)
        assert await store.transition(taken, task.state, task.version, emit=False)
        task = taken
    assert task.state is state
    return task


async def test_count_active_counts_jobs_in_flight_per_provider_and_owner(
    store: TaskStore,
) -> None:
    alice = await user_with(store, 100, "alice")
    bob = await user_with(store, 100, "bob")
    for owner, provider, state, slot in [
        (alice, "sim", State.PROCESSING, True),  # inputs ready, submitting
        (alice, "sim", State.PROCESSING, False),  # still preparing its inputs: no slot
        (alice, "sim", State.AI_PROCESSING, False),
        (alice, "sim", State.PENDING, False),
        (alice, "sim", State.FAILED, False),
        (alice, "fal", State.AI_PROCESSING, False),
        (bob, "sim", State.AI_PROCESSING, False),
        (bob, "sim", State.CANCELLED, False),
    ]:
        await in_flight(store, owner, provider, state, slot=slot)
    assert await store.count_active("sim") == 3
    assert await store.count_active("sim", alice) == 2
    assert await store.count_active("sim", owner=bob) == 1
    assert await store.count_active("fal", alice) == 1
    assert await store.count_active("fal", bob) == 0
    assert await store.count_active("bfl") == 0


async def test_active_by_owner_gives_the_top_owners_most_first(store: TaskStore) -> None:
    owners = {name: await user_with(store, 100, name) for name in ("ann", "bea", "cy", "dee")}
    for name, provider, n in [
        ("ann", "sim", 1),
        ("bea", "sim", 3),
        ("cy", "sim", 1),
        ("cy", "fal", 2),
        ("dee", "fal", 1),
    ]:
        for _ in range(n):
            await in_flight(store, owners[name], provider, State.AI_PROCESSING)
    await in_flight(store, owners["dee"], "sim", State.PENDING)  # not in flight
    await in_flight(store, owners["dee"], "sim", State.FAILED)

    assert await store.active_by_owner("sim", 10) == {"bea": 3, "ann": 1, "cy": 1}
    assert list(await store.active_by_owner("sim", 10)) == ["bea", "ann", "cy"]  # ties by name
    assert await store.active_by_owner("sim", 2) == {"bea": 3, "ann": 1}
    assert await store.active_by_owner("fal", 10) == {"cy": 2, "dee": 1}
    everyone = await store.active_by_owner(None, 10)
    assert list(everyone.items()) == [("bea", 3), ("cy", 3), ("ann", 1), ("dee", 1)]
    assert await store.active_by_owner(None, 1) == {"bea": 3}
    assert await store.active_by_owner("bfl", 10) == {}


@pytest.mark.parametrize(
    "query",
    ["count_active", "count_active_owner", "active_by_owner", "active_by_owner_provider"],
)
async def test_jobs_in_flight_are_counted_through_the_partial_index(
    sqlite_store: SqliteStore, query: str
) -> None:
    """Their cost grows with the jobs in flight (the partial index holds only those), not with
    the table: every one of these goes through ``tasks_in_flight``."""
    plan = await sqlite_store.explain(query)
    reads = [line for line in plan if "tasks" in line]
    assert reads and all("INDEX tasks_in_flight" in line for line in reads), plan
