"""The Timeline port's contract, run against every adapter (SQLite; MongoDB through mongomock, and
a real replica set when HOOKLINE_TEST_MONGODB_URL is set): a task's notes come back as written,
only its own, oldest first; ``limit`` gives the newest; the bound per task pushes the oldest out
(also under concurrent writes); each note's data is cut to its byte cap and says so; an unknown
kind stores nothing; and on SQLite both statements go through the task index."""

from __future__ import annotations

import asyncio

import pytest

from statemachine.mongo_timeline import MongoTimeline
from statemachine.sqlite_store import SqliteStore
from statemachine.sqlite_timeline import SqliteTimeline
from statemachine.store import TaskStore
from statemachine.timeline import MAX_NOTE_BYTES, TRUNCATED, Note, Timeline, encoded_size
from tests.support.factories import T0

pytestmark = pytest.mark.asyncio


def build(store: TaskStore, max_notes: int) -> Timeline:
    if isinstance(store, SqliteStore):
        return SqliteTimeline(store, max_notes=max_notes)
    return MongoTimeline(store.db, max_notes=max_notes)  # type: ignore[attr-defined]


@pytest.fixture
async def timeline(store: TaskStore) -> Timeline:
    kept = build(store, max_notes=5)
    await kept.open()
    await kept.open()  # idempotent
    return kept


async def test_notes_come_back_as_written_oldest_first_and_only_the_tasks_own(
    timeline: Timeline,
) -> None:
    await timeline.note("tsk_a", "submit", T0 + 1, {"job_id": "j1", "status_code": 201})
    await timeline.note("tsk_b", "poll", T0 + 2, {"status": "running"})
    await timeline.note("tsk_a", "webhook", T0 + 3, {"verified": True, "headers": {"a": "b"}})
    assert await timeline.notes("tsk_a", 10) == [
        Note("tsk_a", T0 + 1, "submit", {"job_id": "j1", "status_code": 201}),
        Note("tsk_a", T0 + 3, "webhook", {"verified": True, "headers": {"a": "b"}}),
    ]
    assert await timeline.notes("tsk_b", 10) == [
        Note("tsk_b", T0 + 2, "poll", {"status": "running"})
    ]
    assert await timeline.notes("tsk_none", 10) == []


async def test_notes_are_in_time_order_whatever_order_they_were_written_in(
    timeline: Timeline,
) -> None:
    """Two processes may write a task's notes out of order; ties keep the order of arrival."""
    await timeline.note("tsk_a", "poll", T0 + 5, {"n": 1})
    await timeline.note("tsk_a", "submit", T0 + 1, {"n": 2})
    await timeline.note("tsk_a", "webhook", T0 + 5, {"n": 3})
    notes = await timeline.notes("tsk_a", 10)
    assert [n.data["n"] for n in notes] == [2, 1, 3]


async def test_limit_gives_the_newest_notes_oldest_first(timeline: Timeline) -> None:
    for i in range(4):
        await timeline.note("tsk_a", "poll", T0 + i, {"n": i})
    assert [n.data["n"] for n in await timeline.notes("tsk_a", 2)] == [2, 3]


async def test_the_bound_per_task_pushes_the_oldest_notes_out(timeline: Timeline) -> None:
    await timeline.note("tsk_other", "submit", T0, {"n": -1})
    for i in range(12):
        await timeline.note("tsk_a", "poll", T0 + i, {"n": i})
    kept = await timeline.notes("tsk_a", 100)
    assert [n.data["n"] for n in kept] == [7, 8, 9, 10, 11]  # max_notes=5: the newest five
    assert [n.data["n"] for n in await timeline.notes("tsk_other", 100)] == [-1]


async def test_a_late_note_older_than_the_kept_ones_is_the_one_that_goes(
    timeline: Timeline,
) -> None:
    for i in range(5):
        await timeline.note("tsk_a", "poll", T0 + 10 + i, {"n": i})
    await timeline.note("tsk_a", "submit", T0, {"n": "late"})  # older than all five
    assert [n.data["n"] for n in await timeline.notes("tsk_a", 100)] == [0, 1, 2, 3, 4]


async def test_the_bound_holds_under_concurrent_notes(store: TaskStore) -> None:
    timeline = build(store, max_notes=3)
    await timeline.open()
    await asyncio.gather(
        *(timeline.note("tsk_a", "poll", T0 + i, {"n": i}) for i in range(20)),
        *(timeline.note("tsk_b", "poll", T0 + i, {"n": i}) for i in range(2)),
    )
    assert [n.data["n"] for n in await timeline.notes("tsk_a", 100)] == [17, 18, 19]
    assert [n.data["n"] for n in await timeline.notes("tsk_b", 100)] == [0, 1]


async def test_a_notes_data_is_cut_to_its_byte_cap_and_says_so(timeline: Timeline) -> None:
    huge = {f"x-header-{i}": "v" * 300 for i in range(80)}
    await timeline.note("tsk_a", "webhook", T0, {"delivery_id": "d1", "headers": huge})
    await timeline.note("tsk_a", "submit", T0 + 1, {"error": "e" * 5000, "status_code": 500})
    await timeline.note("tsk_a", "poll", T0 + 2, {"status": "running"})
    cut_headers, cut_error, whole = await timeline.notes("tsk_a", 10)
    for note in (cut_headers, cut_error):
        assert note.data[TRUNCATED] is True
        assert encoded_size(note.data) <= MAX_NOTE_BYTES
    assert cut_headers.data["delivery_id"] == "d1"  # the short facts stay whole
    assert cut_error.data["status_code"] == 500
    assert cut_error.data["error"].startswith("eee") and "chars)" in cut_error.data["error"]
    assert TRUNCATED not in whole.data


async def test_awkward_keys_and_values_round_trip(timeline: Timeline) -> None:
    """Header names are the sender's choice: dots, dollars and unicode are kept as they are."""
    data = {"headers": {"x.dotted": "1", "$dollar": "2", "ключ": "значение"}, "n": None}
    await timeline.note("tsk_a", "webhook", T0, data)
    (note,) = await timeline.notes("tsk_a", 10)
    assert note.data == data


async def test_an_unknown_kind_is_refused_and_stores_nothing(timeline: Timeline) -> None:
    with pytest.raises(ValueError, match="unknown note kind"):
        await timeline.note("tsk_a", "gossip", T0, {})
    assert await timeline.notes("tsk_a", 10) == []


async def test_the_lead_engineers_delivery_note_is_kept_whole(timeline: Timeline) -> None:
    """The outbound deliverer writes notes of kind ``delivery`` with these keys."""
    data = {
        "webhook_id": "msg_1",
        "endpoint_id": "whe_1",
        "url": "https://hooks.example.com/1",
        "event": "task.completed",
        "attempt": 2,
        "status_code": 503,
        "latency_ms": 12.5,
        "error": "HTTP 503",
        "next_retry_at": T0 + 30,
    }
    await timeline.note("tsk_a", "delivery", T0, data)
    assert await timeline.notes("tsk_a", 10) == [Note("tsk_a", T0, "delivery", data)]


@pytest.mark.parametrize("query", ["notes", "past_bound"])
async def test_sqlite_reads_and_trims_through_the_task_index(
    sqlite_store: SqliteStore, query: str
) -> None:
    timeline = SqliteTimeline(sqlite_store)
    await timeline.open()
    plan = " | ".join(await timeline.explain(query))
    assert "INDEX timeline_notes_task" in plan, plan
    assert "SCAN timeline_notes" not in plan.replace("INDEX", ""), plan
    assert "TEMP B-TREE" not in plan, plan  # the index gives the order too
