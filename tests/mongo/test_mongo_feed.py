"""The MongoDB change feed: pure parts on canned change documents, the subscribe loop on a
scripted stream (history lost → scan → fresh stream), and real change streams on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mongomock_motor import AsyncMongoMockClient
from pymongo.errors import AutoReconnect, OperationFailure

from statemachine.mongo_feed import (
    MongoChangeFeed,
    event_from_change,
    history_lost,
    position_to_token,
    resumable,
    retry_delay_s,
    synthetic_event,
    token_to_position,
)
from statemachine.mongo_store import MongoStore
from statemachine.states import Event, State
from statemachine.store import FeedEvent
from tests.contract.conftest import T0, new_task, step, user_with
from tests.mongo.conftest import real_server
from tests.support.logs import captured_logs

GUARD_S = 30.0  # only against hangs

TOKEN = {"_data": "8265A1B2C3000000012B022C0100296E5A1004"}
ENTRY = {"from": "pending", "to": "processing", "event": "start", "at": T0 + 1}


def change(kind: str, **fields: Any) -> dict[str, Any]:
    return {"_id": TOKEN, "operationType": kind, "documentKey": {"_id": "t1"}, **fields}


# pure parts


def test_a_resume_token_round_trips_through_its_position() -> None:
    position = token_to_position(TOKEN)
    assert isinstance(position, str)
    assert position_to_token(position) == TOKEN


@pytest.mark.parametrize("position", [None, "0000000000000005", "{not json", '{"a": 1}', "[]"])
def test_a_position_that_is_not_a_token_resumes_nothing(position: str | None) -> None:
    assert position_to_token(position) is None


def test_an_insert_is_a_creation_event() -> None:
    doc = {"_id": "t1", "owner": "alice", "state": "pending", "created_at": T0, "version": 1}
    event = event_from_change(change("insert", fullDocument=doc))
    assert event == FeedEvent(
        token_to_position(TOKEN), "t1", "alice", None, State.PENDING, "created", T0, 1
    )


@pytest.mark.parametrize(
    "updated",
    [
        {"version": 2, "state": "processing", "history.0": ENTRY},  # an appended element
        {"version": 2, "state": "processing", "history": [ENTRY]},  # the array set whole
    ],
)
def test_an_update_with_a_new_history_entry_is_that_transition(updated: dict[str, Any]) -> None:
    full = {"_id": "t1", "owner": "alice", "version": 3}  # updateLookup may be newer: not used
    event = event_from_change(
        change("update", updateDescription={"updatedFields": updated}, fullDocument=full)
    )
    assert event is not None
    assert (event.source, event.dest, event.event, event.at, event.version, event.owner) == (
        State.PENDING,
        State.PROCESSING,
        "start",
        T0 + 1,
        2,
        "alice",
    )


def test_the_latest_of_several_appended_entries_is_the_event() -> None:
    later = {"from": "processing", "to": "ai_processing", "event": "submitted", "at": T0 + 2}
    updated = {"version": 3, "history.0": ENTRY, "history.1": later}
    event = event_from_change(change("update", updateDescription={"updatedFields": updated}))
    assert event is not None and event.dest is State.AI_PROCESSING and event.owner == ""


@pytest.mark.parametrize(
    "updated",
    [
        {"lease_owner": "w1", "lease_expires": T0 + 60},  # no version: bookkeeping
        {"version": 4, "lease_owner": "w1"},  # a claim: no new history entry
        {"version": 4, "history.2": ENTRY, "feed_silent": 4},  # written with emit=False
    ],
)
def test_updates_that_are_not_transitions_are_skipped(updated: dict[str, Any]) -> None:
    assert event_from_change(change("update", updateDescription={"updatedFields": updated})) is None


def test_deletes_and_other_operations_are_skipped() -> None:
    assert event_from_change(change("delete")) is None
    assert event_from_change(change("drop")) is None


def test_a_synthetic_event_describes_the_current_state() -> None:
    doc = {
        "_id": "t1",
        "owner": "a",
        "state": "processing",
        "version": 2,
        "updated_at": T0 + 1,
        "history": [ENTRY],
    }
    event = synthetic_event(doc, "P")
    assert (event.position, event.source, event.dest, event.event) == (
        "P",
        State.PENDING,
        State.PROCESSING,
        "start",
    )
    bare = synthetic_event({**doc, "state": "pending", "history": []}, "P")
    assert (bare.source, bare.event) == (None, "created")


def test_the_fallback_decision() -> None:
    assert history_lost(OperationFailure("history lost", 286))
    assert history_lost(OperationFailure("fatal", 280))
    assert history_lost(OperationFailure("bad token", 260))
    assert not history_lost(OperationFailure("interrupted", 11601))
    assert not history_lost(AutoReconnect("gone"))
    assert resumable(AutoReconnect("primary stepped down"))
    labelled = OperationFailure("x", 11602, {"errorLabels": ["ResumableChangeStreamError"]})
    assert resumable(labelled)
    assert not resumable(OperationFailure("unauthorized", 13))


def test_retry_delays_grow_and_are_capped() -> None:
    delays = [retry_delay_s(n, 0.2, 1.0) for n in range(1, 6)]
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0]


# the subscribe loop, on a scripted stream


class ScriptedStream:
    def __init__(self, changes: list[dict[str, Any]], start: dict[str, Any]) -> None:
        self._changes = changes
        self.resume_token = start

    async def __aenter__(self) -> ScriptedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        for item in self._changes:
            yield item
        await asyncio.Event().wait()  # a live stream: nothing more, ever


class ScriptedTasks:
    """The tasks collection of the fake, plus ``watch``: resuming fails as if the oplog had
    rolled past the token; a fresh stream then delivers one scripted change."""

    def __init__(self, collection: Any, fresh: list[dict[str, Any]]) -> None:
        self._collection = collection
        self._fresh = fresh
        self.watches: list[dict[str, Any] | None] = []

    def find(self, *args: Any, **kwargs: Any) -> Any:
        return self._collection.find(*args, **kwargs)

    async def watch(self, **kwargs: Any) -> ScriptedStream:
        self.watches.append(kwargs.get("resume_after"))
        if kwargs.get("resume_after") is not None:
            raise OperationFailure("resume point no longer in the oplog", 286)
        return ScriptedStream(self._fresh, {"_data": "FRESH"})


async def test_a_lost_resume_token_falls_back_to_a_scan_then_a_fresh_stream() -> None:
    db = AsyncMongoMockClient()["hookline_feed"]
    store = MongoStore(db)
    await store.open()
    owner = await user_with(store, 100)
    waiting, _ = await store.create_task(new_task(owner, cost=1))
    done, _ = await store.create_task(new_task(owner, cost=1))
    started = step(done, Event.START, T0 + 1)
    await store.transition(started, State.PENDING, 1)
    finished = step(started, Event.FAIL, T0 + 2)
    await store.transition(finished, State.PROCESSING, 2)
    later = {"version": 2, "history.0": ENTRY}
    tasks = ScriptedTasks(
        db["tasks"], [change("update", updateDescription={"updatedFields": later})]
    )
    feed = MongoChangeFeed({"tasks": tasks})  # type: ignore[arg-type]

    events = feed.subscribe(token_to_position(TOKEN))
    with captured_logs() as logs:
        got = [await asyncio.wait_for(anext(events), GUARD_S) for _ in range(2)]
    await events.aclose()  # type: ignore[attr-defined]

    fresh = token_to_position({"_data": "FRESH"})
    assert got[0] == FeedEvent(fresh, waiting.id, owner, None, State.PENDING, "created", T0, 1)
    assert got[1].position == token_to_position(TOKEN) and got[1].dest is State.PROCESSING
    assert tasks.watches == [TOKEN, None]
    assert any(entry["event"] == "mongo_feed.history_lost" for entry in logs)


# real change streams


async def _subscribe_from_now(store: MongoStore) -> AsyncIterator[FeedEvent]:
    async with await store.db["tasks"].watch() as probe:
        start = probe.resume_token
    return MongoChangeFeed(store.db).subscribe(token_to_position(start))


@real_server
async def test_change_stream_delivers_creations_and_transitions(real_store: MongoStore) -> None:
    owner = await user_with(real_store, 100)
    events = await _subscribe_from_now(real_store)
    task, _ = await real_store.create_task(new_task(owner, cost=1))
    started = step(task, Event.START, T0 + 1)
    assert await real_store.transition(started, State.PENDING, 1)
    got = [await asyncio.wait_for(anext(events), GUARD_S) for _ in range(2)]
    await events.aclose()  # type: ignore[attr-defined]
    assert [(e.task_id, e.source, e.dest, e.version) for e in got] == [
        (task.id, None, State.PENDING, 1),
        (task.id, State.PENDING, State.PROCESSING, 2),
    ]

    resumed = MongoChangeFeed(real_store.db).subscribe(got[0].position)
    again = await asyncio.wait_for(anext(resumed), GUARD_S)
    await resumed.aclose()  # type: ignore[attr-defined]
    assert again == got[1]


@real_server
async def test_an_unknown_position_scans_the_waiting_tasks(real_store: MongoStore) -> None:
    owner = await user_with(real_store, 100)
    task, _ = await real_store.create_task(new_task(owner, cost=1))
    events = MongoChangeFeed(real_store.db).subscribe("0000000000000001")
    first = await asyncio.wait_for(anext(events), GUARD_S)
    await events.aclose()  # type: ignore[attr-defined]
    assert (first.task_id, first.dest) == (task.id, State.PENDING)
