"""Running SQLite statements off the event loop: one database thread, batched, group-committed.

No statement runs on the event loop. Every operation is queued to one database thread with its
own connection, which drains the queue in batches: the batch's reads first (one read snapshot),
then its writes, group-committed: each write inside its own SAVEPOINT (a failing write undoes only
itself) of one ``BEGIN IMMEDIATE`` transaction, the callers' futures resolved only after
``COMMIT``, so an acknowledged write survives a process crash (WAL with ``synchronous=NORMAL``).
One thread rather than a reader and a writer: with the GIL, a second thread measured slower
(bench/bench_store.py); the price is that reads wait while this process waits for the write lock.

The executor knows no schema. A read op is ``fn(conn)``; a write op is ``fn(tx)`` and sets
``tx.emitted`` when it appended feed events, so that ``on_commit_emitted`` runs after the commit
(the store wakes its feed listeners there). Driver errors leave as ``StoreError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import structlog

from statemachine.errors import StoreError

T = TypeVar("T")

log = structlog.get_logger(__name__)

BUSY_TIMEOUT_S: Final = 10.0
MAX_BATCH: Final = 512


@dataclass(slots=True)
class Tx:
    """What a write op sees: the writer's connection, and a flag to say it appended feed events."""

    conn: sqlite3.Connection
    emitted: bool = False


@dataclass(slots=True)
class _Op:
    """A queued read (``fn(conn)``) or write (``fn(tx)``) and the future its caller awaits."""

    fn: Callable[[Any], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Outcome:
    op: _Op
    result: Any = None
    error: BaseException | None = None


_STOP: Final = object()


def connect(path: Path) -> sqlite3.Connection:
    """A connection as the executor uses it: autocommit (it issues BEGIN itself), any thread."""
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


class BatchExecutor:
    """One thread owning one connection, running queued ops in batches (see the module doc).

    ``connect`` is called once, by ``start``. ``on_commit_emitted`` runs on the database thread
    after each commit that included a write with ``tx.emitted`` set, before that batch's callers
    are resumed; it must be quick and thread-safe.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        on_commit_emitted: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._connect = connect
        self._on_commit_emitted = on_commit_emitted
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the connection and start the thread (blocking: call through a thread)."""
        conn = self._connect()
        self._thread = threading.Thread(
            target=self._loop, args=(conn,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the thread (blocking: call through a thread)."""
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` inside the read transaction of the next batch."""
        return cast(T, await self._enqueue(fn, write=False))

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """``fn(tx)`` in its own savepoint of the next batch's write transaction; returns (or
        raises) only after that transaction committed (or failed)."""
        return cast(T, await self._enqueue(fn, write=True))

    def _enqueue(self, fn: Callable[[Any], Any], *, write: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._inbox.put(_Op(fn, write, loop, future))
        return future

    def _loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._inbox.get()
            if first is _STOP:
                break
            batch = [cast(_Op, first)]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(cast(_Op, item))
            try:
                outcomes = self._run_batch(conn, batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("sqlite.worker_failed", ops=len(batch))
                outcomes = [_Outcome(op, error=exc) for op in batch]
            by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            for outcome in outcomes:
                by_loop.setdefault(outcome.op.loop, []).append(outcome)
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
                    loop.call_soon_threadsafe(_resolve, items)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[_Outcome]:
        reads = [op for op in batch if not op.write]
        writes = [op for op in batch if op.write]
        outcomes = _read_batch(conn, reads) if reads else []
        if writes:
            written, emitted = _write_batch(conn, writes)
            outcomes.extend(written)
            if emitted and self._on_commit_emitted is not None:
                self._on_commit_emitted()
        return outcomes


def _resolve(outcomes: list[_Outcome]) -> None:
    """Runs on the caller's loop: settle the futures of one batch."""
    for o in outcomes:
        if o.op.future.cancelled():
            continue
        if o.error is not None:
            o.op.future.set_exception(o.error)
        else:
            o.op.future.set_result(o.result)


def _call(fn: Callable[[Any], T], arg: Any) -> T:
    """Run one op, translating driver errors at the boundary."""
    try:
        return fn(arg)
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc


def _write_batch(conn: sqlite3.Connection, batch: list[_Op]) -> tuple[list[_Outcome], bool]:
    """One transaction for the batch, one savepoint per op. Returns outcomes and "emitted"."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        err = _store_error("cannot start a write transaction", exc)
        return [_Outcome(op, error=err) for op in batch], False
    tx = Tx(conn)
    outcomes: list[_Outcome] = []
    emitted = False
    try:
        for op in batch:
            tx.emitted = False
            conn.execute("SAVEPOINT op")
            try:
                result = _call(op.fn, tx)
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append(_Outcome(op, error=exc))
            else:
                conn.execute("RELEASE op")
                outcomes.append(_Outcome(op, result=result))
                emitted = emitted or tx.emitted
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        # The transaction itself failed (savepoint or commit): nothing of the batch is written.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        log.error("sqlite.batch_failed", ops=len(batch), error=str(exc))
        err = _store_error("write transaction failed", exc)
        return [_Outcome(op, error=err) for op in batch], False
    return outcomes, emitted


def _read_batch(conn: sqlite3.Connection, batch: list[_Op]) -> list[_Outcome]:
    """The reads of one batch, in one read transaction (one snapshot, one lock round-trip)."""
    outcomes: list[_Outcome] = []
    try:
        conn.execute("BEGIN")
    except sqlite3.Error as exc:
        err = _store_error("cannot start a read transaction", exc)
        return [_Outcome(op, error=err) for op in batch]
    for op in batch:
        try:
            outcomes.append(_Outcome(op, result=_call(op.fn, conn)))
        except Exception as exc:
            outcomes.append(_Outcome(op, error=exc))
    try:
        conn.execute("COMMIT")
    except sqlite3.Error:
        # Never leave a read snapshot open: the next write's BEGIN IMMEDIATE would fail.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
    return outcomes


def _store_error(message: str, exc: sqlite3.Error) -> StoreError:
    try:
        raise StoreError(f"sqlite: {message}: {exc}") from exc
    except StoreError as err:
        return err
