"""Round trips of the MongoDB adapter per task lifecycle: ``python -m bench.mongo_ops [--quick]``.

On the mongomock-motor fake, every collection is wrapped in a counting proxy, and one successful
task (create → start → submitted → ai_succeeded → finished) and one failed, refunded task
(create → start → fail) are run through ``MongoStore``: each driver call is one round trip to the
server. With ``HOOKLINE_TEST_MONGODB_URL`` set it also measures lifecycles per second against that
real server (the fake's speed means nothing). ``no_event_log.*`` counts a store built with
``event_log=False`` (change streams as the only feed). Reported here, never asserted in tests.

A refund costs three round trips more than when the user document kept a list of refunded tasks
(which grew without bound): the user is read, then the ledger, before the fenced credit, and its
marker is pulled after the ledger entry (see ``mongo_store``'s docstring).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections import Counter
from typing import Any

from mongomock_motor import AsyncMongoMockClient

from statemachine.decide import Deadlines, apply, decide
from statemachine.mongo_store import MongoStore
from statemachine.states import Event
from statemachine.task import Task
from tests.support.factories import make_task

T0 = 1_700_000_000.0
OWNER = "bench"
SUCCESS = (Event.START, Event.SUBMITTED, Event.AI_SUCCEEDED, Event.FINISHED)
FAILURE = (Event.START, Event.FAIL)
# Driver calls that each cost one request/response with the server.
ROUND_TRIPS = frozenset(
    {
        "find",
        "find_one",
        "find_one_and_update",
        "insert_one",
        "update_one",
        "delete_one",
        "delete_many",
        "aggregate",
        "count_documents",
        "replace_one",
    }
)


class CountingCollection:
    """A collection whose round-trip methods are counted (``find``: one batch, one trip)."""

    def __init__(self, inner: Any, name: str, counts: Counter[str]) -> None:
        self._inner = inner
        self._name = name
        self._counts = counts

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr not in ROUND_TRIPS:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[f"{self._name}.{attr}"] += 1
            return value(*args, **kwargs)

        return counted


class CountingDatabase:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.counts: Counter[str] = Counter()

    def __getitem__(self, name: str) -> CountingCollection:
        return CountingCollection(self._inner[name], name, self.counts)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def new_task(i: int) -> Task:
    return make_task(
        owner=OWNER,
        cost=1,
        now=T0 + i,
        # No Idempotency-Key, on purpose: create_task then skips its lookup, one round trip
        # fewer; the counts reported here are those of a create without the header.
        idempotency_key=None,
    )


async def lifecycle(store: MongoStore, task: Task, events: tuple[Event, ...]) -> Task:
    task, _ = await store.create_task(task)
    for n, event in enumerate(events, start=1):
        transition = decide(task, event, task.updated_at + n, Deadlines())
        assert not hasattr(transition, "reason"), transition
        after = apply(task, transition)  # type: ignore[arg-type]
        assert await store.transition(after, task.state, task.version)
        task = after
    return task


async def count_round_trips(*, event_log: bool) -> dict[str, float]:
    db = CountingDatabase(AsyncMongoMockClient()["bench"])
    store = MongoStore(db, event_log=event_log)  # type: ignore[arg-type]
    await store.open()
    await store.create_user(OWNER, 1000, is_admin=False, key_hash="k", now=T0)
    # The event log's first bucket is created once per database (two round trips more than an
    # append), not once per task: one task before counting.
    await store.create_task(new_task(-1))
    results: dict[str, float] = {}
    for label, events in (("success", SUCCESS), ("failure", FAILURE)):
        db.counts.clear()
        task, _ = await store.create_task(new_task(0 if label == "success" else 1))
        results[f"{label}.create"] = float(sum(db.counts.values()))
        for event in events:
            before = sum(db.counts.values())
            transition = decide(task, event, task.updated_at + 1, Deadlines())
            after = apply(task, transition)  # type: ignore[arg-type]
            assert await store.transition(after, task.state, task.version)
            task = after
            results[f"{label}.{event.value}"] = float(sum(db.counts.values()) - before)
        results[f"{label}.total"] = float(sum(db.counts.values()))
    return results


async def real_throughput(url: str, n: int, concurrency: int) -> dict[str, float]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    name = f"hookline_bench_{uuid.uuid4().hex[:8]}"
    store = MongoStore(client[name], client=client)
    try:
        await store.open()
        await store.create_user(OWNER, n * 10, is_admin=False, key_hash="k", now=T0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await lifecycle(store, new_task(i), SUCCESS)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - started
        return {"real.lifecycles_per_s": n / elapsed, "real.writes_per_s": 5 * n / elapsed}
    finally:
        await client.drop_database(name)
        await store.close()


async def run_async(quick: bool) -> dict[str, float]:
    results = await count_round_trips(event_log=True)
    without_log = await count_round_trips(event_log=False)
    results.update({f"no_event_log.{k}": v for k, v in without_log.items() if k.endswith("total")})
    url = os.environ.get("HOOKLINE_TEST_MONGODB_URL")
    if url:
        results.update(await real_throughput(url, 200 if quick else 2000, 64))
    return results


def run(quick: bool) -> dict[str, float]:
    """Round trips per lifecycle (and real-server throughput when configured)."""
    return asyncio.run(run_async(quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks on a real server")
    args = parser.parse_args()
    for name, value in run(args.quick).items():
        print(f"{name:32s} {value:10.1f}")


if __name__ == "__main__":
    main()
