"""The outbox feeder: a store that fails while messages are queued is tried again until it
answers (the watcher moves on only once the messages are stored), and a user over the pending
cap has the excess dropped and counted, never queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.outbound.feeder import OutboxFeeder
from statemachine.errors import Unavailable
from statemachine.outbox import Endpoint, Message
from statemachine.sqlite_outbox import SqliteOutbox
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.store import FeedEvent
from tests.support.factories import T0, make_task

pytestmark = pytest.mark.asyncio


class FlakyOutbox(SqliteOutbox):
    def __init__(self, store: SqliteStore, failures: int) -> None:
        super().__init__(store)
        self.failures = failures

    async def enqueue(self, messages: list[Message], *, max_pending: int) -> int:
        if self.failures:
            self.failures -= 1
            raise Unavailable("the store is down")
        return await super().enqueue(messages, max_pending=max_pending)


async def render(task: Any) -> dict[str, Any]:
    return {"id": task.id}


async def world(tmp_path: Path, failures: int = 0) -> tuple[SqliteStore, FlakyOutbox]:
    store = SqliteStore(tmp_path / "h.db")
    await store.open()
    outbox = FlakyOutbox(store, failures)
    await outbox.open()
    await store.create_user("alice", 100, is_admin=False, key_hash="k", now=T0)
    endpoint = Endpoint("whe_1", "alice", "https://h.example/x", ("task.*",), "whsec_x", T0)
    await outbox.add_endpoint(endpoint, max_per_owner=5)
    return store, outbox


def event(task_id: str, version: int) -> FeedEvent:
    return FeedEvent(
        str(version), task_id, "alice", State.PENDING, State.PROCESSING, "start", T0 + 1, version
    )


async def test_an_unavailable_store_delays_messages_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr("service.outbound.feeder.asyncio.sleep", no_sleep)
    store, outbox = await world(tmp_path, failures=3)
    task, _ = await store.create_task(make_task(owner="alice", now=T0))
    woken: list[int] = []
    feeder = OutboxFeeder(store, outbox, render, wake=lambda: woken.append(1))
    await feeder.handle(event(task.id, 2))
    assert outbox.failures == 0 and woken == [1]
    assert len(await outbox.task_messages(task.id, 10)) == 1
    await store.close()


async def test_a_user_over_the_pending_cap_loses_the_excess_counted(tmp_path: Path) -> None:
    store, outbox = await world(tmp_path)
    dropped: list[int] = []
    feeder = OutboxFeeder(
        store, outbox, render, wake=lambda: None, max_pending=2, on_dropped=dropped.append
    )
    task, _ = await store.create_task(make_task(owner="alice", now=T0))
    for version in (2, 3, 4):
        await feeder.handle(event(task.id, version))
    await feeder.handle(event(task.id, 2))  # a replayed event is not a drop
    assert len(await outbox.task_messages(task.id, 10)) == 2
    assert dropped == [1] and feeder.dropped == 1
    await store.close()
