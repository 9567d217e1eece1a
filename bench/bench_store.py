"""Benchmark of the SQLite TaskStore on a temporary file: ``python -m bench.bench_store [--quick]``.

Measures compare-and-set transitions per second (concurrent read → apply → transition), task
creation per second, the reaper's ``overdue`` query on a large table with no and with many
overdue tasks, an SSE resume from ``Last-Event-ID: 0`` (one task's events through the index,
against paging through the whole feed as it was done before), and one retention pass of the feed
and of the delivery records. Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.cli import tune_gc
from statemachine.decide import Deadlines, Transition, apply, decide
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, State
from statemachine.store import FeedEvent
from statemachine.task import Task, TaskDoc, to_doc
from tests.support.factories import make_task

T0 = 1_700_000_000.0
OWNER = "bench"
CONCURRENCY = 256


def new_task(i: int) -> Task:
    return make_task(
        owner=OWNER,
        prompt=f"a portrait in the rain #{i}",
        cost=1,
        now=T0 + i * 0.001,
        idempotency_key=f"key-{i}",  # every create pays for the Idempotency-Key lookup
        request_hash="h",
    )


def transitions_by_state() -> dict[State, Transition]:
    """One decided transition per state (decide is the machine's cost, not the store's)."""
    walk = {State.PENDING: Event.START, State.PROCESSING: Event.SUBMITTED}
    walk[State.AI_PROCESSING] = Event.EXTEND
    sample = new_task(0)
    result: dict[State, Transition] = {}
    for state, event in walk.items():
        decided = decide(sample.with_changes(state=state), event, T0 + 1, Deadlines())
        assert isinstance(decided, Transition)
        result[state] = decided
    return result


async def bench_create(store: SqliteStore, n: int, start: int = 0) -> float:
    tasks = [new_task(i) for i in range(start, start + n)]
    chunks = [tasks[i::CONCURRENCY] for i in range(CONCURRENCY)]

    async def worker(mine: list[Task]) -> None:
        for task in mine:
            await store.create_task(task)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in chunks))
    return n / (time.perf_counter() - started)


async def bench_cas(store: SqliteStore, task_ids: list[str], rounds: int) -> float:
    """Each coroutine owns some tasks and moves each ``rounds`` times: start, submitted, extend…"""
    by_state = transitions_by_state()
    chunks = [task_ids[i::CONCURRENCY] for i in range(CONCURRENCY)]
    won = 0

    async def worker(mine: list[str]) -> None:
        nonlocal won
        for _ in range(rounds):
            for task_id in mine:
                task = await store.get_task(task_id)
                assert task is not None
                nxt = apply(task, by_state[task.state])
                ok = await store.transition(nxt, task.state, task.version)
                won += ok  # not `won += await …`: that reads `won` before the await

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in chunks))
    elapsed = time.perf_counter() - started
    assert won == len(task_ids) * rounds, "every transition of an owned task must win"
    return won / elapsed


def _cas_in_process(path: str, ids: list[str], rounds: int, barrier: Any, out: Any) -> None:
    async def go() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            await asyncio.to_thread(barrier.wait, 120)
            started = time.time()  # wall clock: the processes' intervals are compared
            await bench_cas(store, ids, rounds)
            out.put((len(ids) * rounds, started, time.time()))
        finally:
            await store.close()

    asyncio.run(go())


async def bench_cas_processes(path: Path, task_ids: list[str], rounds: int, n: int) -> float:
    """Aggregate CAS rate of ``n`` OS processes on one file, as ``hookline serve`` runs them."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_cas_in_process, args=(str(path), task_ids[i::n], rounds, barrier, out))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    reports: list[tuple[int, float, float]] = [
        await asyncio.to_thread(out.get, True, 600) for _ in procs
    ]
    for p in procs:
        await asyncio.to_thread(p.join)
    total = sum(r[0] for r in reports)
    assert total == len(task_ids) * rounds
    return total / (max(r[2] for r in reports) - min(r[1] for r in reports))


def bulk_docs(n: int, *, overdue: bool, start: int) -> Iterator[TaskDoc]:
    """``n`` stored tasks: with ``overdue`` all due in the past, else 80 % terminal and 20 % due
    in the future (so the partial index is not empty)."""
    template = to_doc(new_task(0))
    for i in range(start, start + n):
        doc = template.copy()
        doc["id"] = f"bulk-{i:08d}"
        doc["created_at"] = doc["updated_at"] = T0 - 86_400 + i * 0.001
        doc["idempotency_key"] = None
        if overdue:
            doc["state"], doc["deadline"] = State.AI_PROCESSING.value, T0 - 1 - i * 0.001
        elif i % 5:
            doc["state"], doc["deadline"] = State.COMPLETED.value, None
        else:
            doc["state"], doc["deadline"] = State.AI_PROCESSING.value, T0 + 3600 + i * 0.001
        yield doc


async def time_overdue_ms(store: SqliteStore, limit: int, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        await store.overdue(T0, limit)
    return (time.perf_counter() - started) / repeat * 1000


async def bench_resume(store: SqliteStore, task_id: str, repeat: int) -> dict[str, float]:
    """One task's events from the feed's start: through the index, and by paging the feed."""
    started = time.perf_counter()
    for _ in range(repeat):
        mine = await store.task_feed_after(task_id, "0", 500)
    indexed_ms = (time.perf_counter() - started) / repeat * 1000
    started = time.perf_counter()
    paged: list[FeedEvent] = []
    position = "0"
    while page := await store.feed_after(position, 500):
        paged.extend(e for e in page if e.task_id == task_id)
        position = page[-1].position
    assert paged == mine
    return {
        "feed_events": float(position),
        "resume_task_events_ms": indexed_ms,
        "resume_whole_feed_paged_ms": (time.perf_counter() - started) * 1000,
    }


async def bench_prune(store: SqliteStore, n_deliveries: int, passes: int) -> dict[str, float]:
    """Mean time of one pass of 1,000 (feed events, then delivery records), all of them old."""
    with sqlite3.connect(store.path) as conn:
        rows = ((f"bench-{i}", "t", T0 - 86_400 + i * 0.001) for i in range(n_deliveries))
        conn.executemany("INSERT INTO deliveries VALUES ('sim', ?, ?, ?)", rows)
    results: dict[str, float] = {}
    for name, prune in (("feed", store.prune_feed), ("deliveries", store.prune_deliveries)):
        started = time.perf_counter()
        for _ in range(passes):
            assert await prune(T0 + 86_400, 1_000) == 1_000
        results[f"prune_{name}_pass_1000_ms"] = (time.perf_counter() - started) / passes * 1000
    return results


async def run_async(quick: bool, directory: Path) -> dict[str, float]:
    n_create = 5_000 if quick else 20_000
    rounds = 3 if quick else 5
    n_rows = 100_000 if quick else 1_000_000
    n_overdue = 1_000 if quick else 10_000
    results: dict[str, float] = {"table_rows": n_rows + 2 * n_create, "due_rows": n_overdue}

    store = SqliteStore(directory / "bench.db")
    await store.open()
    try:
        await store.create_user(OWNER, 10**12, is_admin=False, key_hash="bench", now=T0)
        results["create_task_per_s"] = await bench_create(store, n_create)
        ids = [t.id for t in (await store.list_tasks(OWNER, None, n_create, None)).items]
        results["cas_transitions_per_s"] = await bench_cas(store, ids, rounds)
        await bench_create(store, n_create, start=n_create)
        fresh = (await store.list_tasks(OWNER, State.PENDING, n_create, None)).items
        results["cas_transitions_per_s_3_processes"] = await bench_cas_processes(
            store.path, [t.id for t in fresh], rounds, 3
        )

        started = time.perf_counter()
        await store.bulk_load_for_bench(bulk_docs(n_rows, overdue=False, start=0))
        results["bulk_load_rows_per_s"] = n_rows / (time.perf_counter() - started)
        # The tasks of the CAS run are due at T0 + 600 and later: nothing is overdue at T0.
        assert await store.overdue(T0, 10) == []
        results["overdue_none_due_ms"] = await time_overdue_ms(store, 100, 200)

        await store.bulk_load_for_bench(bulk_docs(n_overdue, overdue=True, start=n_rows))
        results["overdue_many_due_limit_100_ms"] = await time_overdue_ms(store, 100, 50)
        results["overdue_many_due_all_ms"] = await time_overdue_ms(store, n_overdue, 3)

        results.update(await bench_resume(store, ids[len(ids) // 2], 200))
        results.update(await bench_prune(store, 20_000, 10))
    finally:
        await store.close()
    return results


GOALS = {
    "table_rows": ("rows", "1,000,000 stored tasks; --quick 100,000"),
    "due_rows": ("rows", "10,000 overdue for the second overdue run; --quick 1,000"),
    "create_task_per_s": ("tasks/s", "goal ≥ 2,000 for POST /v1/tasks overall"),
    "cas_transitions_per_s": ("transitions/s", "goal ≥ 20,000"),
    "cas_transitions_per_s_3_processes": ("transitions/s", "3 processes on one file, aggregate"),
    "bulk_load_rows_per_s": ("rows/s", "setup only"),
    "overdue_none_due_ms": ("ms", "goal: independent of table size"),
    "overdue_many_due_limit_100_ms": ("ms", "goal: grows with the limit, not the table"),
    "overdue_many_due_all_ms": ("ms", "goal: grows with the overdue count"),
    "feed_events": ("events", "the feed the resumes read"),
    "resume_task_events_ms": ("ms", "Last-Event-ID: 0, one task's events through the index"),
    "resume_whole_feed_paged_ms": ("ms", "the same by paging the whole feed (before)"),
    "prune_feed_pass_1000_ms": ("ms", "one retention pass of 1,000 feed events"),
    "prune_deliveries_pass_1000_ms": ("ms", "one retention pass of 1,000 delivery records"),
}


def run(quick: bool) -> dict[str, float]:
    """Run every measurement; return {name: value} (units in GOALS) and print one line each.

    The process is tuned as ``hookline serve`` tunes itself (``service.cli.tune_gc``): the store
    runs inside it."""
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as tmp:
        results = asyncio.run(run_async(quick, Path(tmp)))
    for name, value in results.items():
        unit, goal = GOALS[name]
        print(f"{name}: {value:,.2f} {unit} ({goal})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (100k rows)")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
