"""What a waiting task costs: ``python -m bench.bench_waiting [--quick]``.

Invariant 1 of DESIGN.md: a task in ``ai_processing`` holds no coroutine, thread, socket or lease;
100,000 waiting tasks cost only their stored records. Two measurements:

- **a real ``hookline serve`` process**: its RSS, threads, open file descriptors and sockets (from
  ``/proc/<pid>/status`` and ``/proc/<pid>/fd``) idle, then after 100,000 ``ai_processing`` tasks
  with far deadlines (``--quick``: 20,000) are written into its SQLite file while it runs, each
  with the feed event a real submit appends, and its dispatcher has consumed them all and its
  reaper has made a few passes. Goal: RSS grows ≤ 50 MB, threads and sockets do not grow.
- **the same app in this process** (its lifespan run directly, so the dispatcher and the reaper
  loops are live): ``asyncio.all_tasks()``, threads and the worker's running steps, before and
  after the same load. Goal: no task count that grows with the waiting tasks.

Speed and sizes are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import SecretStr

from service.http.app import create_app
from service.settings import Settings
from statemachine import clock
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.task import TaskDoc, to_doc
from tests.support.factories import make_task

HOOKLINE = str(Path(sys.executable).parent / "hookline")
OWNER = "waiting"
SETTLE_S = 2.0  # a few reaper passes and feed polls after the dispatcher caught up
WAIT_LIMIT_S = 120.0


# --- the waiting tasks -----------------------------------------------------------------------


def waiting_docs(n: int, now: float) -> Iterator[TaskDoc]:
    """``n`` tasks submitted to a provider and waiting for its webhook, due in a day."""
    base = to_doc(
        make_task(
            id="template",
            now=now,
            owner=OWNER,
            state=State.AI_PROCESSING,
            version=3,
            provider="replicate",
            model="black-forest-labs/flux-schnell",
            prompt="a lighthouse at dusk",
            attempts=1,
        )
    )
    for i in range(n):
        doc = base.copy()
        doc["id"] = f"wait-{i:08d}"
        doc["callback_token"] = secrets.token_urlsafe(24)
        doc["deadline"] = now + 86_400 + i * 0.001
        doc["provider_job_id"] = f"job-{i}"
        doc["history"] = [
            {"from": "pending", "to": "processing", "event": "start", "at": now},
            {"from": "processing", "to": "ai_processing", "event": "submitted", "at": now},
        ]
        yield doc


def append_feed_events(db: Path, n: int, now: float) -> None:
    """The ``submitted`` events a real submit appends, so the dispatcher reads them all."""
    rows = (
        (f"wait-{i:08d}", OWNER, "processing", "ai_processing", "submitted", now, 3)
        for i in range(n)
    )
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO feed_events (task_id, owner, source, dest, event, at, version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        conn.close()


async def load_waiting(db: Path, n: int) -> None:
    """Write ``n`` waiting tasks and their feed events into ``db`` (another process may run)."""
    now = clock.now()
    store = SqliteStore(db)
    await store.open()
    try:
        await store.bulk_load_for_bench(waiting_docs(n, now))
    finally:
        await store.close()
    await asyncio.to_thread(append_feed_events, db, n, now)


def feed_caught_up(db: Path) -> bool:
    """True once the dispatcher's saved position is the newest feed event."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        head = conn.execute("SELECT max(seq) FROM feed_events").fetchone()[0]
        row = conn.execute(
            "SELECT position FROM watcher_positions WHERE watcher = 'dispatcher'"
        ).fetchone()
    finally:
        conn.close()
    return head is None or (row is not None and int(row[0]) >= int(head))


async def wait_caught_up(db: Path) -> float:
    started = time.monotonic()
    while not await asyncio.to_thread(feed_caught_up, db):
        if time.monotonic() - started > WAIT_LIMIT_S:
            raise RuntimeError(f"the dispatcher did not catch up within {WAIT_LIMIT_S} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


# --- a real serve process, seen through /proc ----------------------------------------------------


def proc_figures(pid: int) -> dict[str, float]:
    """RSS (MB), threads, open fds and sockets of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(fd).startswith("socket:")
        except OSError:
            continue  # closed while we looked
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": float(fields["Threads"].strip()),
        "fds": float(len(fds)),
        "sockets": float(sockets),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_env(directory: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
    env.update(
        HOOKLINE_STORE_URL=f"sqlite:///{directory / 'hookline.db'}",
        HOOKLINE_BLOB_URL=f"file://{directory / 'blobs'}",
        HOOKLINE_VAR_DIR=str(directory / "var"),
        HOOKLINE_PORT=str(port),
        HOOKLINE_PUBLIC_URL=f"http://127.0.0.1:{port}",
        # a provider that is never called: nothing is submitted during the measurement
        HOOKLINE_PROVIDER="replicate",
        HOOKLINE_REPLICATE_API_TOKEN="unused",
        HOOKLINE_REPLICATE_BASE_URL="http://127.0.0.1:9/v1",
        HOOKLINE_REPLICATE_WEBHOOK_SECRET="whsec_" + "A" * 44,
        HOOKLINE_REAPER_INTERVAL_S="0.5",
        HOOKLINE_LOG_LEVEL="warning",
    )
    return env


def wait_healthy(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hookline serve exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"hookline serve did not answer {url}")


def start_serve(directory: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [HOOKLINE, "serve"],
        env=serve_env(directory, port),
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def measure_process(directory: Path, n: int) -> dict[str, float]:
    port = free_port()
    log = (directory / "serve.log").open("wb")
    proc = start_serve(directory, port, log)
    try:
        await asyncio.to_thread(wait_healthy, proc, f"http://127.0.0.1:{port}/healthz")
        await asyncio.sleep(SETTLE_S)
        idle = proc_figures(proc.pid)
        started = time.perf_counter()
        await load_waiting(directory / "hookline.db", n)
        load_s = time.perf_counter() - started
        catch_up_s = await wait_caught_up(directory / "hookline.db")
        await asyncio.sleep(SETTLE_S)
        loaded = proc_figures(proc.pid)
    finally:
        await asyncio.to_thread(stop_serve, proc)
        log.close()
    results = {f"process_idle_{k}": v for k, v in idle.items()}
    results.update({f"process_waiting_{k}": v for k, v in loaded.items()})
    results["process_rss_growth_mb"] = loaded["rss_mb"] - idle["rss_mb"]
    results["load_s"] = load_s
    results["dispatcher_catch_up_s"] = catch_up_s
    return results


# --- the same app in this process, for asyncio's own count -------------------------------------


def inproc_figures(app: Any) -> dict[str, float]:
    runner = app.state.runtime.runner
    return {
        "asyncio_tasks": float(len(asyncio.all_tasks())),
        "threads": float(threading.active_count()),
        "worker_steps": float(runner.busy if runner is not None else 0),
    }


async def measure_in_process(directory: Path, n: int) -> dict[str, float]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        store_url=f"sqlite:///{directory / 'hookline.db'}",
        blob_url=f"file://{directory / 'blobs'}",
        var_dir=directory / "var",
        public_url="http://127.0.0.1:9",
        provider="replicate",
        replicate_api_token=SecretStr("unused"),
        replicate_base_url="http://127.0.0.1:9/v1",
        reaper_interval_s=0.5,
        log_level="warning",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(SETTLE_S)
        idle = inproc_figures(app)
        await load_waiting(directory / "hookline.db", n)
        await wait_caught_up(directory / "hookline.db")
        await asyncio.sleep(SETTLE_S)
        loaded = inproc_figures(app)
    results = {f"inproc_idle_{k}": v for k, v in idle.items()}
    results.update({f"inproc_waiting_{k}": v for k, v in loaded.items()})
    return results


async def run_async(quick: bool, root: Path) -> dict[str, float]:
    n = 20_000 if quick else 100_000
    (root / "process").mkdir()
    (root / "inproc").mkdir()
    results: dict[str, float] = {"waiting_tasks": float(n)}
    results.update(await measure_process(root / "process", n))
    results.update(await measure_in_process(root / "inproc", n))
    return results


def unit_of(name: str) -> str:
    if name.endswith("_mb"):
        return "MB"
    if name.endswith("_s"):
        return "s"
    return ""


GOALS: dict[str, str] = {
    "process_rss_growth_mb": "goal ≤ 50 MB for 100,000 waiting tasks",
    "process_waiting_threads": "goal: as many as idle",
    "process_waiting_sockets": "goal: as many as idle",
    "process_waiting_fds": "goal: as many as idle",
    "inproc_waiting_asyncio_tasks": "goal: as many as idle",
    "inproc_waiting_worker_steps": "goal: 0 (nothing runs for a waiting task)",
}


def run(quick: bool) -> dict[str, float]:
    """Both measurements on temporary files; print one line each; return {name: value}."""
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as tmp:
        results = asyncio.run(run_async(quick, Path(tmp)))
    for name, value in results.items():
        goal = GOALS.get(name)
        print(f"{name}: {value:,.2f} {unit_of(name)}" + (f" ({goal})" if goal else ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20,000 waiting tasks")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
