"""The change feed, the resumable Watcher and the Broadcaster, on every adapter's feed."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Callable

import pytest

from statemachine.errors import StoreError
from statemachine.feed import Broadcaster, Watcher
from statemachine.sqlite_feed import SqliteFeed
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, State
from statemachine.store import ChangeFeed, FeedEvent, TaskStore
from tests.contract.conftest import new_task, step, user_with
from tests.support.logs import captured_logs

GUARD_S = 30.0  # only against hangs: nothing here waits on time for its result


async def create_tasks(store: TaskStore, owner: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        task, _ = await store.create_task(new_task(owner, cost=1))
        ids.append(task.id)
    return ids


async def aclose(events: AsyncIterator[FeedEvent]) -> None:
    """End a subscription now (async generators clean up on aclose)."""
    closer = getattr(events, "aclose", None)
    if closer is not None:
        await closer()


async def aenumerate(events: AsyncIterator[FeedEvent]) -> AsyncIterator[tuple[int, FeedEvent]]:
    count = 0
    async for event in events:
        yield count, event
        count += 1


async def all_positions(store: TaskStore) -> list[str]:
    return [e.position for e in await store.feed_after(None, 100_000)]


class Collector:
    """A Watcher handler that records positions and signals when it has seen ``target``."""

    def __init__(self, fail_on: Callable[[FeedEvent], bool] = lambda e: False) -> None:
        self.positions: list[str] = []
        self.target: str | None = None
        self.reached = asyncio.Event()
        self._fail_on = fail_on

    async def __call__(self, event: FeedEvent) -> None:
        self.positions.append(event.position)
        if event.position == self.target:
            self.reached.set()
        if self._fail_on(event):
            raise RuntimeError(f"handler failed on {event.position}")

    async def wait_for(self, position: str | None) -> None:
        self.target = position
        if position in self.positions:
            return
        await asyncio.wait_for(self.reached.wait(), GUARD_S)


async def next_matching(
    events: AsyncIterator[FeedEvent], match: Callable[[FeedEvent], bool]
) -> FeedEvent:
    async def scan() -> FeedEvent:
        async for event in events:
            if match(event):
                return event
        raise AssertionError("the feed ended")

    return await asyncio.wait_for(scan(), GUARD_S)


# SqliteFeed


async def test_an_in_process_write_wakes_the_subscriber_without_polling(
    sqlite_store: SqliteStore,
) -> None:
    """With a one-hour poll, only the store's wake-up can deliver the second event."""
    owner = await user_with(sqlite_store, 100)
    [first] = await create_tasks(sqlite_store, owner, 1)
    events = SqliteFeed(sqlite_store, poll_interval_s=3600).subscribe(None)
    try:
        assert (await anext(events)).task_id == first
        # The generator is now parked on its wake-up event; this write must set it.
        waiting = asyncio.ensure_future(anext(events))
        [second] = await create_tasks(sqlite_store, owner, 1)
        event = await asyncio.wait_for(waiting, GUARD_S)
        assert (event.task_id, event.event) == (second, "created")
    finally:
        await aclose(events)
    assert sqlite_store.listener_count == 0


async def test_commits_landing_while_a_woken_subscriber_waits_are_read_at_once(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each watcher would read the feed after every commit; a woken subscriber waits its
    ``coalesce_s`` first, and what was committed meanwhile comes in the same read. The wait is
    held open by the test (no timing): the fake sleep returns when the test says so."""
    owner = await user_with(sqlite_store, 100)
    reads: list[int] = []
    real_read = sqlite_store.feed_after

    async def counted(after: str | None, limit: int) -> list[FeedEvent]:
        got = await real_read(after, limit)
        reads.append(len(got))
        return got

    monkeypatch.setattr(sqlite_store, "feed_after", counted)
    coalescing, release = asyncio.Event(), asyncio.Event()
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        if seconds == 0.123:  # the subscriber's coalescing wait
            coalescing.set()
            await release.wait()
        else:
            await real_sleep(seconds)

    monkeypatch.setattr("statemachine.sqlite_feed.asyncio.sleep", sleep)
    events = SqliteFeed(sqlite_store, poll_interval_s=3600, coalesce_s=0.123).subscribe(
        await sqlite_store.feed_head()
    )
    try:
        first = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(GUARD_S):  # its first read done: it waits for a wake-up
            while not reads:
                await real_sleep(0.01)
        ids = await create_tasks(sqlite_store, owner, 1)
        await asyncio.wait_for(coalescing.wait(), GUARD_S)  # woken, and waiting
        ids += await create_tasks(sqlite_store, owner, 2)
        release.set()
        got = [await asyncio.wait_for(first, GUARD_S)]
        got += [await asyncio.wait_for(anext(events), GUARD_S) for _ in range(2)]
    finally:
        await aclose(events)
    assert [e.task_id for e in got] == ids
    assert reads == [0, 3]  # the read before the wake-up, then one read for the three commits


def _create_in_other_process(path: str, owner: str) -> None:
    async def create() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            await store.create_task(new_task(owner, cost=1, task_id="from-another-process"))
        finally:
            await store.close()

    asyncio.run(create())


async def test_writes_of_another_process_arrive_by_polling(sqlite_store: SqliteStore) -> None:
    owner = await user_with(sqlite_store, 100)
    events = SqliteFeed(sqlite_store, poll_interval_s=0.02).subscribe(
        await sqlite_store.feed_head()
    )
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_create_in_other_process, args=(str(sqlite_store.path), owner))
    proc.start()
    try:
        event = await next_matching(events, lambda e: e.task_id == "from-another-process")
        assert event.dest is State.PENDING
    finally:
        await aclose(events)
        await asyncio.to_thread(proc.join, 60)
    assert proc.exitcode == 0


async def test_subscribe_replays_from_a_position_in_order(
    store: TaskStore, feed: ChangeFeed
) -> None:
    owner = await user_with(store, 100)
    await create_tasks(store, owner, 5)
    positions = await all_positions(store)
    events = feed.subscribe(positions[1])
    try:
        got = [(await asyncio.wait_for(anext(events), GUARD_S)).position for _ in range(3)]
    finally:
        await aclose(events)
    assert got == positions[2:]


# Watcher


async def test_watcher_resumes_from_its_saved_position_without_losing_events(
    store: TaskStore, feed: ChangeFeed
) -> None:
    owner = await user_with(store, 100)
    await create_tasks(store, owner, 7)
    first = Collector()
    watcher = Watcher("resume", feed, store, first, save_every=3)
    run = asyncio.create_task(watcher.run())
    await first.wait_for((await all_positions(store))[-1])
    watcher.stop()
    await asyncio.wait_for(run, GUARD_S)
    assert await store.load_position("resume") == first.positions[-1]

    await create_tasks(store, owner, 4)  # written while no watcher runs
    second = Collector()
    restarted = Watcher("resume", feed, store, second, save_every=3)
    run = asyncio.create_task(restarted.run())
    await second.wait_for((await all_positions(store))[-1])
    run.cancel()  # cancellation saves the position as well
    with pytest.raises(asyncio.CancelledError):
        await run
    assert first.positions + second.positions == await all_positions(store)
    assert await store.load_position("resume") == second.positions[-1]


@pytest.mark.parametrize("before", [0, 3], ids=["empty feed", "events before"])
async def test_a_watcher_starting_at_the_head_that_dies_unsaved_misses_nothing_after(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch, before: int
) -> None:
    """A watcher starting at the head (the outbox feeder, the dispatcher) saves that start at
    once: killed before its first periodic save, its next start used to take the head again,
    and the events between the two heads were never handled (outbound messages lost)."""
    owner = await user_with(sqlite_store, 100)
    await create_tasks(sqlite_store, owner, before)  # before the watcher: not its to replay
    head_at_start = len(await all_positions(sqlite_store))
    feed = SqliteFeed(sqlite_store, poll_interval_s=0.05)
    first = Collector()
    watcher = Watcher("outbox-like", feed, sqlite_store, first, start_at_head=True)
    run = asyncio.create_task(watcher.run())
    async with asyncio.timeout(GUARD_S):  # its start is saved before it reads anything
        while await sqlite_store.load_position("outbox-like") is None:
            await asyncio.sleep(0.01)
    await create_tasks(sqlite_store, owner, 2)
    await first.wait_for((await all_positions(sqlite_store))[-1])

    async def killed(*_: object) -> None:  # from now on nothing is saved: a SIGKILL
        return None

    monkeypatch.setattr(sqlite_store, "save_position", killed)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    monkeypatch.undo()

    await create_tasks(sqlite_store, owner, 2)  # written while no watcher runs
    second = Collector()
    restarted = Watcher("outbox-like", feed, sqlite_store, second, start_at_head=True)
    run = asyncio.create_task(restarted.run())
    await second.wait_for((await all_positions(sqlite_store))[-1])
    restarted.stop()
    await asyncio.wait_for(run, GUARD_S)
    # everything after the first start's head, the first run's events again (at least once)
    assert second.positions == (await all_positions(sqlite_store))[head_at_start:]


async def test_watcher_survives_a_failing_handler(store: TaskStore, feed: ChangeFeed) -> None:
    owner = await user_with(store, 100)
    ids = await create_tasks(store, owner, 4)
    handler = Collector(fail_on=lambda e: e.task_id == ids[1])
    watcher = Watcher("failing", feed, store, handler)
    with captured_logs() as logs:
        run = asyncio.create_task(watcher.run())
        await handler.wait_for((await all_positions(store))[-1])
        watcher.stop()
        await asyncio.wait_for(run, GUARD_S)
    assert handler.positions == await all_positions(store)
    failures = [entry for entry in logs if entry["event"] == "watcher.handler_failed"]
    assert len(failures) == 1 and failures[0]["task_id"] == ids[1]


class FlakyFeed:
    """Wraps a feed; the first subscription fails after ``good`` events (a dropped connection)."""

    def __init__(self, inner: ChangeFeed, good: int) -> None:
        self.inner = inner
        self.good = good
        self.subscriptions: list[str | None] = []

    async def subscribe(self, after: str | None) -> AsyncIterator[FeedEvent]:
        self.subscriptions.append(after)
        first = len(self.subscriptions) == 1
        events = self.inner.subscribe(after)
        try:
            async for count, event in aenumerate(events):
                if first and count == self.good:
                    raise StoreError("connection lost")
                yield event
        finally:
            await aclose(events)


async def test_watcher_resubscribes_after_a_feed_error_from_its_last_position(
    store: TaskStore, feed: ChangeFeed
) -> None:
    owner = await user_with(store, 100)
    await create_tasks(store, owner, 6)
    positions = await all_positions(store)
    flaky = FlakyFeed(feed, good=2)
    handler = Collector()
    watcher = Watcher("flaky", flaky, store, handler, retry_base_s=0.0)
    with captured_logs() as logs:
        run = asyncio.create_task(watcher.run())
        await handler.wait_for(positions[-1])
        watcher.stop()
        await asyncio.wait_for(run, GUARD_S)
    assert handler.positions == positions  # nothing lost, nothing twice
    assert flaky.subscriptions[:2] == [None, positions[1]]
    assert any(entry["event"] == "watcher.feed_failed" for entry in logs)


# Broadcaster


def feed_event(task_id: str, position: int) -> FeedEvent:
    return FeedEvent(
        str(position), task_id, "alice", State.PENDING, State.PROCESSING, "start", 0, 2
    )


async def test_broadcaster_fans_out_by_task_and_cleans_up() -> None:
    hub = Broadcaster(queue_size=8)
    async with hub.subscribe() as everything, hub.subscribe("a") as only_a:
        async with hub.subscribe("b") as only_b:
            assert hub.count == 3
            for i, task_id in enumerate(["a", "b", "a"]):
                await hub.publish(feed_event(task_id, i))
            assert [(await anext(everything)).position for _ in range(3)] == ["0", "1", "2"]
            assert [(await anext(only_a)).position for _ in range(2)] == ["0", "2"]
            assert (await anext(only_b)).position == "1"
        assert hub.count == 2
    assert hub.count == 0
    await hub.publish(feed_event("a", 9))  # nobody listens: nothing to do


async def test_a_slow_subscriber_is_dropped_without_blocking_the_others() -> None:
    hub = Broadcaster(queue_size=2)
    async with hub.subscribe() as fast, hub.subscribe() as slow:
        for i in range(4):
            await hub.publish(feed_event("a", i))
            assert (await anext(fast)).position == str(i)
        assert slow.dropped and not fast.dropped
        assert hub.count == 1
        assert [e async for e in slow] == []  # its iteration ends; it resumes by position
    assert hub.count == 0


async def test_close_ends_every_subscription() -> None:
    hub = Broadcaster()
    sub = hub.subscribe("a")
    hub.close()
    assert [e async for e in sub] == [] and not sub.dropped
    assert hub.count == 0


async def test_watcher_feeds_a_broadcaster_end_to_end(store: TaskStore, feed: ChangeFeed) -> None:
    owner = await user_with(store, 100)
    hub = Broadcaster()
    watcher = Watcher("sse", feed, store, hub.publish)
    run = asyncio.create_task(watcher.run())
    try:
        async with hub.subscribe() as events:
            [task_id] = await create_tasks(store, owner, 1)
            created = await next_matching(events, lambda e: e.task_id == task_id)
            task = await store.get_task(task_id)
            assert task is not None
            await store.transition(step(task, Event.START, task.created_at + 1), State.PENDING, 1)
            started = await next_matching(events, lambda e: e.task_id == task_id)
        assert (created.event, started.event) == ("created", "start")
    finally:
        watcher.stop()
        await asyncio.wait_for(run, GUARD_S)
    assert hub.count == 0


async def test_a_concurrent_watcher_never_saves_past_an_event_still_handled(
    store: TaskStore, feed: ChangeFeed
) -> None:
    owner = await user_with(store, 100)
    await create_tasks(store, owner, 8)
    positions = await all_positions(store)
    slow = positions[2]
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(event: FeedEvent) -> None:
        if event.position == slow:
            await release.wait()
        handled.append(event.position)

    watcher = Watcher("window", feed, store, handler, concurrency=4, save_every=1)
    run = asyncio.create_task(watcher.run())
    async with asyncio.timeout(GUARD_S):
        while len(handled) < 3:  # the events after the slow one, within the window
            await asyncio.sleep(0.01)
    assert slow not in handled
    assert watcher.position == positions[1]  # not past the one still being handled
    assert await store.load_position("window") == positions[1]
    release.set()
    async with asyncio.timeout(GUARD_S):
        while watcher.position != positions[-1]:
            await asyncio.sleep(0.01)
    watcher.stop()
    await asyncio.wait_for(run, GUARD_S)
    assert sorted(handled, key=positions.index) == positions
    assert await store.load_position("window") == positions[-1]
