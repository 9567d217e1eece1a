"""Benchmark of the reaper on a large SQLite store: ``python -m bench.bench_reaper [--quick]``.

Two measurements over a table of 1,000,000 stored tasks (``--quick``: 100,000), 80 % terminal and
20 % waiting in ``ai_processing`` with a far deadline:

- **nothing overdue**: the time of one ``Reaper.run_pass`` (goal ≤ 5 ms, whatever the table size);
- **10,000 overdue** (``--quick``: 1,000) ``ai_processing`` tasks whose webhook was lost: the time
  until every one is handled by the real ``Worker.reconcile`` against a fake provider that answers
  "succeeded" to the poll: per task a CAS claim, a poll, and the ``ai_succeeded`` CAS into
  ``watermarking`` (goal ≤ 5 s).

The clock is fixed, so nothing else becomes due during the run. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from callbacks.provider import Arrival, Delivery, Limits, Outcome, Provider, Quota, Submission
from service.blobs.local import LocalBlobStore
from service.logging import configure_logging
from service.media.fetch import SafeFetcher
from service.runtime import Runtime, build_runtime
from service.settings import Settings
from service.steps.dispatcher import Backstop
from statemachine.reaper import Reaper
from statemachine.sqlite_feed import SqliteFeed
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.task import TaskDoc, to_doc
from tests.support.factories import make_task

T0 = 1_700_000_000.0
OWNER = "bench"
PROVIDER = "bench"
MODEL = "bench/model"
IDLE_PASSES = 200


class SucceededProvider:
    """A provider whose every job has succeeded: the reconcile poll finds the lost outcome."""

    name = PROVIDER
    limits = Limits()
    arrival: Arrival = "webhook"  # polled only to reconcile a lost webhook
    quota = Quota()  # no published limit: the reaper's own pace is measured

    def __init__(self) -> None:
        self.polls = 0

    async def submit(self, submission: Submission) -> str:
        raise AssertionError("the reaper bench never submits")

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        raise AssertionError("the reaper bench receives no webhook")

    async def poll(self, job_id: str, model: str) -> Outcome:
        self.polls += 1
        return Outcome("succeeded", job_id, (f"https://outputs.invalid/{job_id}/0.png",))

    async def cancel(self, job_id: str, model: str) -> None:
        return None

    def fetch_headers(self, url: str) -> dict[str, str]:
        return {}


def template() -> TaskDoc:
    """The stored task the generated rows are copies of (each sets its own id and deadline)."""
    task = make_task(
        owner=OWNER,
        state=State.AI_PROCESSING,
        version=3,
        provider=PROVIDER,
        model=MODEL,
        prompt="a lighthouse at dusk",
        now=T0 - 3600,
        attempts=1,
    )
    return to_doc(task)


def waiting_docs(n: int) -> Iterator[TaskDoc]:
    """The background table: 80 % terminal, 20 % waiting in ai_processing due in an hour."""
    base = template()
    for i in range(n):
        doc = base.copy()
        doc["id"] = f"bg-{i:08d}"
        doc["created_at"] = doc["updated_at"] = T0 - 86_400 + i * 0.001
        if i % 5:
            doc["state"], doc["deadline"] = State.COMPLETED.value, None
        else:
            doc["deadline"] = T0 + 3600 + i * 0.001
            doc["provider_job_id"] = f"job-bg-{i}"
        yield doc


def overdue_docs(n: int) -> Iterator[TaskDoc]:
    """``n`` ai_processing tasks past their deadline, each with its open attempt and history."""
    base = template()
    submitted = T0 - 60
    for i in range(n):
        job = f"job-due-{i}"
        doc = base.copy()
        doc["id"] = f"due-{i:08d}"
        doc["created_at"] = doc["updated_at"] = submitted
        doc["deadline"] = T0 - 1 - i * 0.0001
        doc["provider_job_id"] = job
        doc["history"] = [
            {"from": "pending", "to": "processing", "event": "start", "at": submitted - 1},
            {"from": "processing", "to": "ai_processing", "event": "submitted", "at": submitted},
        ]
        doc["attempt_log"] = [
            {
                "number": 1,
                "provider": PROVIDER,
                "model": MODEL,
                "job_id": job,
                "submitted_at": submitted,
                "finished_at": None,
                "outcome": None,
            }
        ]
        yield doc


def build_runtime_for_bench(
    store: SqliteStore,
    directory: Path,
    http: httpx.AsyncClient,
    providers: Mapping[str, Provider] | None = None,
) -> Runtime:
    """The production runtime on a fixed clock, with ``providers`` (default: the succeeding fake
    as the only one)."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, var_dir=directory / "var", public_url="http://127.0.0.1:9"
    )
    fetcher = SafeFetcher(http, max_bytes=1_000_000, timeout_s=5)
    return build_runtime(
        settings,
        store=store,
        feed=SqliteFeed(store),
        blobs=LocalBlobStore(directory / "blobs", settings.public_url, b"bench-secret"),
        http=http,
        providers=dict(providers or {PROVIDER: SucceededProvider()}),
        input_fetcher=fetcher,
        output_fetchers={},
        now=lambda: T0,
        owner="bench-reaper",
    )


async def open_companions(runtime: Runtime) -> None:
    """Open what keeps its tables beside the (already open) store, as ``Runtime.start`` does:
    without them a poll's timeline note would fail instead of being written."""
    for companion in (runtime.outbox, runtime.timeline):
        if companion is not None:
            await companion.open()


async def idle_pass_ms(reaper: Reaper) -> tuple[float, float]:
    """Median and worst time of a pass that finds nothing, in ms."""
    times: list[float] = []
    for _ in range(IDLE_PASSES):
        started = time.perf_counter()
        handled = await reaper.run_pass()
        times.append((time.perf_counter() - started) * 1000)
        assert handled == 0, "nothing may be due at T0 in the background table"
    return statistics.median(times), max(times)


async def run_async(quick: bool, directory: Path) -> dict[str, float]:
    configure_logging("warning", "console")  # one info line per reconciled task is not measured
    n_rows = 100_000 if quick else 1_000_000
    n_due = 1_000 if quick else 10_000
    results: dict[str, float] = {"table_rows": float(n_rows), "overdue_tasks": float(n_due)}
    store = SqliteStore(directory / "bench.db")
    await store.open()
    try:
        async with httpx.AsyncClient() as http:
            runtime = build_runtime_for_bench(store, directory, http)
            await open_companions(runtime)
            assert runtime.runner is not None
            backstop = Backstop(runtime.runner, runtime.outcomes)
            reaper = Reaper(store, backstop, interval_s=1.0, now=lambda: T0)
            started = time.perf_counter()
            await store.bulk_load_for_bench(waiting_docs(n_rows))
            results["bulk_load_s"] = time.perf_counter() - started

            median, worst = await idle_pass_ms(reaper)
            results["idle_pass_ms_median"], results["idle_pass_ms_max"] = median, worst

            await store.bulk_load_for_bench(overdue_docs(n_due))
            passes = 0
            started = time.perf_counter()
            while await reaper.run_pass():
                passes += 1
            results["overdue_all_handled_s"] = time.perf_counter() - started
            results["overdue_passes"] = float(passes)
            counts = await store.count_by_state(OWNER)
            assert counts[State.WATERMARKING] == n_due, counts
            results["overdue_per_task_ms"] = results["overdue_all_handled_s"] / n_due * 1000
    finally:
        await store.close()
    return results


GOALS: dict[str, tuple[str, str]] = {
    "table_rows": ("rows", "1,000,000 stored tasks; --quick 100,000"),
    "overdue_tasks": ("tasks", "10,000 overdue; --quick 1,000"),
    "bulk_load_s": ("s", "setup only"),
    "idle_pass_ms_median": ("ms", "goal ≤ 5 ms per pass with nothing overdue"),
    "idle_pass_ms_max": ("ms", "worst of the idle passes"),
    "overdue_all_handled_s": ("s", "goal ≤ 5 s until every overdue task is handled"),
    "overdue_passes": ("passes", "batches of 500"),
    "overdue_per_task_ms": ("ms", "claim CAS + poll + ai_succeeded CAS, 32 at a time"),
}


def run(quick: bool) -> dict[str, float]:
    """Run both measurements on a temporary file; print one line each; return {name: value}."""
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as tmp:
        results = asyncio.run(run_async(quick, Path(tmp)))
    for name, value in results.items():
        unit, goal = GOALS[name]
        print(f"{name}: {value:,.3f} {unit} ({goal})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 1,000 overdue")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
