"""The TaskStore contract, run against every adapter (see conftest.ADAPTERS)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from statemachine.errors import (
    BadRequest,
    Conflict,
    InsufficientCredits,
    NotFound,
    StoreError,
    Unavailable,
)
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Task
from tests.contract.conftest import T0, key_hash, new_task, step, user_with


async def feed_of(store: TaskStore, task_id: str) -> list[tuple[State | None, State, str, int]]:
    events = await store.feed_after(None, 10_000)
    return [(e.source, e.dest, e.event, e.version) for e in events if e.task_id == task_id]


async def pending_task(store: TaskStore, credits: int = 100, cost: int = 10) -> Task:
    owner = await user_with(store, credits)
    task, created = await store.create_task(new_task(owner, cost=cost))
    assert created
    return task


# compare-and-set


async def test_50_coroutines_racing_one_transition_have_exactly_one_winner(
    store: TaskStore,
) -> None:
    task = await pending_task(store)
    attempts = [step(task, Event.START, T0 + 1, detail=f"racer {i}") for i in range(50)]
    results = await asyncio.gather(*(store.transition(a, State.PENDING, 1) for a in attempts))
    assert results.count(True) == 1
    winner = attempts[results.index(True)]
    stored = await store.get_task(task.id)
    assert stored == winner
    assert stored is not None and len(stored.history) == 1
    assert await feed_of(store, task.id) == [
        (None, State.PENDING, "created", 1),
        (State.PENDING, State.PROCESSING, "start", 2),
    ]


def _race_in_process(
    path: str, task_id: str, barrier: Any, results: multiprocessing.Queue[tuple[int, bool]]
) -> None:
    async def race() -> bool:
        store = SqliteStore(path)
        await store.open()
        try:
            task = await store.get_task(task_id)
            assert task is not None
            attempt = step(task, Event.START, T0 + 1, detail=f"pid {os.getpid()}")
            await asyncio.to_thread(barrier.wait, 60)
            return await store.transition(attempt, State.PENDING, 1)
        finally:
            await store.close()

    results.put((os.getpid(), asyncio.run(race())))


async def test_4_processes_racing_one_transition_have_exactly_one_winner(
    sqlite_store: SqliteStore,
) -> None:
    task = await pending_task(sqlite_store)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results: multiprocessing.Queue[tuple[int, bool]] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_race_in_process, args=(str(sqlite_store.path), task.id, barrier, results)
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [await asyncio.to_thread(results.get, True, 120) for _ in procs]
    for p in procs:
        await asyncio.to_thread(p.join, 60)
        assert p.exitcode == 0
    winners = [pid for pid, won in outcomes if won]
    assert len(winners) == 1
    stored = await sqlite_store.get_task(task.id)
    assert stored is not None and stored.version == 2
    assert [h.detail for h in stored.history] == [f"pid {winners[0]}"]
    assert len(await feed_of(sqlite_store, task.id)) == 2


async def test_a_lost_race_writes_nothing(store: TaskStore) -> None:
    task = await pending_task(store)
    first = step(task, Event.START, T0 + 1)
    assert await store.transition(first, State.PENDING, 1)
    head = await store.feed_head()
    stale = step(task, Event.CANCEL, T0 + 2)  # decided on the old record
    assert not await store.transition(stale, State.PENDING, 1)
    assert await store.get_task(task.id) == first
    assert await store.feed_head() == head
    user = await store.get_user(task.owner)
    assert user is not None and user.balance == 90  # the stale cancel refunded nothing


async def test_transition_of_an_unknown_task_is_a_lost_race(store: TaskStore) -> None:
    ghost = step(new_task("nobody"), Event.START, T0)
    assert not await store.transition(ghost, State.PENDING, 1)
    assert await store.get_task(ghost.id) is None


async def test_transition_requires_the_next_version(store: TaskStore) -> None:
    task = await pending_task(store)
    skipping = step(task, Event.START, T0 + 1).with_changes(version=3)
    with pytest.raises(ValueError, match="version"):
        await store.transition(skipping, State.PENDING, 1)
    assert await store.get_task(task.id) == task


async def test_emit_false_writes_no_feed_event(store: TaskStore) -> None:
    task = await pending_task(store)
    head = await store.feed_head()
    renewed = task.with_changes(version=2, lease_owner="w1", lease_expires=T0 + 60)
    assert await store.transition(renewed, State.PENDING, 1, emit=False)
    assert await store.feed_head() == head
    assert await store.get_task(task.id) == renewed


async def test_a_write_failing_midway_leaves_the_old_record_and_no_event(
    sqlite_store: SqliteStore,
) -> None:
    """Task update, feed event and refund are one transaction; a failed feed insert undoes all of
    it, and only that write: another write committed in the same batch survives."""
    task = await pending_task(sqlite_store)
    with sqlite3.connect(sqlite_store.path) as conn:
        conn.execute(
            "CREATE TRIGGER fail_feed BEFORE INSERT ON feed_events"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    failing = step(task, Event.CANCEL, T0 + 1)
    outcome, balance = await asyncio.gather(
        sqlite_store.transition(failing, State.PENDING, 1),
        sqlite_store.grant(task.owner, 5, T0 + 1),
        return_exceptions=True,
    )
    assert isinstance(outcome, StoreError)
    assert isinstance(outcome.__cause__, sqlite3.Error)
    assert balance == 95  # the grant went through; the refund did not
    assert await sqlite_store.get_task(task.id) == task
    assert [e.task_id for e in await sqlite_store.feed_after(None, 100)] == [task.id]
    assert [e.kind for e in await sqlite_store.ledger(task.owner)] == ["grant", "debit", "grant"]


# creation, idempotency, credits


async def test_idempotent_create_under_20_concurrent_retries_charges_once(
    store: TaskStore,
) -> None:
    owner = await user_with(store, 100)
    retries = [new_task(owner, cost=10, key="k1", request_hash="body-1") for _ in range(20)]
    results = await asyncio.gather(*(store.create_task(t) for t in retries))
    assert len({task.id for task, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    user = await store.get_user(owner)
    assert user is not None and user.balance == 90
    assert [e.kind for e in await store.ledger(owner)] == ["grant", "debit"]
    page = await store.list_tasks(owner, None, 100, None)
    assert len(page.items) == 1


async def test_same_key_other_body_is_a_conflict_and_charges_nothing(store: TaskStore) -> None:
    owner = await user_with(store, 100)
    first, _ = await store.create_task(new_task(owner, key="k1", request_hash="body-1"))
    with pytest.raises(Conflict) as raised:
        await store.create_task(new_task(owner, key="k1", request_hash="body-2"))
    assert raised.value.code == "idempotency_conflict"
    user = await store.get_user(owner)
    assert user is not None and user.balance == 90
    assert [t.id for t in (await store.list_tasks(owner, None, 10, None)).items] == [first.id]


async def test_the_same_key_of_another_owner_is_another_task(store: TaskStore) -> None:
    alice, bob = await user_with(store, 100), await user_with(store, 100)
    a, created_a = await store.create_task(new_task(alice, key="k1"))
    b, created_b = await store.create_task(new_task(bob, key="k1"))
    assert created_a and created_b and a.id != b.id


async def test_insufficient_credits_writes_nothing(store: TaskStore) -> None:
    owner = await user_with(store, 5)
    head = await store.feed_head()
    task = new_task(owner, cost=10, key="k1")
    with pytest.raises(InsufficientCredits):
        await store.create_task(task)
    assert await store.get_task(task.id) is None
    assert await store.feed_head() == head
    user = await store.get_user(owner)
    assert user is not None and user.balance == 5
    assert [e.kind for e in await store.ledger(owner)] == ["grant"]
    # The key was not consumed: a retry after a top-up creates the task.
    await store.grant(owner, 5, T0)
    _, created = await store.create_task(new_task(owner, cost=10, key="k1"))
    assert created


async def test_create_for_an_unknown_user_is_not_found(store: TaskStore) -> None:
    with pytest.raises(NotFound):
        await store.create_task(new_task("nobody"))


async def test_create_emits_a_creation_event(store: TaskStore) -> None:
    task = await pending_task(store)
    [event] = await store.feed_after(None, 10)
    assert (event.task_id, event.owner, event.source, event.dest) == (
        task.id,
        task.owner,
        None,
        State.PENDING,
    )
    assert (event.event, event.version, event.at) == ("created", 1, task.created_at)


async def test_refund_happens_once_when_two_writers_race(store: TaskStore) -> None:
    task = await pending_task(store, credits=100, cost=30)
    fail = step(task, Event.FAIL, T0 + 1, detail="reaper")
    cancel = step(task, Event.CANCEL, T0 + 1, detail="user")
    results = await asyncio.gather(
        store.transition(fail, State.PENDING, 1), store.transition(cancel, State.PENDING, 1)
    )
    assert sorted(results) == [False, True]
    user = await store.get_user(task.owner)
    assert user is not None and user.balance == 100
    # A later write of the refunded record (a second refund attempt) credits nothing.
    done = await store.get_task(task.id)
    assert done is not None and done.refunded
    again = done.with_changes(version=done.version + 1)
    assert await store.transition(again, done.state, done.version, emit=False)
    user = await store.get_user(task.owner)
    assert user is not None and user.balance == 100
    kinds = [(e.kind, e.amount, e.task_id) for e in await store.ledger(task.owner)]
    assert kinds == [("grant", 100, None), ("debit", -30, task.id), ("refund", 30, task.id)]


async def test_completed_tasks_are_not_refunded(store: TaskStore) -> None:
    task = await pending_task(store, credits=50, cost=20)
    for event, source in (
        (Event.START, State.PENDING),
        (Event.SUBMITTED, State.PROCESSING),
        (Event.AI_SUCCEEDED, State.AI_PROCESSING),
        (Event.FINISHED, State.WATERMARKING),
    ):
        nxt = step(task, event, T0 + task.version)
        assert await store.transition(nxt, source, task.version)
        task = nxt
    user = await store.get_user(task.owner)
    assert user is not None and user.balance == 30


async def test_balance_equals_the_sum_of_the_ledger(store: TaskStore) -> None:
    owner = await user_with(store, 100)
    assert await store.grant(owner, 25, T0) == 125
    tasks = [(await store.create_task(new_task(owner, cost=c)))[0] for c in (10, 20, 30)]
    await store.transition(step(tasks[0], Event.FAIL, T0 + 1), State.PENDING, 1)
    await store.transition(step(tasks[1], Event.START, T0 + 1), State.PENDING, 1)
    ledger = await store.ledger(owner)
    user = await store.get_user(owner)
    assert user is not None
    assert user.balance == sum(e.amount for e in ledger) == 125 - 20 - 30
    assert [e.kind for e in ledger] == ["grant", "grant", "debit", "debit", "debit", "refund"]
    assert all(e.user == owner for e in ledger)


# users and keys


async def test_users_keys_and_grants(store: TaskStore) -> None:
    user = await store.create_user("alice", 10, is_admin=True, key_hash=key_hash("k1"), now=T0)
    assert (user.name, user.balance, user.is_admin) == ("alice", 10, True)
    assert await store.get_user("alice") == user
    assert await store.user_by_key_hash(key_hash("k1")) == user
    assert await store.user_by_key_hash(key_hash("other")) is None
    assert await store.get_user("bob") is None
    with pytest.raises(Conflict):
        await store.create_user("alice", 0, is_admin=False, key_hash=key_hash("k2"), now=T0)
    await store.add_api_key("alice", key_hash("k2"), T0)
    found = await store.user_by_key_hash(key_hash("k2"))
    assert found is not None and found.name == "alice"
    with pytest.raises(NotFound):
        await store.grant("bob", 5, T0)
    with pytest.raises(NotFound):
        await store.add_api_key("bob", key_hash("k3"), T0)
    assert await store.grant("alice", 5, T0) == 15


async def test_a_user_without_credits_has_an_empty_ledger(store: TaskStore) -> None:
    user = await store.create_user("carol", 0, is_admin=False, key_hash=key_hash("k"), now=T0)
    assert user.balance == 0 and not user.is_admin
    assert await store.ledger("carol") == []


async def test_a_users_own_rate_limits_round_trip_and_none_means_the_defaults(
    store: TaskStore,
) -> None:
    plain = await store.create_user("alice", 5, is_admin=False, key_hash=key_hash("a"), now=T0)
    assert (plain.rate_limit_per_s, plain.rate_limit_burst) == (None, None)
    limited = await store.create_user(
        "bob",
        5,
        is_admin=False,
        key_hash=key_hash("b"),
        now=T0,
        rate_limit_per_s=1.5,
        rate_limit_burst=3,
    )
    # rate 0 (no limit) is a value of its own, not the default; a burst alone leaves the rate
    unlimited = await store.create_user(
        "carol", 5, is_admin=False, key_hash=key_hash("c"), now=T0, rate_limit_per_s=0.0
    )
    burst_only = await store.create_user(
        "dave", 5, is_admin=False, key_hash=key_hash("d"), now=T0, rate_limit_burst=7
    )
    expected = {
        "alice": (None, None),
        "bob": (1.5, 3),
        "carol": (0.0, None),
        "dave": (None, 7),
    }
    for user, key in ((plain, "a"), (limited, "b"), (unlimited, "c"), (burst_only, "d")):
        assert (user.rate_limit_per_s, user.rate_limit_burst) == expected[user.name]
        assert await store.get_user(user.name) == user
        assert await store.user_by_key_hash(key_hash(key)) == user


async def test_a_users_limits_are_replaced_and_reset_to_the_defaults(store: TaskStore) -> None:
    await store.create_user(
        "alice", 5, is_admin=True, key_hash=key_hash("a"), now=T0, rate_limit_per_s=1.0
    )
    changed = await store.set_user_limits("alice", rate_limit_per_s=20.0, rate_limit_burst=40)
    assert (changed.rate_limit_per_s, changed.rate_limit_burst) == (20.0, 40)
    assert (changed.name, changed.balance, changed.is_admin) == ("alice", 5, True)
    assert await store.user_by_key_hash(key_hash("a")) == changed
    reset = await store.set_user_limits("alice", rate_limit_per_s=None, rate_limit_burst=None)
    assert (reset.rate_limit_per_s, reset.rate_limit_burst) == (None, None)
    assert await store.get_user("alice") == reset
    with pytest.raises(NotFound):
        await store.set_user_limits("bob", rate_limit_per_s=1.0, rate_limit_burst=1)
    assert await store.get_user("bob") is None


async def test_a_sqlite_file_of_the_version_before_opens_and_its_users_read_the_defaults(
    tmp_path: Path,
) -> None:
    """A database made before users had their own limits gains the columns on ``open``; its rows
    read None (the process's defaults) and take limits from then on."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE users (name TEXT PRIMARY KEY, balance INTEGER NOT NULL,
                                is_admin INTEGER NOT NULL, created_at REAL NOT NULL);
            CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, user TEXT NOT NULL,
                                   created_at REAL NOT NULL);
            """
        )
        conn.execute("INSERT INTO users VALUES ('old', 7, 0, ?)", (T0,))
        conn.execute("INSERT INTO api_keys VALUES (?, 'old', ?)", (key_hash("old"), T0))
    conn.close()
    for _ in range(2):  # opening again finds the columns there and adds nothing
        store = SqliteStore(path)
        await store.open()
        try:
            old = await store.user_by_key_hash(key_hash("old"))
            assert old is not None and (old.name, old.balance) == ("old", 7)
            assert (old.rate_limit_per_s, old.rate_limit_burst) == (None, None)
            assert await store.get_user("old") == old
        finally:
            await store.close()
    store = SqliteStore(path)
    await store.open()
    try:
        new = await store.create_user(
            "new", 0, is_admin=False, key_hash=key_hash("new"), now=T0, rate_limit_burst=9
        )
        assert await store.get_user("new") == new
        changed = await store.set_user_limits("old", rate_limit_per_s=2.0, rate_limit_burst=None)
        assert await store.user_by_key_hash(key_hash("old")) == changed
        assert (changed.rate_limit_per_s, changed.balance) == (2.0, 7)
    finally:
        await store.close()


# listing


async def test_pagination_is_stable_while_tasks_are_inserted(store: TaskStore) -> None:
    owner = await user_with(store, 10_000)
    # Three tasks per timestamp: the id breaks ties.
    originals = [new_task(owner, cost=1, created_at=T0 + i // 3) for i in range(25)]
    for task in originals:
        await store.create_task(task)
    seen: list[str] = []
    cursor: str | None = None
    for page_number in range(100):
        page = await store.list_tasks(owner, None, 4, cursor)
        seen.extend(t.id for t in page.items)
        # Newer tasks arrive between pages, some at the newest timestamp already listed.
        await store.create_task(new_task(owner, cost=1, created_at=T0 + 100 + page_number))
        await store.create_task(new_task(owner, cost=1, created_at=T0 + 8))
        cursor = page.next
        if cursor is None:
            break
    newest_first = sorted(originals, key=lambda t: (t.created_at, t.id), reverse=True)
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in {t.id for t in originals}] == [t.id for t in newest_first]


async def test_list_filters_by_owner_and_state(store: TaskStore) -> None:
    alice, bob = await user_with(store, 100), await user_with(store, 100)
    a1, _ = await store.create_task(new_task(alice, created_at=T0 + 1))
    a2, _ = await store.create_task(new_task(alice, created_at=T0 + 2))
    b1, _ = await store.create_task(new_task(bob, created_at=T0 + 3))
    await store.transition(step(a1, Event.START, T0 + 4), State.PENDING, 1)
    assert [t.id for t in (await store.list_tasks(alice, None, 10, None)).items] == [a2.id, a1.id]
    processing = await store.list_tasks(alice, State.PROCESSING, 10, None)
    assert [t.id for t in processing.items] == [a1.id] and processing.next is None
    everyone = await store.list_tasks(None, State.PENDING, 10, None)
    assert [t.id for t in everyone.items] == [b1.id, a2.id]
    assert (await store.list_tasks(bob, State.FAILED, 10, None)).items == []


async def test_a_malformed_cursor_is_a_bad_request(store: TaskStore) -> None:
    with pytest.raises(BadRequest):
        await store.list_tasks(None, None, 10, "not a cursor!")


async def test_count_by_state_and_tasks_since(store: TaskStore) -> None:
    alice, bob = await user_with(store, 100), await user_with(store, 100)
    a1, _ = await store.create_task(new_task(alice, created_at=T0))
    a2, _ = await store.create_task(new_task(alice, created_at=T0 + 10))
    b1, _ = await store.create_task(new_task(bob, created_at=T0 + 20))
    await store.transition(step(a1, Event.CANCEL, T0 + 30), State.PENDING, 1)
    counts = await store.count_by_state(alice)
    assert counts[State.PENDING] == 1 and counts[State.CANCELLED] == 1
    assert sum(counts.values()) == 2
    everyone = await store.count_by_state(None)
    assert everyone[State.PENDING] == 2 and everyone[State.COMPLETED] == 0
    assert [t.id for t in await store.tasks_since(T0 + 10, None)] == [a2.id, b1.id]
    assert [t.id for t in await store.tasks_since(T0, alice)] == [a1.id, a2.id]


# the reaper's query


async def test_overdue_returns_non_terminal_tasks_due_earliest_first(store: TaskStore) -> None:
    owner = await user_with(store, 1000)
    due = {}
    for i, deadline in enumerate([T0 + 5, T0 + 1, T0 + 3, T0 + 50, T0 + 2]):
        task, _ = await store.create_task(new_task(owner, cost=1).with_changes(deadline=deadline))
        due[i] = task
    # A terminal task with a stale deadline field must not come back.
    cancelled = step(due[1], Event.CANCEL, T0).with_changes(deadline=T0 - 100)
    assert await store.transition(cancelled, State.PENDING, 1)
    # A processing task that is overdue does.
    started = step(due[3], Event.START, T0).with_changes(deadline=T0 + 4)
    assert await store.transition(started, State.PENDING, 1)
    found = await store.overdue(T0 + 5, 10)
    assert [(t.id, t.deadline) for t in found] == [
        (due[4].id, T0 + 2),
        (due[2].id, T0 + 3),
        (due[3].id, T0 + 4),
        (due[0].id, T0 + 5),
    ]
    assert [t.id for t in await store.overdue(T0 + 5, 2)] == [due[4].id, due[2].id]
    assert await store.overdue(T0, 10) == []


async def test_overdue_goes_through_the_partial_deadline_index(sqlite_store: SqliteStore) -> None:
    plan = " | ".join(await sqlite_store.explain_overdue())
    assert "USING INDEX tasks_overdue" in plan, plan
    assert "SCAN tasks" not in plan.replace("USING INDEX", ""), plan
    assert "TEMP B-TREE" not in plan, plan  # the index gives the order too


async def test_task_by_job_finds_the_live_task_holding_a_job(store: TaskStore) -> None:
    owner = await user_with(store, 1000)
    task, _ = await store.create_task(new_task(owner, cost=1))
    started = step(task, Event.START, T0)
    assert await store.transition(started, State.PENDING, 1)
    submitted = step(started, Event.SUBMITTED, T0 + 1).with_changes(
        provider="openai", provider_job_id="resp_1"
    )
    assert await store.transition(submitted, State.PROCESSING, 2)
    found = await store.task_by_job("openai", "resp_1")
    assert found is not None and found.id == task.id
    assert await store.task_by_job("sim", "resp_1") is None  # another provider's job
    assert await store.task_by_job("openai", "resp_2") is None
    failed = step(submitted, Event.FAIL, T0 + 2)
    assert await store.transition(failed, State.AI_PROCESSING, 3)
    assert await store.task_by_job("openai", "resp_1") is None  # only live tasks


async def test_task_by_job_goes_through_an_index(sqlite_store: SqliteStore) -> None:
    plan = " | ".join(await sqlite_store.explain("task_by_job"))
    assert "USING INDEX tasks_job" in plan, plan


# webhook deliveries


async def test_deliveries_are_recorded_once(store: TaskStore) -> None:
    assert not await store.seen_delivery("sim", "d1")
    assert await store.record_delivery("sim", "d1", "t1", T0)
    assert not await store.record_delivery("sim", "d1", "t1", T0 + 1)
    assert await store.seen_delivery("sim", "d1")
    assert not await store.seen_delivery("fal", "d1")
    assert await store.record_delivery("fal", "d1", "t1", T0)
    results = await asyncio.gather(
        *(store.record_delivery("bfl", "d9", "t", T0) for _ in range(10))
    )
    assert results.count(True) == 1


# the feed


async def test_feed_positions_are_ordered_and_resumable(store: TaskStore) -> None:
    assert await store.feed_head() is None
    assert await store.feed_after(None, 10) == []
    task = await pending_task(store)
    nxt = step(task, Event.START, T0 + 1)
    await store.transition(nxt, State.PENDING, 1)
    await store.transition(step(nxt, Event.SUBMITTED, T0 + 2), State.PROCESSING, 2)
    events = await store.feed_after(None, 10)
    assert [(e.event, e.version) for e in events] == [
        ("created", 1),
        ("start", 2),
        ("submitted", 3),
    ]
    assert await store.feed_head() == events[-1].position
    assert await store.feed_after(events[0].position, 10) == events[1:]
    assert await store.feed_after(events[0].position, 1) == events[1:2]
    assert await store.feed_after(events[-1].position, 10) == []


async def test_watcher_positions_are_saved_and_overwritten(store: TaskStore) -> None:
    assert await store.load_position("dispatcher") is None
    await store.save_position("dispatcher", "7")
    await store.save_position("dispatcher", "9")
    await store.save_position("sse", "3")
    assert await store.load_position("dispatcher") == "9"
    assert await store.load_position("sse") == "3"


async def test_ping_and_reconcile(store: TaskStore) -> None:
    await store.ping()
    assert await store.reconcile(T0) == 0


# SQLite specifics


async def test_a_closed_sqlite_store_is_unavailable(sqlite_store: SqliteStore) -> None:
    await sqlite_store.close()
    with pytest.raises(Unavailable):
        await sqlite_store.ping()
    await sqlite_store.open()  # the fixture closes it again
    await sqlite_store.ping()


async def test_a_bad_feed_position_is_a_bad_request(sqlite_store: SqliteStore) -> None:
    with pytest.raises(BadRequest):
        await sqlite_store.feed_after("not-a-number", 10)


async def test_opening_twice_is_harmless(sqlite_store: SqliteStore) -> None:
    await sqlite_store.open()
    other = SqliteStore(sqlite_store.path)
    await other.open()  # the schema already exists
    try:
        await other.ping()
    finally:
        await other.close()


def test_sqlite_urls() -> None:
    assert SqliteStore.from_url("sqlite:///var/hookline.db").path == Path("var/hookline.db")
    assert SqliteStore.from_url("sqlite:////abs/path.db").path == Path("/abs/path.db")
    for bad in ("sqlite:///", "mongodb://x/db", "sqlite://relative.db"):
        with pytest.raises(ValueError):
            SqliteStore.from_url(bad)
