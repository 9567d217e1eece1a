"""The Outbox port's contract, run against every adapter (SQLite; MongoDB through mongomock, and a
real replica set when HOOKLINE_TEST_MONGODB_URL is set): endpoints and their limits, owners'
secrets with rotation, idempotent enqueue, exclusive claims with leases, settling only by the
lease's holder, attempts kept bounded, replay, depth and retention."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace

import pytest

from statemachine.errors import Conflict, NotFound
from statemachine.mongo_outbox import MongoOutbox
from statemachine.outbox import DeliveryAttempt, Endpoint, Message, Outbox, message_id
from statemachine.sqlite_outbox import QUERIES, SqliteOutbox
from statemachine.sqlite_store import SqliteStore
from statemachine.store import TaskStore
from tests.support.factories import T0

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def outbox(store: TaskStore) -> Outbox:
    box: Outbox = (
        SqliteOutbox(store) if isinstance(store, SqliteStore) else MongoOutbox(store.db)  # type: ignore[attr-defined]
    )
    await box.open()
    await box.open()  # idempotent
    return box


def endpoint(owner: str = "alice", n: int = 1, **changes: object) -> Endpoint:
    made = Endpoint(
        id=f"whe_{owner}_{n}",
        owner=owner,
        url=f"https://hooks.example.com/{n}",
        events=("task.completed",),
        secret="whsec_one",
        created_at=T0 + n,
    )
    return replace(made, **changes)  # type: ignore[arg-type]


def message(task_id: str = "tsk_1", version: int = 5, **changes: object) -> Message:
    made = Message(
        id=message_id("whe_alice_1", task_id, version),
        owner="alice",
        task_id=task_id,
        event="task.completed",
        endpoint_id="whe_alice_1",
        url="https://hooks.example.com/1",
        body=b'{"type":"task.completed"}',
        created_at=T0,
        queued_at=T0,
        next_at=T0,
    )
    return replace(made, **changes)  # type: ignore[arg-type]


def attempt(m: Message, number: int, at: float, **changes: object) -> DeliveryAttempt:
    made = DeliveryAttempt(message_id=m.id, number=number, at=at, latency_ms=3.5, status_code=500)
    return replace(made, **changes)  # type: ignore[arg-type]


async def test_endpoints_are_listed_per_owner_and_limited(outbox: Outbox) -> None:
    await outbox.add_endpoint(endpoint("alice", 1), max_per_owner=2)
    await outbox.add_endpoint(endpoint("alice", 2, events=("task.*",)), max_per_owner=2)
    await outbox.add_endpoint(endpoint("bob", 1), max_per_owner=2)
    with pytest.raises(Conflict) as caught:
        await outbox.add_endpoint(endpoint("alice", 3), max_per_owner=2)
    assert caught.value.code == "too_many_webhooks"
    mine = await outbox.endpoints("alice")
    assert [e.id for e in mine] == ["whe_alice_1", "whe_alice_2"]
    assert mine[1].events == ("task.*",)
    assert await outbox.get_endpoint("whe_bob_1") == endpoint("bob", 1)
    assert not await outbox.delete_endpoint("bob", "whe_alice_1")  # not bob's
    assert await outbox.delete_endpoint("alice", "whe_alice_1")
    assert await outbox.get_endpoint("whe_alice_1") is None


async def test_rotation_keeps_the_old_secret_signing_until_the_overlap_ends(outbox: Outbox) -> None:
    await outbox.add_endpoint(endpoint(), max_per_owner=5)
    rotated = await outbox.rotate_endpoint("alice", "whe_alice_1", "whsec_two", T0 + 100)
    assert rotated.secret == "whsec_two"
    assert rotated.signing_secrets(T0 + 99) == ("whsec_two", "whsec_one")
    assert rotated.signing_secrets(T0 + 100) == ("whsec_two",)
    assert await outbox.get_endpoint("whe_alice_1") == rotated
    with pytest.raises(NotFound):
        await outbox.rotate_endpoint("bob", "whe_alice_1", "whsec_x", T0)


async def test_a_disabled_endpoint_wants_nothing(outbox: Outbox) -> None:
    await outbox.add_endpoint(endpoint(), max_per_owner=5)
    await outbox.disable_endpoint("whe_alice_1", "gone", T0 + 5)
    await outbox.disable_endpoint("whe_alice_1", "later", T0 + 9)  # the first reason stays
    found = await outbox.get_endpoint("whe_alice_1")
    assert found is not None
    assert (found.disabled_at, found.disabled_reason) == (T0 + 5, "gone")
    assert not found.wants("task.completed")


async def test_an_owner_secret_rotates_with_an_overlap(outbox: Outbox) -> None:
    assert await outbox.owner_secret("alice") is None
    await outbox.set_owner_secret("alice", "whsec_a", T0, overlap_s=60)
    first = await outbox.owner_secret("alice")
    assert first is not None and first.signing_secrets(T0) == ("whsec_a",)
    await outbox.set_owner_secret("alice", "whsec_b", T0 + 10, overlap_s=60)
    second = await outbox.owner_secret("alice")
    assert second is not None
    assert second.signing_secrets(T0 + 69) == ("whsec_b", "whsec_a")
    assert second.signing_secrets(T0 + 70) == ("whsec_b",)


async def test_enqueue_is_idempotent_by_message_id(outbox: Outbox) -> None:
    assert await outbox.enqueue([message(), message(version=6)], max_pending=1000) == 2
    assert await outbox.enqueue([message(), message(version=7)], max_pending=1000) == 1
    assert await outbox.enqueue([], max_pending=1000) == 0
    assert [m.id for m in await outbox.task_messages("tsk_1", 10)] == [
        message(version=v).id for v in (5, 6, 7)
    ]
    stored = await outbox.get_message(message().id)
    assert stored == message()


async def test_a_claim_leases_due_messages_to_one_worker(outbox: Outbox) -> None:
    due, later = message(version=1), message(version=2, next_at=T0 + 50)
    await outbox.enqueue([due, later], max_pending=1000)
    first = await outbox.claim(T0 + 1, "w1", lease_s=30, limit=10, per_destination=100)
    assert [m.id for m in first] == [due.id]
    assert first[0].lease_owner == "w1" and first[0].lease_expires == T0 + 31
    assert (
        await outbox.claim(T0 + 2, "w2", lease_s=30, limit=10, per_destination=100) == []
    )  # leased
    # the lease expired (its worker died): another worker takes it
    again = await outbox.claim(T0 + 31, "w2", lease_s=30, limit=10, per_destination=100)
    assert [m.id for m in again] == [due.id]
    late = attempt(due, 1, T0 + 32)
    assert not await outbox.settle(first[0], "w1", late, "delivered", keep_attempts=5)
    stored = await outbox.get_message(due.id)
    assert stored is not None and stored.state == "pending"


async def test_concurrent_claims_never_share_a_message(outbox: Outbox) -> None:
    await outbox.enqueue([message(version=v) for v in range(40)], max_pending=1000)
    batches = await asyncio.gather(
        *(outbox.claim(T0 + 1, f"w{i}", lease_s=30, limit=7, per_destination=100) for i in range(8))
    )
    claimed = [m.id for batch in batches for m in batch]
    assert len(claimed) == len(set(claimed)) == 40


async def test_settling_records_the_attempt_and_moves_the_message(outbox: Outbox) -> None:
    m = message()
    await outbox.enqueue([m], max_pending=1000)
    (claimed,) = await outbox.claim(T0 + 1, "w1", lease_s=30, limit=1, per_destination=100)
    retry = attempt(m, 1, T0 + 1, next_retry_at=T0 + 6, error="HTTP 500")
    assert await outbox.settle(claimed, "w1", retry, "pending", keep_attempts=5)
    stored = await outbox.get_message(m.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.next_at, stored.lease_owner) == (
        "pending",
        1,
        T0 + 6,
        None,
    )
    assert (stored.last_status, stored.last_error) == (500, "HTTP 500")
    assert (
        await outbox.claim(T0 + 5, "w1", lease_s=30, limit=1, per_destination=100) == []
    )  # not due yet
    (claimed,) = await outbox.claim(T0 + 6, "w1", lease_s=30, limit=1, per_destination=100)
    done = attempt(m, 2, T0 + 6, status_code=204)
    assert await outbox.settle(claimed, "w1", done, "delivered", keep_attempts=5)
    stored = await outbox.get_message(m.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.settled_at, stored.next_at) == (
        "delivered",
        2,
        T0 + 6,
        None,
    )
    assert await outbox.attempts(m.id) == [retry, done]
    assert await outbox.claim(T0 + 100, "w1", lease_s=30, limit=1, per_destination=100) == []


async def test_only_the_newest_attempts_are_kept(outbox: Outbox) -> None:
    m = message()
    await outbox.enqueue([m], max_pending=1000)
    for n in range(1, 8):
        (claimed,) = await outbox.claim(T0 + n, "w", lease_s=30, limit=1, per_destination=100)
        a = attempt(m, n, T0 + n, next_retry_at=T0 + n + 1)
        assert await outbox.settle(claimed, "w", a, "pending", keep_attempts=3)
    assert [a.number for a in await outbox.attempts(m.id)] == [5, 6, 7]


async def test_a_replay_queues_a_settled_message_again_with_its_id(outbox: Outbox) -> None:
    m = message()
    await outbox.enqueue([m], max_pending=1000)
    (claimed,) = await outbox.claim(T0 + 1, "w", lease_s=30, limit=1, per_destination=100)
    await outbox.settle(claimed, "w", attempt(m, 1, T0 + 1), "failed", keep_attempts=5)
    assert await outbox.replay("msg_missing", T0) is None
    replayed = await outbox.replay(m.id, T0 + 500)
    assert replayed is not None
    assert (replayed.id, replayed.state, replayed.next_at, replayed.queued_at) == (
        m.id,
        "pending",
        T0 + 500,
        T0 + 500,
    )
    assert replayed.body == m.body and replayed.attempts == 1
    assert [
        c.id for c in await outbox.claim(T0 + 500, "w", lease_s=30, limit=5, per_destination=100)
    ] == [m.id]


async def test_depth_counts_unsettled_messages_and_the_oldest(outbox: Outbox) -> None:
    assert (await outbox.depth()).pending == 0
    await outbox.enqueue(
        [message(version=1, created_at=T0 + 3), message(version=2)], max_pending=1000
    )
    depth = await outbox.depth()
    assert (depth.pending, depth.oldest_created_at) == (2, T0)


async def test_retention_forgets_settled_messages_only(outbox: Outbox) -> None:
    settled, pending = message(version=1), message(version=2)
    await outbox.enqueue([settled, pending], max_pending=1000)
    claimed = await outbox.claim(T0 + 1, "w", lease_s=30, limit=1, per_destination=100)
    done = attempt(settled, 1, T0 + 1)
    await outbox.settle(claimed[0], "w", done, "delivered", keep_attempts=5)
    assert await outbox.prune(T0 + 1, limit=10) == 0  # settled at T0+1, not before
    assert await outbox.prune(T0 + 2, limit=10) == 1
    assert await outbox.get_message(settled.id) is None
    assert await outbox.attempts(settled.id) == []
    assert await outbox.get_message(pending.id) is not None


async def test_sqlite_queries_use_their_indexes(sqlite_store: SqliteStore, outbox: Outbox) -> None:
    conn = sqlite3.connect(sqlite_store.path)
    try:
        for name, (sql, args) in QUERIES.items():
            plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (name, plan)
            assert "SCAN outbox" not in plan or "USING INDEX" in plan, (name, plan)
    finally:
        conn.close()


async def test_the_retention_pass_prunes_settled_messages(store: TaskStore, outbox: Outbox) -> None:
    from statemachine.retention import Retention

    settled = message(version=1)
    await outbox.enqueue([settled, message(version=2)], max_pending=1000)
    (claimed,) = await outbox.claim(T0 + 1, "w", lease_s=30, limit=1, per_destination=100)
    await outbox.settle(claimed, "w", attempt(settled, 1, T0 + 1), "failed", keep_attempts=5)
    retention = Retention(
        store,
        feed_retention_s=3600,
        deliveries_retention_s=3600,
        batch=10,
        outbox=outbox,
        outbox_retention_s=60,
    )
    assert (await retention.run_pass(T0 + 30)).messages == 0
    assert (await retention.run_pass(T0 + 62)).messages == 1
    assert (await outbox.depth()).pending == 1


async def test_a_destination_holds_at_most_its_share_of_live_sends(outbox: Outbox) -> None:
    slow = [message(version=v, url="https://slow.example/h") for v in range(6)]
    fast = [message(version=10 + v, url="https://fast.example/h", next_at=T0 + 1) for v in range(2)]
    await outbox.enqueue(slow + fast, max_pending=1000)
    first = await outbox.claim(T0 + 2, "w1", lease_s=30, limit=10, per_destination=2)
    urls = sorted(m.url for m in first)
    assert urls == ["https://fast.example/h"] * 2 + ["https://slow.example/h"] * 2
    # the two slow sends still hold their leases: another worker gets none of slow's
    assert await outbox.claim(T0 + 3, "w2", lease_s=30, limit=10, per_destination=2) == []
    done = first[-1] if first[-1].url.startswith("https://slow") else first[0]
    await outbox.settle(done, "w1", attempt(done, 1, T0 + 4), "delivered", keep_attempts=5)
    (next_one,) = await outbox.claim(T0 + 4, "w2", lease_s=30, limit=10, per_destination=2)
    assert next_one.url == "https://slow.example/h"


async def test_an_owner_over_the_pending_cap_gets_no_new_messages(outbox: Outbox) -> None:
    assert await outbox.enqueue([message(version=v) for v in range(3)], max_pending=4) == 3
    assert await outbox.enqueue([message(version=v) for v in range(3, 6)], max_pending=4) == 1
    assert (await outbox.depth()).pending == 4
    other = message(version=1, owner="bob", id="msg_bob")
    assert await outbox.enqueue([other], max_pending=4) == 1  # another owner is not affected


async def test_a_message_being_sent_is_not_replayed(outbox: Outbox) -> None:
    m = message()
    await outbox.enqueue([m], max_pending=10)
    await outbox.claim(T0 + 1, "w", lease_s=30, limit=1, per_destination=2)
    with pytest.raises(Conflict) as caught:
        await outbox.replay(m.id, T0 + 2)
    assert caught.value.code == "delivery_in_flight"
    assert (await outbox.replay(m.id, T0 + 31)) is not None  # the lease ran out: replayable
