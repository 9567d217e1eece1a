"""MongoStore beyond the contract suite: crash repair, the event log's buckets, indexes, errors.

The contract suite (tests/contract) proves the TaskStore behaviour on the fake and, with
HOOKLINE_TEST_MONGODB_URL, on a real server. Here: what only this adapter has — multi-write
operations made of single-document writes, each repairable after a crash at any step.
"""

from __future__ import annotations

import asyncio

import pytest

from statemachine import mongo_feed
from statemachine.errors import BadRequest, Conflict, InsufficientCredits, StoreError, Unavailable
from statemachine.mongo_store import MongoStore
from statemachine.states import Event, State
from statemachine.task import Task
from tests.contract.conftest import T0, key_hash, new_task, step, user_with
from tests.mongo.conftest import Crash, books_balance, crash_at, real_server

LATER = T0 + 3600  # past the repair grace period of every marker written at T0

CREATE_STEPS = [
    "create.debited",
    "create.task_inserted",
    "create.ledger_written",
    "create.event_emitted",
]
REFUND_STEPS = [
    "refund.task_updated",
    "refund.credited",
    "refund.ledger_written",
    "refund.event_emitted",
    "refund.marker_pulled",
]


async def visible(store: MongoStore, owner: str) -> list[str]:
    return [t.id for t in (await store.list_tasks(owner, None, 100, None)).items]


async def creation_events(store: MongoStore, task_id: str) -> int:
    events = await store.feed_after(None, 1000)
    return sum(1 for e in events if e.task_id == task_id and e.event == "created")


# crash repair: create


@pytest.mark.parametrize("crash_step", CREATE_STEPS)
async def test_a_create_crashing_after_any_write_is_completed_by_reconcile(
    store: MongoStore, crash_step: str
) -> None:
    owner = await user_with(store, 100)
    task = new_task(owner, cost=30)
    store.fault = crash_at(crash_step)
    with pytest.raises(Crash):
        await store.create_task(task)
    store.fault = None

    # Never a half-created task: either none is visible, or a fully debited one.
    if crash_step == "create.debited":
        assert await store.get_task(task.id) is None
        assert await visible(store, owner) == []
    assert await store.reconcile(T0) == 0, "a recent marker may belong to a live process"

    assert await store.reconcile(LATER) == 1
    assert await store.get_task(task.id) == task
    assert await visible(store, owner) == [task.id]
    assert [(e.kind, e.amount) for e in await store.ledger(owner)] == [
        ("grant", 100),
        ("debit", -30),
    ]
    assert (await store.get_user(owner)).balance == 70  # type: ignore[union-attr]
    assert await creation_events(store, task.id) >= 1
    await books_balance(store, owner)
    assert await store.reconcile(LATER) == 0, "nothing left to repair"


async def test_a_replay_after_a_crashed_create_charges_once(store: MongoStore) -> None:
    """The client retries with its Idempotency-Key after the server died mid-create: the retry
    creates the task; reconcile finds the dead attempt lost the key and gives its debit back."""
    owner = await user_with(store, 100)
    dead = new_task(owner, cost=30, key="k1")
    store.fault = crash_at("create.debited")
    with pytest.raises(Crash):
        await store.create_task(dead)
    store.fault = None
    retry = new_task(owner, cost=30, key="k1")
    task, created = await store.create_task(retry)
    assert (task.id, created) == (retry.id, True)
    assert (await store.get_user(owner)).balance == 40  # type: ignore[union-attr]

    assert await store.reconcile(LATER) == 1
    assert await store.get_task(dead.id) is None
    assert (await store.get_user(owner)).balance == 70  # type: ignore[union-attr]
    assert [e.task_id for e in await store.ledger(owner) if e.kind == "debit"] == [retry.id]
    assert await store.create_task(new_task(owner, cost=30, key="k1")) == (retry, False)
    await books_balance(store, owner)


async def test_a_task_id_taken_by_another_task_is_a_conflict_and_charges_nothing(
    store: MongoStore,
) -> None:
    owner = await user_with(store, 100)
    first, _ = await store.create_task(new_task(owner, cost=30))
    with pytest.raises(Conflict) as err:
        await store.create_task(new_task(owner, cost=30, task_id=first.id))
    assert err.value.code == "task_exists"
    assert (await store.get_user(owner)).balance == 70  # type: ignore[union-attr]
    await books_balance(store, owner)


async def test_insufficient_credits_leaves_no_marker_behind(store: MongoStore) -> None:
    owner = await user_with(store, 10)
    with pytest.raises(InsufficientCredits):
        await store.create_task(new_task(owner, cost=30))
    assert await store.reconcile(LATER) == 0
    assert await visible(store, owner) == []


# crash repair: refund


async def failing(store: MongoStore, owner: str) -> tuple[Task, Task]:
    """A stored processing task and its next record in failed (refunded=True)."""
    task, _ = await store.create_task(new_task(owner, cost=30))
    started = step(task, Event.START, T0 + 1)
    assert await store.transition(started, State.PENDING, 1)
    return started, step(started, Event.FAIL, T0 + 2, detail="provider down")


@pytest.mark.parametrize("crash_step", REFUND_STEPS)
async def test_a_refund_crashing_after_any_write_is_completed_by_reconcile(
    store: MongoStore, crash_step: str
) -> None:
    owner = await user_with(store, 100)
    started, failed = await failing(store, owner)
    store.fault = crash_at(crash_step)
    with pytest.raises(Crash):
        await store.transition(failed, State.PROCESSING, started.version)
    store.fault = None
    assert await store.get_task(failed.id) == failed  # the CAS itself is one write: it happened

    assert await store.reconcile(LATER) == 1
    assert [(e.kind, e.amount) for e in await store.ledger(owner)] == [
        ("grant", 100),
        ("debit", -30),
        ("refund", 30),
    ]
    assert (await store.get_user(owner)).balance == 100  # type: ignore[union-attr]
    events = [e for e in await store.feed_after(None, 100) if e.task_id == failed.id]
    assert events[-1].dest is State.FAILED
    assert await store.reconcile(LATER) == 0
    await books_balance(store, owner)


async def test_reconcile_racing_a_live_refund_credits_once(store: MongoStore) -> None:
    """Reconcile may run while the refunding process is merely slow: the refund guard on the
    user document lets only one credit through."""
    owner = await user_with(store, 100)
    started, failed = await failing(store, owner)

    def reconcile_midway(name: str) -> None:
        if name == "refund.task_updated":
            raise Crash(name)

    store.fault = reconcile_midway
    with pytest.raises(Crash):
        await store.transition(failed, State.PROCESSING, started.version)
    store.fault = None
    await store.reconcile(LATER)
    # The "slow" process now resumes its refund from where it stopped.
    await store._refund(failed, emit=False)
    assert (await store.get_user(owner)).balance == 100  # type: ignore[union-attr]
    await books_balance(store, owner)


async def test_a_grant_crashing_before_its_ledger_entry_is_recorded_by_reconcile(
    store: MongoStore,
) -> None:
    owner = await user_with(store, 100)
    store.fault = crash_at("grant.credited")
    with pytest.raises(Crash):
        await store.grant(owner, 25, T0 + 5)
    store.fault = None
    assert await store.reconcile(LATER) == 1
    assert [e.amount for e in await store.ledger(owner)] == [100, 25]
    await books_balance(store, owner)


async def test_a_completed_task_repaired_twice_is_charged_and_announced_once_each(
    store: MongoStore,
) -> None:
    owner = await user_with(store, 100)
    task = new_task(owner, cost=30)
    store.fault = crash_at("create.ledger_written")
    with pytest.raises(Crash):
        await store.create_task(task)
    store.fault = None
    assert await store.reconcile(LATER) == 1
    assert await store.reconcile(LATER) == 0
    assert [e.kind for e in await store.ledger(owner)] == ["grant", "debit"]


# the event log


async def test_events_span_buckets_in_order(
    store: MongoStore, mock_db: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small buckets, and a second store (another process) with a stale idea of the open bucket:
    positions still follow the writes, and reading from any position continues exactly."""
    monkeypatch.setattr(mongo_feed, "FEED_BUCKET_SIZE", 3)
    other = MongoStore(mock_db)  # type: ignore[arg-type]
    await other.open()
    owner = await user_with(store, 100)
    ids = []
    for i in range(10):
        task, _ = await (store if i % 3 else other).create_task(new_task(owner, cost=1))
        ids.append(task.id)
    events = await store.feed_after(None, 100)
    assert [e.task_id for e in events] == ids
    positions = [e.position for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 10
    assert [int(p) for p in positions] == sorted(int(p) for p in positions)
    assert await store.feed_after(positions[3], 4) == events[4:8]
    assert await store.feed_after(positions[-1], 10) == []
    assert await store.feed_head() == positions[-1]


async def test_an_empty_feed_has_no_head(store: MongoStore) -> None:
    assert await store.feed_head() is None
    assert await store.feed_after(None, 10) == []


async def test_a_bad_feed_position_is_a_bad_request(store: MongoStore) -> None:
    with pytest.raises(BadRequest) as err:
        await store.feed_after("not-a-number", 10)
    assert err.value.code == "invalid_position"


# schema and errors


async def test_open_creates_the_indexes_and_is_idempotent(store: MongoStore) -> None:
    await store.open()
    tasks = await store.db["tasks"].index_information()
    assert {"owner_created", "idempotency", "overdue", "refund_pending", "active_owner"} <= set(
        tasks
    )
    assert tasks["idempotency"]["unique"]
    assert tasks["active_owner"]["key"] == [("provider", 1), ("state", 1), ("owner", 1)]
    assert "active" not in tasks  # its prefix, dropped
    ledger = await store.db["ledger"].index_information()
    assert ledger["task_kind"]["unique"]
    deliveries = await store.db["deliveries"].index_information()
    assert deliveries["delivery"]["unique"]
    assert deliveries["ttl"]["expireAfterSeconds"] == 7 * 24 * 3600
    assert deliveries["at"]["key"] == [("at", 1)]
    feed = await store.db["feed"].index_information()
    assert feed["task"]["key"] == [("events.t", 1), ("_id", 1)]
    users = await store.db["users"].index_information()
    assert users["legacy_refunds"]["partialFilterExpression"] == {"refunds": {"$exists": True}}


async def test_open_drops_the_active_index_of_the_version_before(mock_db: object) -> None:
    await mock_db["tasks"].create_index([("provider", 1), ("state", 1)], name="active")  # type: ignore[index]
    store = MongoStore(mock_db)  # type: ignore[arg-type]
    await store.open()
    assert "active" not in await store.db["tasks"].index_information()


async def test_a_user_document_of_the_version_before_reads_the_default_limits(
    store: MongoStore,
) -> None:
    """Documents written before users had their own request limits lack the fields: None, the
    process's defaults."""
    old = {"_id": "old", "name": "old", "balance": 7, "is_admin": False, "created_at": T0}
    await store.db["users"].insert_one({**old, "seq": 0, "pending": []})
    await store.db["api_keys"].insert_one({"_id": key_hash("old"), "user": "old", "created_at": T0})
    user = await store.user_by_key_hash(key_hash("old"))
    assert user is not None and (user.name, user.balance) == ("old", 7)
    assert (user.rate_limit_per_s, user.rate_limit_burst) == (None, None)
    changed = await store.set_user_limits("old", rate_limit_per_s=3.0, rate_limit_burst=None)
    assert (changed.rate_limit_per_s, changed.rate_limit_burst, changed.balance) == (3.0, None, 7)
    assert await store.get_user("old") == changed


async def test_an_unreachable_server_is_unavailable() -> None:
    store = MongoStore.from_url("mongodb://127.0.0.1:9/hookline", timeout_s=0.2)
    assert store.db.name == "hookline"
    with pytest.raises(Unavailable):
        await store.ping()
    with pytest.raises(Unavailable):
        await store.get_task("t1")
    await store.close()


async def test_from_url_takes_the_database_from_the_url() -> None:
    store = MongoStore.from_url("mongodb://mongo:27017/tasks_db?replicaSet=rs0")
    assert store.db.name == "tasks_db"
    await store.close()


@real_server
async def test_crash_repair_on_a_real_server(real_store: MongoStore) -> None:
    owner = await user_with(real_store, 100)
    task = new_task(owner, cost=30)
    real_store.fault = crash_at("create.task_inserted")
    with pytest.raises(Crash):
        await real_store.create_task(task)
    real_store.fault = None
    assert await real_store.reconcile(LATER) == 1
    assert await real_store.get_task(task.id) == task
    await books_balance(real_store, owner)


async def test_without_an_event_log_changes_still_persist_but_feed_after_refuses(
    mock_db: object,
) -> None:
    """``event_log=False``: change streams are the only feed, so no ``feed`` writes at all."""
    store = MongoStore(mock_db, event_log=False)  # type: ignore[arg-type]
    await store.open()
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=30))
    started = step(task, Event.START, T0 + 1)
    assert await store.transition(started, State.PENDING, 1)
    assert await store.get_task(task.id) == started
    assert await store.db["feed"].count_documents({}) == 0
    with pytest.raises(StoreError):
        await store.feed_after(None, 10)
    await books_balance(store, owner)


async def test_a_replay_refused_for_credits_while_its_twin_is_in_flight_gets_the_task(
    store: MongoStore,
) -> None:
    """Concurrent retries with one key spend the balance between them: the one whose debit is
    refused waits for its twin to land and answers the replay, not InsufficientCredits."""
    owner = await user_with(store, 30)
    twin = new_task(owner, cost=30, key="k1")
    store.fault = crash_at("create.debited")
    with pytest.raises(Crash):
        await store.create_task(twin)  # in flight: debited, task not yet written

    retry = asyncio.create_task(store.create_task(new_task(owner, cost=30, key="k1")))
    await asyncio.sleep(0)  # the retry runs until it waits for its twin (the fake never blocks)
    assert not retry.done(), "refused for credits, it must wait rather than answer 402"
    await store.reconcile(LATER)  # the twin lands (here: completed by reconcile)
    assert await retry == (twin, False)
    await books_balance(store, owner)
