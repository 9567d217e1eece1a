"""The MongoDB event log under retention, with small buckets: whole full buckets go, never the
newest nor a partial one; reads continue past deleted buckets; a writer with a stale idea of the
open bucket never writes into a deleted one; one task's events are read bucket by bucket; watcher
positions that are change-stream tokens do not hold the log. The contract suite
(tests/contract/test_retention_contract.py) covers what every adapter does."""

from __future__ import annotations

import pytest

from statemachine import mongo_feed
from statemachine.errors import StoreError
from statemachine.mongo_feed import saved_event_number, token_to_position
from statemachine.mongo_store import MongoStore
from statemachine.states import Event, State
from statemachine.store import FeedEvent
from tests.contract.conftest import T0, new_task, step, user_with

FAR_FUTURE = T0 + 10**9
TOKEN = {"_data": "8265A1B2C3000000012B022C0100296E5A1004"}


@pytest.fixture(autouse=True)
def buckets_of_three(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mongo_feed, "FEED_BUCKET_SIZE", 3)


async def creations(store: MongoStore, owner: str, n: int, at: float = T0) -> list[FeedEvent]:
    for i in range(n):
        await store.create_task(new_task(owner, cost=1, created_at=at + i))
    return await store.feed_after(None, 1000)


async def bucket_ids(store: MongoStore) -> list[int]:
    return [d["_id"] for d in await store.db["feed"].find({}, {"_id": 1}).sort("_id").to_list(None)]


async def test_whole_full_buckets_go_never_the_newest_nor_a_partial_one(
    store: MongoStore,
) -> None:
    owner = await user_with(store, 100)
    feed = await creations(store, owner, 8)  # buckets 0 [1-3], 1 [4-6], 2 [7-8] open
    assert await store.prune_feed(FAR_FUTURE, 3) == 3  # one bucket's worth
    assert await bucket_ids(store) == [1, 2]
    assert await store.prune_feed(FAR_FUTURE, 100) == 3
    assert await bucket_ids(store) == [2]
    assert await store.prune_feed(FAR_FUTURE, 100) == 0, "the open bucket holds the head"
    assert await store.feed_after(None, 100) == feed[6:]
    assert await store.feed_head() == feed[-1].position

    feed = await creations(store, owner, 1)  # bucket 2 is full now, but still the newest
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    assert len(feed) == 3


async def test_a_batch_below_a_bucket_still_prunes_one_bucket(store: MongoStore) -> None:
    owner = await user_with(store, 100)
    await creations(store, owner, 7)
    assert await store.prune_feed(FAR_FUTURE, 1) == 3
    assert await bucket_ids(store) == [1, 2]


async def test_a_bucket_with_one_recent_event_or_one_a_watcher_needs_is_kept(
    store: MongoStore,
) -> None:
    owner = await user_with(store, 100)
    feed = await creations(store, owner, 9)  # buckets 0, 1, 2, each full
    await creations(store, owner, 1, at=T0 + 100)  # bucket 3, the newest
    assert await store.prune_feed(T0 + 4, 100) == 3  # bucket 1 holds T0+5: it stops there
    await store.save_position("dispatcher", feed[4].position)  # inside bucket 1
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    await store.save_position("dispatcher", feed[5].position)  # bucket 1 handled in full
    assert await store.prune_feed(FAR_FUTURE, 100) == 3
    assert await bucket_ids(store) == [2, 3]


async def test_a_change_stream_position_does_not_hold_the_event_log(store: MongoStore) -> None:
    owner = await user_with(store, 100)
    await creations(store, owner, 7)
    await store.save_position("dispatcher", token_to_position(TOKEN))
    assert await store.prune_feed(FAR_FUTURE, 100) == 6


def test_what_a_saved_position_says_about_the_event_log() -> None:
    assert saved_event_number(token_to_position(TOKEN)) is None
    assert saved_event_number("0000000000000042") == 42
    assert saved_event_number("garbage") == 0


async def test_a_stale_writer_never_reopens_a_deleted_bucket(
    store: MongoStore, mock_db: object
) -> None:
    """Another process last wrote to bucket 0; retention deleted it since. Its next event must
    go to the newest bucket (an upsert of bucket 0 would put it before every retained event,
    where no reader looks)."""
    stale = MongoStore(mock_db)  # type: ignore[arg-type]
    await stale.open()
    owner = await user_with(store, 100)
    await stale.create_task(new_task(owner, cost=1))
    feed = await creations(store, owner, 6)  # buckets 0, 1 full; 2 open
    assert await store.prune_feed(FAR_FUTURE, 3) == 3
    task, _ = await stale.create_task(new_task(owner, cost=1))
    after = await store.feed_after(feed[-1].position, 10)
    assert [e.task_id for e in after] == [task.id]
    assert await bucket_ids(store) == [1, 2]
    assert await store.feed_head() == after[0].position


async def test_reads_from_a_deleted_bucket_continue_at_the_oldest_left(store: MongoStore) -> None:
    owner = await user_with(store, 100)
    feed = await creations(store, owner, 8)
    await store.prune_feed(FAR_FUTURE, 3)
    assert await store.feed_after(None, 100) == feed[3:]
    assert await store.feed_after(feed[1].position, 2) == feed[3:5]


async def test_one_tasks_events_are_read_across_buckets(store: MongoStore) -> None:
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=1))
    feed = await creations(store, owner, 7)  # the task's creation alone in bucket 0 …
    started = step(task, Event.START, T0 + 50)
    assert await store.transition(started, State.PENDING, 1)  # … its start in bucket 2
    feed = await store.feed_after(None, 100)
    mine = [e for e in feed if e.task_id == task.id]
    assert len(mine) == 2 and mine[1].position == feed[-1].position
    assert await store.task_feed_after(task.id, None, 10) == mine
    assert await store.task_feed_after(task.id, None, 1) == mine[:1]
    assert await store.task_feed_after(task.id, mine[0].position, 10) == mine[1:]
    assert await store.task_feed_after(task.id, feed[4].position, 10) == mine[1:]

    assert await store.prune_feed(FAR_FUTURE, 3) == 3  # bucket 0, with the creation
    with pytest.raises(StoreError) as raised:
        await store.task_feed_after(task.id, mine[0].position, 10)
    assert raised.value.code == "feed_pruned"
    assert await store.task_feed_after(task.id, feed[2].position, 10) == mine[1:]


async def test_without_an_event_log_there_is_nothing_to_prune_or_replay(mock_db: object) -> None:
    store = MongoStore(mock_db, event_log=False)  # type: ignore[arg-type]
    await store.open()
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=1))
    assert await store.prune_feed(FAR_FUTURE, 100) == 0
    with pytest.raises(StoreError):
        await store.task_feed_after(task.id, "0", 10)
