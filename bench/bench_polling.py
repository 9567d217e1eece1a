"""Poll-only providers at scale: ``python -m bench.bench_polling [--quick] [--no-results]``.

Issue 15's benchmark: 100,000 tasks of a poll-only provider (DashScope: no callback at all, the
outcome is found only by polls on the schedule) waiting cost no more memory than webhook tasks,
the reaper's pass over them stays within its goal, and polls per second never exceed the
configured quota. Three measurements (``--quick``: smaller, in brackets):

1. **memory** (``mem_*``), bench_waiting's method twice, each on a fresh store and a fresh
   ``hookline serve`` process with both providers configured: 100,000 [10,000] Replicate tasks
   waiting in ``ai_processing`` for their webhook, then as many DashScope tasks waiting for their
   next poll (3 polls made, the job still running), each with the feed event a real submit
   appends, until the dispatcher has read them all and the reaper has made passes. Deadlines are
   past the measurement, so nothing is polled meanwhile (polls are part 3). Per kind: the stored
   record (its JSON document; the tasks table and its indexes in SQLite's ``dbstat``, per task),
   the process's RSS, USS (private pages) and PSS growth per task, threads, fds and sockets; then
   the poll-only task's cost over the webhook task's (``…_ratio``; goal: the same, ≤ 1.1).
2. **reaper** (``reaper_*``), bench_reaper's method on a table of 100,000 [10,000] poll-only
   tasks waiting for their next poll: a pass with nothing due (goal ≤ 5 ms), then 10,000 [1,000]
   due whose poll finds the job still running — per task a deadline claim, the poll, and the
   quiet write of the next poll time (``PollLater``: no history entry, no feed event) — until
   every one is handled (goal ≤ 5 s, bench_reaper's goal for 10,000 overdue). The poll is
   answered in this process with no quota: the reaper and the store are measured here, the
   provider and the quota in part 3. Fixed clock.
3. **quota** (``quota_*``): a real ``hookline serve`` with
   ``HOOKLINE_PROVIDER_QUOTAS={"dashscope": {"polls_per_s": 50, …}}``, its DashScope adapter
   against the fake (bench/polled_provider.py, every task held ``RUNNING``) over real HTTP;
   10,000 [3,000] tasks due at once among 110,000 [13,000] waiting, so the reaper's batches of 500
   stay full. The fake times every status query when its answer is ready, for 20 s [4 s] from
   the first one.

   What the quota allows (service/steps/pacing.py): the poll bucket is a GCRA bucket with
   ``burst`` 1 (``build_pacing`` sets no other), so the tokens it hands out are at least
   ``1 / rate`` apart: at most ``rate`` of them in any half-open 1 s window (50), ``rate + 1`` in
   a closed one. ``quota_max_polls_in_1s_window`` (every window ``[t, t + 1 s)`` starting at a
   poll) is held against 50; the busiest wall-clock second is shown too. A poll is sent at its
   token's time or later — the reaper takes the token, then writes its claim, then sleeps the
   token's wait — so polls whose claims took longer arrive closer together than ``1 / rate``
   (``quota_gaps_under_interval``, ``quota_min_gap_ms``).

Speed and sizes are reported, never asserted (a run checks only that the work was done). Run
alone, the module writes its section of bench/RESULTS.md (as ``python -m bench.run`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

import httpx

from bench import bench_waiting, polled_provider
from bench.bench_reaper import T0, build_runtime_for_bench, open_companions
from callbacks.provider import Arrival, Delivery, Limits, Outcome, Quota, Submission
from service.logging import configure_logging
from service.steps.dispatcher import Backstop
from statemachine import clock
from statemachine.reaper import Reaper
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.task import TaskDoc, to_doc
from tests.support.factories import make_task

Kind = Literal["webhook", "poll"]
ROOT = Path(__file__).resolve().parent.parent
OWNER = bench_waiting.OWNER  # the owner and ids of bench_waiting's feed events
QUOTA_POLLS_PER_S = 50.0
QUOTA_BURST = 1  # build_pacing gives every bucket Pacing's default burst
IDLE_PASSES = 200
READY_WAIT_S = 30.0

# What each kind of waiting task looks like (a real provider's model and job id shape).
SHAPES: dict[Kind, tuple[str, str]] = {
    "webhook": ("replicate", "black-forest-labs/flux-schnell"),
    "poll": ("dashscope", "wan2.2-t2i-flash"),
}


def job_id(kind: Kind) -> str:
    """A job id as the provider makes them: Replicate's 26 base32 characters, DashScope's UUID."""
    if kind == "poll":
        return str(uuid.uuid4())
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").lower()[:26]


def waiting_doc(kind: Kind, index: int, *, now: float, deadline: float, job: str) -> TaskDoc:
    """One task submitted ``now - 30`` and waiting: for its webhook, or for its next poll after
    three that found the job running (``polls`` 3, the deadline its next poll time)."""
    provider, model = SHAPES[kind]
    submitted = now - 30
    task = make_task(
        id=f"wait-{index:08d}",
        now=submitted - 1,
        owner=OWNER,
        state=State.AI_PROCESSING,
        version=3 + (3 if kind == "poll" else 0),  # each poll's quiet write is a version
        provider=provider,
        model=model,
        prompt="a lighthouse at dusk",
        attempts=1,
    )
    doc = to_doc(task)
    doc["updated_at"] = submitted
    doc["deadline"] = deadline
    doc["provider_job_id"] = job
    doc["polls"] = 3 if kind == "poll" else 0
    doc["history"] = [
        {"from": "pending", "to": "processing", "event": "start", "at": submitted - 1},
        {"from": "processing", "to": "ai_processing", "event": "submitted", "at": submitted},
    ]
    doc["attempt_log"] = [
        {
            "number": 1,
            "provider": provider,
            "model": model,
            "job_id": job,
            "submitted_at": submitted,
            "finished_at": None,
            "outcome": None,
        }
    ]
    return doc


def far_docs(kind: Kind, n: int, now: float) -> Iterator[TaskDoc]:
    """``n`` waiting tasks not due for an hour (nothing is polled while they are measured)."""
    for i in range(n):
        yield waiting_doc(kind, i, now=now, deadline=now + 3600 + i * 0.001, job=job_id(kind))


async def bulk_load(db: Path, docs: Iterator[TaskDoc]) -> None:
    store = SqliteStore(db)
    await store.open()
    try:
        await store.bulk_load_for_bench(docs)
    finally:
        await store.close()


# --- 1. memory: a real serve process per kind ----------------------------------------------------


def smaps_mb(pid: int) -> dict[str, float]:
    """PSS (shared pages split among their users: it moves when other processes map the same
    files) and private memory (USS: pages only this process holds), in MB."""
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Pss", "Private_Clean", "Private_Dirty"):
            kb[name] = int(value.split()[0])
    private = kb["Private_Clean"] + kb["Private_Dirty"]
    return {"pss_mb": kb["Pss"] / 1024, "uss_mb": private / 1024}


def process_figures(pid: int) -> dict[str, float]:
    return {**bench_waiting.proc_figures(pid), **smaps_mb(pid)}


def stored_bytes(db: Path) -> tuple[float, float]:
    """Mean bytes of a task's JSON document; bytes of the tasks table and its indexes."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        doc = conn.execute("SELECT avg(length(doc)) FROM tasks").fetchone()[0] or 0.0
        pages = conn.execute(
            "SELECT sum(pgsize) FROM dbstat WHERE name IN "
            "(SELECT name FROM sqlite_schema WHERE tbl_name = 'tasks')"
        ).fetchone()[0]
    finally:
        conn.close()
    return float(doc), float(pages or 0)


def memory_env(directory: Path, port: int) -> dict[str, str]:
    """bench_waiting's serve settings with DashScope configured too (never called)."""
    env = bench_waiting.serve_env(directory, port)
    env.update(
        HOOKLINE_DASHSCOPE_API_KEY="unused", HOOKLINE_DASHSCOPE_BASE_URL="http://127.0.0.1:9"
    )
    return env


@contextlib.contextmanager
def serve(directory: Path, env: dict[str, str], port: int) -> Iterator[int]:
    """``hookline serve`` with ``env`` until it answers /healthz; its pid; then stopped."""
    with (directory / "serve.log").open("wb") as log:
        proc = spawn([bench_waiting.HOOKLINE, "serve"], env, directory, log)
        try:
            bench_waiting.wait_healthy(proc, f"http://127.0.0.1:{port}/healthz")
            yield proc.pid
        finally:
            bench_waiting.stop_serve(proc)


def spawn(
    cmd: list[str], env: dict[str, str], cwd: Path, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


async def measure_memory(directory: Path, kind: Kind, n: int) -> dict[str, float]:
    """One kind's figures (module docstring, part 1) on a fresh store and process."""
    db = directory / "hookline.db"
    port = bench_waiting.free_port()
    with serve(directory, memory_env(directory, port), port) as pid:
        await asyncio.sleep(bench_waiting.SETTLE_S)
        idle = process_figures(pid)
        _, table_idle = stored_bytes(db)
        now = clock.now()
        await bulk_load(db, far_docs(kind, n, now))
        await asyncio.to_thread(bench_waiting.append_feed_events, db, n, now)
        await bench_waiting.wait_caught_up(db)
        await asyncio.sleep(bench_waiting.SETTLE_S)
        loaded = process_figures(pid)
    doc_bytes, table_loaded = stored_bytes(db)
    kib = 1024 / n
    return {
        "doc_bytes_per_task": doc_bytes,
        "stored_bytes_per_task": (table_loaded - table_idle) / n,
        "rss_growth_mb": loaded["rss_mb"] - idle["rss_mb"],
        "rss_growth_per_task_kib": (loaded["rss_mb"] - idle["rss_mb"]) * kib,
        "pss_growth_per_task_kib": (loaded["pss_mb"] - idle["pss_mb"]) * kib,
        "uss_growth_per_task_kib": (loaded["uss_mb"] - idle["uss_mb"]) * kib,
        "threads_growth": loaded["threads"] - idle["threads"],
        "fds_growth": loaded["fds"] - idle["fds"],
        "sockets_growth": loaded["sockets"] - idle["sockets"],
    }


async def memory(root: Path, n: int) -> dict[str, float]:
    results: dict[str, float] = {"mem_waiting_tasks": float(n)}
    for kind in ("webhook", "poll"):
        figures = await measure_memory(root / f"mem-{kind}", kind, n)
        results.update({f"mem_{kind}_{k}": v for k, v in figures.items()})
    # a poll-only task's cost over a webhook task's (1: the same)
    for what in ("stored_bytes", "rss_growth", "uss_growth", "pss_growth"):
        unit = "_per_task" if what == "stored_bytes" else "_per_task_kib"
        webhook = results[f"mem_webhook_{what}{unit}"]
        poll = results[f"mem_poll_{what}{unit}"]
        results[f"mem_poll_vs_webhook_{what}_ratio"] = poll / webhook if webhook > 0 else math.nan
    return results


# --- 2. the reaper's pass over poll-only tasks, in this process -----------------------------------


class RunningProvider:
    """A poll-only provider whose every job is still running: each poll schedules the next."""

    name = "polled"
    limits = Limits()
    arrival: Arrival = "poll"
    quota = Quota()  # no limit: the reaper and the store are measured, not the quota

    def __init__(self) -> None:
        self.polls = 0

    async def submit(self, submission: Submission) -> str:
        raise AssertionError("the reaper bench never submits")

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        raise AssertionError("a poll-only provider sends no webhook")

    async def poll(self, job_id: str, model: str) -> Outcome:
        self.polls += 1
        return Outcome("running", job_id)

    async def cancel(self, job_id: str, model: str) -> None:
        return None

    def fetch_headers(self, url: str) -> dict[str, str]:
        return {}


def reaper_docs(n: int, *, due: bool, start: int = 0) -> Iterator[TaskDoc]:
    """Poll-only tasks of ``RunningProvider``: due at ``T0`` or with their next poll in the next
    minute (spread over it)."""
    for i in range(start, start + n):
        deadline = T0 - 1 - i * 1e-4 if due else T0 + 1 + (i % 60_000) * 1e-3
        doc = waiting_doc("poll", i, now=T0, deadline=deadline, job=f"job-{i}")
        doc["provider"] = doc["attempt_log"][0]["provider"] = RunningProvider.name
        yield doc


async def timed_passes(reaper: Reaper) -> list[float]:
    """Passes until one finds nothing due; each handling pass's time in ms."""
    times: list[float] = []
    while True:
        started = time.perf_counter()
        handled = await reaper.run_pass()
        if not handled:
            return times
        times.append((time.perf_counter() - started) * 1000)


async def reaper_pass(directory: Path, n_rows: int, n_due: int) -> dict[str, float]:
    """Module docstring, part 2."""
    results = {"reaper_table_rows": float(n_rows + n_due), "reaper_due_tasks": float(n_due)}
    store = SqliteStore(directory / "bench.db")
    await store.open()
    try:
        async with httpx.AsyncClient() as http:
            provider = RunningProvider()
            runtime = build_runtime_for_bench(store, directory, http, {provider.name: provider})
            await open_companions(runtime)
            assert runtime.runner is not None
            reaper = Reaper(
                store, Backstop(runtime.runner, runtime.outcomes), interval_s=1.0, now=lambda: T0
            )
            await store.bulk_load_for_bench(reaper_docs(n_rows, due=False))
            idle = []
            for _ in range(IDLE_PASSES):
                started = time.perf_counter()
                assert await reaper.run_pass() == 0, "nothing may be due at T0"
                idle.append((time.perf_counter() - started) * 1000)
            results["reaper_idle_pass_ms_median"] = statistics.median(idle)
            results["reaper_idle_pass_ms_max"] = max(idle)

            await store.bulk_load_for_bench(reaper_docs(n_due, due=True, start=n_rows))
            started = time.perf_counter()
            passes = await timed_passes(reaper)
            results["reaper_due_all_handled_s"] = time.perf_counter() - started
            results["reaper_due_passes"] = float(len(passes))
            results["reaper_due_pass_ms_median"] = statistics.median(passes) if passes else 0.0
            results["reaper_due_per_task_ms"] = results["reaper_due_all_handled_s"] / n_due * 1000
            assert provider.polls == n_due, f"{provider.polls} polls for {n_due} due tasks"
            later = await store.get_task(f"wait-{n_rows:08d}")
            assert later is not None and later.polls == 4 and (later.deadline or 0) > T0, later
    finally:
        await store.close()
    return results


# --- 3. polls per second against the quota, over real HTTP --------------------------------------


def quota_env(directory: Path, port: int, fake_url: str) -> dict[str, str]:
    """``hookline serve`` on the DashScope fake with a poll quota of 50/s."""
    env = bench_waiting.serve_env(directory, port)
    quotas = {"dashscope": {"submits_per_s": 2, "polls_per_s": QUOTA_POLLS_PER_S}}
    env.update(
        HOOKLINE_PROVIDER="dashscope",
        HOOKLINE_DASHSCOPE_API_KEY=polled_provider.DASHSCOPE_KEY,
        HOOKLINE_DASHSCOPE_BASE_URL=fake_url,
        HOOKLINE_PROVIDER_QUOTAS=json.dumps(quotas),
        HOOKLINE_REAPER_INTERVAL_S="5",  # the default: a full batch makes the next pass at once
    )
    return env


def due_docs(n: int, now: float) -> Iterator[TaskDoc]:
    """``n`` DashScope tasks whose next poll is due now; their jobs are the fake's ``due-*``."""
    for i in range(n):
        doc = waiting_doc("poll", i, now=now, deadline=now - 1 - i * 1e-4, job=f"due-{i:07d}")
        doc["id"] = f"due-{i:08d}"
        doc["polls"] = 0
        yield doc


@contextlib.contextmanager
def held_fake(directory: Path) -> Iterator[str]:
    """The DashScope fake whose tasks never finish, as its own process; its URL."""
    port = bench_waiting.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bench.polled_provider", "--kind", "dashscope", "--latency",
           "hold", "--port", str(port)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
    env["PYTHONPATH"] = str(ROOT)
    with (directory / "fake.log").open("wb") as log:
        proc = spawn(cmd, env, directory, log)
        try:
            bench_waiting.wait_healthy(proc, f"{url}/_bench/stats")
            yield url
        finally:
            bench_waiting.stop_serve(proc)


def max_in_window(times: Sequence[float], width_s: float) -> int:
    """The most of ``times`` (ascending) in any window ``[t, t + width_s)`` starting at one."""
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + width_s:
            j += 1
        best = max(best, j - i)
    return best


def poll_figures(times: Sequence[float], window_s: float) -> dict[str, float]:
    """Rates of the polls in ``[first, first + window_s)`` (module docstring, part 3)."""
    kept = [t for t in sorted(times) if t < times[0] + window_s] if times else []
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    per_second: dict[int, int] = {}
    for t in kept:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    interval = 1 / QUOTA_POLLS_PER_S
    return {
        "quota_polls_measured": float(len(kept)),
        "quota_polls_per_s_mean": len(kept) / window_s,
        "quota_max_polls_in_1s_window": float(max_in_window(kept, 1.0)),
        "quota_max_polls_in_wall_clock_second": float(max(per_second.values(), default=0)),
        "quota_min_gap_ms": min(gaps, default=math.nan) * 1000,
        "quota_gaps_under_interval": float(sum(g < interval * 0.999 for g in gaps)),
    }


async def quota(directory: Path, n_wait: int, n_due: int, window_s: float) -> dict[str, float]:
    """Module docstring, part 3."""
    db = directory / "hookline.db"
    now = clock.now()
    await bulk_load(db, far_docs("poll", n_wait, now))
    await bulk_load(db, due_docs(n_due, now))
    port = bench_waiting.free_port()
    results = {
        "quota_polls_per_s": QUOTA_POLLS_PER_S,
        "quota_allowed_in_1s_window": math.ceil(QUOTA_POLLS_PER_S) + QUOTA_BURST - 1.0,
        "quota_due_tasks": float(n_due),
        "quota_waiting_tasks": float(n_wait + n_due),
    }
    with held_fake(directory) as fake_url:
        async with httpx.AsyncClient(base_url=fake_url, timeout=30.0) as http:
            r = await http.post("/_bench/preload", json={"n": n_due, "prefix": "due-"})
            r.raise_for_status()
            with serve(directory, quota_env(directory, port, fake_url), port):
                await asyncio.sleep(window_s + 2.0)
            times: list[float] = (await http.get("/_bench/polls")).json()
            stats = (await http.get("/_bench/stats")).json()
    assert times, "hookline made no poll: see serve.log"
    results.update(poll_figures(times, window_s))
    polled = sum(1 for job in stats["jobs"].values() if job["queries"])
    results["quota_tasks_polled"] = float(polled)
    results["quota_polls_per_task_polled"] = len(times) / max(polled, 1)
    return results


# --- the run -------------------------------------------------------------------------------------


async def run_async(quick: bool, root: Path) -> dict[str, float]:
    configure_logging("warning", "console")
    n = 10_000 if quick else 100_000
    load_at_start = os.getloadavg()[0]  # real work shows a busy machine: say how busy
    results = await memory(root, n)
    results.update(await reaper_pass(root / "reaper", n, 1_000 if quick else 10_000))
    results.update(await quota(root / "quota", n, *QUOTA_RUN[quick]))
    results["load_1m_at_start"], results["load_1m_at_end"] = load_at_start, os.getloadavg()[0]
    return results


# (tasks due at once, seconds of polls measured): enough due that the reaper's batches of 500
# stay full for the whole window, so it keeps asking for tokens
QUOTA_RUN = {False: (10_000, 20.0), True: (3_000, 4.0)}
DIRECTORIES = ("mem-webhook", "mem-poll", "reaper", "quota")
UNITS = {"kib": "KiB", "mb": "MB", "ms": "ms", "s": "s", "bytes": "bytes"}


def unit_of(name: str) -> str:
    """The unit a figure's name carries (``…_ms_median``: ms; ``…_per_s…``: /s; a ratio: none)."""
    words = name.split("_")
    if "ratio" in words:
        return ""
    if any(a == "per" and b == "s" for a, b in itertools.pairwise(words)):
        return "/s"
    return next((UNITS[w] for w in reversed(words) if w in UNITS), "")


def run(quick: bool) -> dict[str, float]:
    """The three measurements on temporary files; print one line each; return {name: value}."""
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as tmp:
        for part in DIRECTORIES:
            (Path(tmp) / part).mkdir()
        results = asyncio.run(run_async(quick, Path(tmp)))
    for name, value in results.items():
        print(f"{name}: {value:,.3f} {unit_of(name)}".rstrip())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10,000 waiting, 4 s of polls")
    parser.add_argument("--no-results", action="store_true", help="leave bench/RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    figures = run(args.quick)
    if not args.no_results:
        from bench import run as bench_run

        spec = next(s for s in bench_run.BENCHES if s.name == "bench_polling")
        outcome = bench_run.Outcome(spec, figures, [time.monotonic() - started])
        section = bench_run.bench_section(outcome, args.quick)
        bench_run.write_sections({"bench_polling": section})


if __name__ == "__main__":
    main()
