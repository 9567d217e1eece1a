"""MongoDB refunds without a growing user document: exactly once under crashes and stalls, and
user documents of the version before (with their ``refunds`` list) read and repaired.

The crash-at-every-step tests of refunds are in test_mongo_store.py; here: the document does not
grow, a process that stalls between its reads and its credit cannot credit twice, the marker pass
finishes a credited refund, and the legacy list is honoured, then emptied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import bson
import pytest
from pymongo import ReturnDocument

from statemachine.mongo_store import MongoStore
from statemachine.states import Event, State
from statemachine.task import Task
from tests.contract.conftest import T0, new_task, step, user_with
from tests.mongo.conftest import Crash, books_balance, crash_at, real_server

LATER = T0 + 3600


async def user_doc(store: MongoStore, owner: str) -> dict[str, Any]:
    doc = await store.db["users"].find_one({"_id": owner})
    assert doc is not None
    return dict(doc)


async def refunded(store: MongoStore, owner: str, cost: int = 1) -> Task:
    """A task created and cancelled (refunded), as the service does it."""
    task, _ = await store.create_task(new_task(owner, cost=cost))
    cancelled = step(task, Event.CANCEL, T0 + 1)
    assert await store.transition(cancelled, State.PENDING, 1)
    return cancelled


async def balance(store: MongoStore, owner: str) -> int:
    user = await store.get_user(owner)
    assert user is not None
    return user.balance


# the document does not grow


async def test_many_refunds_leave_the_user_document_as_it_was(store: MongoStore) -> None:
    """The old guard appended one key per refund to the user document: after a few hundred
    thousand refunds it reached MongoDB's 16 MB limit and every debit and refund of that user
    failed. Now the ledger entry is the durable record and the user keeps nothing."""
    owner = await user_with(store, 1000)
    await refunded(store, owner)  # the first refund: any one-off field exists from here on
    size = len(bson.encode(await user_doc(store, owner)))
    for _ in range(300):
        await refunded(store, owner)
    doc = await user_doc(store, owner)
    assert len(bson.encode(doc)) == size
    assert "refunds" not in doc and doc["pending"] == []
    assert await balance(store, owner) == 1000
    assert sum(1 for e in await store.ledger(owner) if e.kind == "refund") == 301
    await books_balance(store, owner)


# stalls and repairs


class StallBeforeCredit:
    """Wraps the users collection: the first fenced credit (a filter on ``seq``) waits until
    ``meanwhile`` ran — another process crediting the same refund and finishing it while this one
    stalled between its reads and its update."""

    def __init__(self, inner: Any, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._meanwhile: Callable[[], Awaitable[None]] | None = meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def find_one_and_update(self, filt: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if "seq" in filt and self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            await meanwhile()
        return await self._inner.find_one_and_update(filt, *args, **kwargs)


async def test_a_process_stalled_before_its_credit_cannot_credit_twice(
    store: MongoStore, mock_db: object
) -> None:
    """The stalled process read the user (no marker) and the ledger (no entry); meanwhile another
    process credits, records and pulls its marker: nothing on the user document names the refund
    any more, but ``seq`` moved, so the stalled update matches nothing and reads again."""
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=30))
    failed = step(task, Event.CANCEL, T0 + 1)
    store.fault = crash_at("refund.task_updated")
    with pytest.raises(Crash):
        await store.transition(failed, State.PENDING, 1)
    store.fault = None

    other = MongoStore(mock_db)  # type: ignore[arg-type]
    await other.open()

    async def other_process_refunds() -> None:
        assert await other.reconcile(LATER) == 1

    store._users = StallBeforeCredit(store._users, other_process_refunds)  # type: ignore[assignment]
    await store._refund(failed, emit=False)
    assert await balance(store, owner) == 100
    assert [e.kind for e in await store.ledger(owner)] == ["grant", "debit", "refund"]
    assert (await user_doc(store, owner))["pending"] == []
    await books_balance(store, owner)


async def test_a_credited_refund_whose_task_is_not_yet_due_is_finished_by_the_marker_pass(
    store: MongoStore,
) -> None:
    """The process died after the credit; the task was written again since (a silent update), so
    the task pass skips it for now. The marker on the user carries what the ledger entry needs."""
    owner = await user_with(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=30))
    failed = step(task, Event.CANCEL, T0 + 1)
    store.fault = crash_at("refund.credited")
    with pytest.raises(Crash):
        await store.transition(failed, State.PENDING, 1)
    store.fault = None
    touched = failed.with_changes(version=failed.version + 1, updated_at=LATER)
    assert await store.transition(touched, State.CANCELLED, failed.version, emit=False)

    assert await store.reconcile(LATER) == 1  # the marker: ledger entry written, marker pulled
    assert await balance(store, owner) == 100
    await books_balance(store, owner)
    assert await store.reconcile(LATER + 3600) == 1  # the task's flag: no second credit
    assert await balance(store, owner) == 100
    assert await store.reconcile(LATER + 3600) == 0
    assert (await store.db["tasks"].find_one({"_id": task.id}, {"refund_pending": 1})) == {
        "_id": task.id
    }
    await books_balance(store, owner)


# user documents of the version before


async def legacy_user(store: MongoStore, credits: int) -> str:
    """A user as the version before created it: with an (empty) ``refunds`` list."""
    owner = await user_with(store, credits)
    await store.db["users"].update_one({"_id": owner}, {"$set": {"refunds": []}})
    return owner


async def refunded_the_old_way(store: MongoStore, task: Task, *, ledger: bool, flag: bool) -> Task:
    """What the version before wrote for a refund of ``task``: the CAS with the flag, the credit
    with ``$addToSet: {refunds: key}``, then (unless it crashed) the ledger entry, then the flag
    cleared."""
    cancelled = step(task, Event.CANCEL, T0 + 1)
    store.fault = crash_at("refund.task_updated")
    with pytest.raises(Crash):
        await store.transition(cancelled, task.state, task.version)
    store.fault = None
    key = f"refund:{task.id}"
    user = await store.db["users"].find_one_and_update(
        {"_id": task.owner, "refunds": {"$ne": key}},
        {"$inc": {"balance": task.cost, "seq": 1}, "$addToSet": {"refunds": key}},
        return_document=ReturnDocument.AFTER,
    )
    assert user is not None
    if ledger:
        await store.db["ledger"].insert_one(
            {
                "_id": key,
                "user": task.owner,
                "kind": "refund",
                "amount": task.cost,
                "at": cancelled.updated_at,
                "task_id": task.id,
                "seq": user["seq"],
            }
        )
    if not flag:
        await store.db["tasks"].update_one({"_id": task.id}, {"$unset": {"refund_pending": ""}})
    return cancelled


async def test_refunds_of_the_version_before_are_honoured_repaired_and_emptied(
    store: MongoStore,
) -> None:
    owner = await legacy_user(store, 100)
    tasks = [(await store.create_task(new_task(owner, cost=10)))[0] for _ in range(4)]
    done = await refunded_the_old_way(store, tasks[0], ledger=True, flag=False)
    half = await refunded_the_old_way(store, tasks[1], ledger=False, flag=True)  # died mid-way
    assert await balance(store, owner) == 80
    doc = await user_doc(store, owner)
    assert doc["refunds"] == [f"refund:{done.id}", f"refund:{half.id}"]

    # A refund attempted again (a stalled old-version process, a repair) credits nothing.
    await store._refund(done, emit=False)
    assert await balance(store, owner) == 80
    # A new refund of this user goes the new way: credited, not added to the list.
    new = step(tasks[2], Event.CANCEL, T0 + 2)
    assert await store.transition(new, State.PENDING, 1)
    assert await balance(store, owner) == 90
    assert (await user_doc(store, owner))["refunds"] == [
        f"refund:{done.id}",
        f"refund:{half.id}",
    ]

    # Reconcile: the half-done one gets its ledger entry and its event, not a second credit;
    # the list loses every key whose refund is recorded.
    assert await store.reconcile(LATER) == 1
    assert await balance(store, owner) == 90
    refunds = {e.task_id for e in await store.ledger(owner) if e.kind == "refund"}
    assert refunds == {done.id, half.id, new.id}
    events = [e for e in await store.feed_after(None, 100) if e.task_id == half.id]
    assert events[-1].dest is State.CANCELLED
    assert (await user_doc(store, owner))["refunds"] == []
    assert await store.reconcile(LATER) == 0
    assert "refunds" not in await user_doc(store, owner)  # out of the legacy index too
    await books_balance(store, owner)

    # From here on the user is like any other; the old keys stay honoured through the ledger.
    await store._refund(half, emit=False)
    last = step(tasks[3], Event.CANCEL, T0 + 3)
    assert await store.transition(last, State.PENDING, 1)
    assert await balance(store, owner) == 100
    await books_balance(store, owner)


async def test_a_legacy_key_waits_while_its_refund_repair_is_not_due(store: MongoStore) -> None:
    """A key whose ledger entry is missing is dropped only after the repair wrote it, else a
    repair would find neither the key nor the entry and credit again."""
    owner = await legacy_user(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=10))
    half = await refunded_the_old_way(store, task, ledger=False, flag=True)
    assert await store.reconcile(T0) == 0  # the flag is recent: not repaired, key kept
    assert (await user_doc(store, owner))["refunds"] == [f"refund:{half.id}"]
    assert await store.reconcile(LATER) == 1
    assert await balance(store, owner) == 100
    assert (await user_doc(store, owner))["refunds"] == []
    await books_balance(store, owner)


async def test_a_legacy_key_of_a_task_that_is_gone_is_dropped(store: MongoStore) -> None:
    owner = await legacy_user(store, 100)
    await store.db["users"].update_one({"_id": owner}, {"$set": {"refunds": ["refund:gone"]}})
    await store.reconcile(LATER)
    assert (await user_doc(store, owner))["refunds"] == []


async def test_emptying_a_legacy_list_moves_the_fence(store: MongoStore) -> None:
    """A credit that read the user while the key was still listed must fail its update once the
    key is pulled (else, having also seen no ledger entry yet, it would credit again)."""
    owner = await legacy_user(store, 100)
    task, _ = await store.create_task(new_task(owner, cost=10))
    await refunded_the_old_way(store, task, ledger=True, flag=False)
    before = (await user_doc(store, owner))["seq"]
    await store.reconcile(LATER)
    assert (await user_doc(store, owner))["seq"] == before + 1


@real_server
async def test_refunds_leave_the_user_document_as_it_was_on_a_real_server(
    real_store: MongoStore,
) -> None:
    owner = await user_with(real_store, 100)
    await refunded(real_store, owner)
    size = len(bson.encode(await user_doc(real_store, owner)))
    for _ in range(20):
        await refunded(real_store, owner)
    assert len(bson.encode(await user_doc(real_store, owner))) == size
    await books_balance(real_store, owner)
