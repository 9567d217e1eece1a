"""The SQLite adapter of TaskStore: the embedded default (one file, WAL, several processes).

This module is the schema, the SQL of every TaskStore operation, and the mapping between rows and
records; its statements run through ``sqlite_exec.BatchExecutor`` (one database thread, reads in
one snapshot, writes group-committed). It is long because it is one thing: the adapter of one
port (``store.TaskStore``) over one driver, every method a transaction of the same few tables.

The change feed is the append-only ``feed_events`` table; a position is ``str(seq)``. After a
commit that appended events, in-process listeners (see ``listen``) are woken at once; other
processes' writes are found by polling (``feed.SqliteFeed``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import orjson

from statemachine.errors import (
    BadRequest,
    Conflict,
    HooklineError,
    InsufficientCredits,
    NotFound,
    StoreError,
    Unavailable,
)
from statemachine.sqlite_exec import BatchExecutor, Tx, connect
from statemachine.states import REFUNDED_STATES, TERMINAL, State, state_of
from statemachine.store import FeedEvent, LedgerEntry, LedgerKind, Page, User
from statemachine.task import Task, TaskDoc, from_doc, to_doc

T = TypeVar("T")

# The partial index and the query must spell this predicate identically for SQLite to use it.
_NON_TERMINAL_SQL: Final = "state NOT IN ({})".format(
    ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
)

# Tasks holding a provider slot (counted against HOOKLINE_PROVIDER_CONCURRENCY): every job in
# ai_processing, and a processing task once its inputs are ready and it submits (``holds_slot``).
_ACTIVE_SQL: Final = (
    "(state = 'ai_processing' OR (state = 'processing' AND json_extract(doc, '$.holds_slot')))"
)
_PROVIDER_SQL: Final = "json_extract(doc, '$.provider')"
_JOB_SQL: Final = "json_extract(doc, '$.provider_job_id')"

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    balance INTEGER NOT NULL,
    is_admin INTEGER NOT NULL,
    created_at REAL NOT NULL,
    rate_limit_per_s REAL,
    rate_limit_burst INTEGER
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    task_id TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'debit', 'refund')),
    amount INTEGER NOT NULL,
    at REAL NOT NULL,
    UNIQUE (task_id, kind)
);
CREATE INDEX IF NOT EXISTS ledger_user ON ledger (user, id);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    deadline REAL,
    created_at REAL NOT NULL,
    idempotency_key TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_overdue ON tasks (deadline) WHERE {_NON_TERMINAL_SQL};
CREATE INDEX IF NOT EXISTS tasks_owner_created ON tasks (owner, created_at, id);
DROP INDEX IF EXISTS tasks_active_provider;
DROP INDEX IF EXISTS tasks_active;
CREATE INDEX IF NOT EXISTS tasks_in_flight ON tasks ({_PROVIDER_SQL}, owner) WHERE {_ACTIVE_SQL};
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at, id);
CREATE INDEX IF NOT EXISTS tasks_job ON tasks ({_JOB_SQL}, {_PROVIDER_SQL})
    WHERE {_NON_TERMINAL_SQL};
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS deliveries (
    provider TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (provider, delivery_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at);
CREATE TABLE IF NOT EXISTS feed_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    source TEXT,
    dest TEXT NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS feed_events_task ON feed_events (task_id, seq);
CREATE TABLE IF NOT EXISTS watcher_positions (
    watcher TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
"""

# Columns added to ``users`` after its first release: ``open`` adds those an older file lacks (its
# rows then read NULL, the process's defaults). An older version's ``users create`` cannot insert
# into the wider table (its INSERT names no columns): upgrade the CLI together with the servers.
_ADDED_USER_COLUMNS: Final = (("rate_limit_per_s", "REAL"), ("rate_limit_burst", "INTEGER"))
_USER_COLUMNS: Final = "name, balance, is_admin, created_at, rate_limit_per_s, rate_limit_burst"

_TASK_INSERT: Final = (
    "INSERT INTO tasks (id, owner, state, version, deadline, created_at, idempotency_key, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_FEED_INSERT: Final = (
    "INSERT INTO feed_events (task_id, owner, source, dest, event, at, version)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_LEDGER_INSERT: Final = (
    "INSERT INTO ledger (user, task_id, kind, amount, at) VALUES (?, ?, ?, ?, ?)"
)
_FEED_COLUMNS: Final = "seq, task_id, owner, source, dest, event, at, version"

# The statements whose plans the contract suite checks (``explain``), with sample arguments.
_QUERIES: Final[dict[str, tuple[str, tuple[Any, ...]]]] = {
    "overdue": (
        f"SELECT doc FROM tasks WHERE {_NON_TERMINAL_SQL} AND deadline <= ?"
        " ORDER BY deadline LIMIT ?",
        (0.0, 1),
    ),
    "task_feed": (
        f"SELECT {_FEED_COLUMNS} FROM feed_events WHERE task_id = ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        ("t", 0, 1),
    ),
    "task_by_job": (
        f"SELECT doc FROM tasks WHERE {_NON_TERMINAL_SQL} AND {_JOB_SQL} = ?"
        f" AND {_PROVIDER_SQL} = ? LIMIT 1",
        ("job", "sim"),
    ),
    "count_active": (
        f"SELECT count(*) FROM tasks WHERE {_ACTIVE_SQL} AND {_PROVIDER_SQL} = ?",
        ("sim",),
    ),
    "count_active_owner": (
        f"SELECT count(*) FROM tasks WHERE {_ACTIVE_SQL} AND {_PROVIDER_SQL} = ? AND owner = ?",
        ("sim", "alice"),
    ),
    # Without a provider no index column is constrained and the planner would rather scan the
    # whole table in owner order; the partial index holds only the tasks in flight.
    "active_by_owner": (
        f"SELECT owner, count(*) AS n FROM tasks INDEXED BY tasks_in_flight WHERE {_ACTIVE_SQL}"
        " GROUP BY owner ORDER BY n DESC, owner LIMIT ?",
        (1,),
    ),
    "active_by_owner_provider": (
        f"SELECT owner, count(*) AS n FROM tasks WHERE {_ACTIVE_SQL} AND {_PROVIDER_SQL} = ?"
        " GROUP BY owner ORDER BY n DESC, owner LIMIT ?",
        ("sim", 1),
    ),
    "prune_feed": (
        "SELECT seq, at FROM feed_events WHERE seq <= ? ORDER BY seq LIMIT ?",
        (0, 1),
    ),
    "old_deliveries": (
        "SELECT provider, delivery_id FROM deliveries WHERE at < ? ORDER BY at LIMIT ?",
        (0.0, 1),
    ),
}


def _task_row(task: Task) -> tuple[Any, ...]:
    doc = orjson.dumps(to_doc(task)).decode()
    return (
        task.id,
        task.owner,
        task.state.value,
        task.version,
        task.deadline,
        task.created_at,
        task.idempotency_key,
        doc,
    )


def _load(doc: str) -> Task:
    return from_doc(cast(TaskDoc, orjson.loads(doc)))


def _feed_event(row: tuple[Any, ...]) -> FeedEvent:
    seq, task_id, owner, source, dest, event, at, version = row
    return FeedEvent(
        str(seq),
        task_id,
        owner,
        state_of(source) if source else None,
        state_of(dest),
        event,
        at,
        version,
    )


def _user(row: tuple[Any, ...]) -> User:
    return User(row[0], row[1], bool(row[2]), row[3], row[4], row[5])


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring the ``users`` table of a file made by an older version up to ``_SCHEMA``."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
    for name, kind in _ADDED_USER_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE users ADD COLUMN {name} {kind}")


def encode_cursor(created_at: float, task_id: str) -> str:
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = json.loads(raw)
        if not isinstance(task_id, str) or not isinstance(created_at, int | float):
            raise ValueError("wrong types")
    except (ValueError, binascii.Error, TypeError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    return float(created_at), task_id


def _saved_seq(position: str) -> int:
    """A watcher's saved position as a sequence number; one that is not (never written by this
    adapter) counts as the very start, so retention keeps everything rather than guess."""
    try:
        return int(position)
    except ValueError:
        return 0


def _seq(position: str | None) -> int:
    if position is None:
        return 0
    try:
        return int(position)
    except ValueError as exc:
        raise BadRequest(f"invalid feed position {position!r}", code="invalid_position") from exc


class SqliteStore:
    """TaskStore on one SQLite file, safe to share between several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._exec: BatchExecutor | None = None
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._listeners_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``."""
        prefix = "sqlite:///"
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ValueError(f"not a sqlite URL with a file path: {url!r}")
        return cls(url[len(prefix) :].split("?", 1)[0])

    # lifecycle

    async def open(self) -> None:
        """Create the file, the schema and the indexes if missing, and start the database thread."""
        if self._exec is not None:
            return
        await asyncio.to_thread(self._create_schema)
        executor = BatchExecutor("hookline-sqlite", lambda: connect(self.path), self._notify)
        await asyncio.to_thread(executor.start)
        self._exec = executor

    def _create_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(self.path)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _add_missing_columns(conn)
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open {self.path}: {exc}") from exc

    async def close(self) -> None:
        executor, self._exec = self._exec, None
        if executor is not None:
            await asyncio.to_thread(executor.stop)

    async def ping(self) -> None:
        try:
            await self._read(lambda c: c.execute("SELECT 1 FROM users LIMIT 1").fetchall())
        except HooklineError as exc:
            raise Unavailable(f"store unavailable: {exc.message}") from exc

    # plumbing

    def _executor(self) -> BatchExecutor:
        executor = self._exec
        if executor is None:
            raise Unavailable("the store is not open")
        return executor

    async def _write(self, fn: Callable[[Tx], T]) -> T:
        return await self._executor().write(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._executor().read(fn)

    # Companion adapters (the outbox, the timeline) keep their own tables in this file and run
    # their statements through this store's one database thread: the same batching and commits.

    async def run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in the next batch's read snapshot (see ``sqlite_exec``)."""
        return await self._read(fn)

    async def run_write(self, fn: Callable[[Tx], T]) -> T:
        """``fn(tx)`` in its own savepoint of the next batch's write transaction."""
        return await self._write(fn)

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Event]:
        """An event set (thread-safely, on the caller's loop) after every commit in this process
        that appended feed events. Clear it before reading the feed, then wait on it."""
        event = asyncio.Event()
        key = id(event)
        with self._listeners_lock:
            self._listeners[key] = (asyncio.get_running_loop(), event)
        try:
            yield event
        finally:
            with self._listeners_lock:
                del self._listeners[key]

    @property
    def listener_count(self) -> int:
        with self._listeners_lock:
            return len(self._listeners)

    def _notify(self) -> None:
        with self._listeners_lock:
            targets = list(self._listeners.values())
        for loop, event in targets:
            with contextlib.suppress(RuntimeError):  # a closed loop: its listener is gone
                loop.call_soon_threadsafe(event.set)

    # users, keys, credits

    async def create_user(
        self,
        name: str,
        credits: int,
        *,
        is_admin: bool,
        key_hash: str,
        now: float,
        rate_limit_per_s: float | None = None,
        rate_limit_burst: int | None = None,
    ) -> User:
        def op(tx: Tx) -> User:
            c = tx.conn
            if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"user {name!r} exists", code="user_exists")
            if c.execute("SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone():
                raise Conflict("API key exists", code="key_exists")
            c.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (name, credits, int(is_admin), now, rate_limit_per_s, rate_limit_burst),
            )
            c.execute("INSERT INTO api_keys VALUES (?, ?, ?)", (key_hash, name, now))
            if credits:
                c.execute(_LEDGER_INSERT, (name, None, "grant", credits, now))
            return User(name, credits, is_admin, now, rate_limit_per_s, rate_limit_burst)

        return await self._write(op)

    async def set_user_limits(
        self, name: str, *, rate_limit_per_s: float | None, rate_limit_burst: int | None
    ) -> User:
        def op(tx: Tx) -> User:
            row = tx.conn.execute(
                "UPDATE users SET rate_limit_per_s = ?, rate_limit_burst = ? WHERE name = ?"
                f" RETURNING {_USER_COLUMNS}",
                (rate_limit_per_s, rate_limit_burst, name),
            ).fetchone()
            if row is None:
                raise NotFound(f"no user {name!r}", code="user_not_found")
            return _user(row)

        return await self._write(op)

    async def add_api_key(self, name: str, key_hash: str, now: float) -> None:
        def op(tx: Tx) -> None:
            c = tx.conn
            if not c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no user {name!r}", code="user_not_found")
            if c.execute("SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone():
                raise Conflict("API key exists", code="key_exists")
            c.execute("INSERT INTO api_keys VALUES (?, ?, ?)", (key_hash, name, now))

        await self._write(op)

    async def user_by_key_hash(self, key_hash: str) -> User | None:
        def op(c: sqlite3.Connection) -> User | None:
            row = c.execute(
                f"SELECT {_USER_COLUMNS} FROM users"
                " WHERE name = (SELECT user FROM api_keys WHERE key_hash = ?)",
                (key_hash,),
            ).fetchone()
            return _user(row) if row else None

        return await self._read(op)

    async def get_user(self, name: str) -> User | None:
        def op(c: sqlite3.Connection) -> User | None:
            row = c.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
            return _user(row) if row else None

        return await self._read(op)

    async def grant(self, name: str, amount: int, now: float) -> int:
        def op(tx: Tx) -> int:
            c = tx.conn
            row = c.execute(
                "UPDATE users SET balance = balance + ? WHERE name = ? RETURNING balance",
                (amount, name),
            ).fetchone()
            if row is None:
                raise NotFound(f"no user {name!r}", code="user_not_found")
            c.execute(_LEDGER_INSERT, (name, None, "grant", amount, now))
            return int(row[0])

        return await self._write(op)

    async def ledger(self, name: str) -> list[LedgerEntry]:
        def op(c: sqlite3.Connection) -> list[LedgerEntry]:
            rows = c.execute(
                "SELECT user, kind, amount, at, task_id FROM ledger WHERE user = ? ORDER BY id",
                (name,),
            ).fetchall()
            return [LedgerEntry(r[0], cast(LedgerKind, r[1]), r[2], r[3], r[4]) for r in rows]

        return await self._read(op)

    # tasks

    async def create_task(self, task: Task) -> tuple[Task, bool]:
        if task.state is not State.PENDING or task.version != 1:
            raise ValueError("a new task is pending at version 1")
        row = _task_row(task)

        def op(tx: Tx) -> tuple[Task, bool]:
            c = tx.conn
            if task.idempotency_key is not None:
                found = c.execute(
                    "SELECT doc FROM tasks WHERE owner = ? AND idempotency_key = ?",
                    (task.owner, task.idempotency_key),
                ).fetchone()
                if found is not None:
                    first = _load(found[0])
                    if first.request_hash != task.request_hash:
                        raise Conflict(
                            "Idempotency-Key reused with another request",
                            code="idempotency_conflict",
                        )
                    return first, False
            balance = c.execute(
                "SELECT balance FROM users WHERE name = ?", (task.owner,)
            ).fetchone()
            if balance is None:
                raise NotFound(f"no user {task.owner!r}", code="user_not_found")
            if balance[0] < task.cost:
                raise InsufficientCredits(
                    f"balance {balance[0]} is below the cost {task.cost}",
                    details={"balance": balance[0], "cost": task.cost},
                )
            try:
                c.execute(_TASK_INSERT, row)
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"task {task.id!r} exists", code="task_exists") from exc
            c.execute(
                "UPDATE users SET balance = balance - ? WHERE name = ?", (task.cost, task.owner)
            )
            c.execute(_LEDGER_INSERT, (task.owner, task.id, "debit", -task.cost, task.created_at))
            c.execute(
                _FEED_INSERT,
                (task.id, task.owner, None, task.state.value, "created", task.created_at, 1),
            )
            tx.emitted = True
            return task, True

        return await self._write(op)

    async def get_task(self, task_id: str) -> Task | None:
        def op(c: sqlite3.Connection) -> Task | None:
            row = c.execute("SELECT doc FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _load(row[0]) if row else None

        return await self._read(op)

    async def task_by_job(self, provider: str, job_id: str) -> Task | None:
        sql = _QUERIES["task_by_job"][0]

        def op(c: sqlite3.Connection) -> Task | None:
            row = c.execute(sql, (job_id, provider)).fetchone()
            return _load(row[0]) if row else None

        return await self._read(op)

    async def list_tasks(
        self, owner: str | None, state: State | None, limit: int, cursor: str | None
    ) -> Page:
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        if cursor is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(decode_cursor(cursor))
        sql = "SELECT doc FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit + 1)

        def op(c: sqlite3.Connection) -> list[Task]:
            return [_load(r[0]) for r in c.execute(sql, args)]

        tasks = await self._read(op)
        if len(tasks) <= limit:
            return Page(tasks, None)
        items = tasks[:limit]
        return Page(items, encode_cursor(items[-1].created_at, items[-1].id))

    async def transition(
        self, task: Task, expected_state: State, expected_version: int, *, emit: bool = True
    ) -> bool:
        if task.version != expected_version + 1:
            raise ValueError(f"version {task.version} does not follow {expected_version}")
        if emit and not task.history:
            raise ValueError("emit=True needs a history entry to publish")
        row = _task_row(task)
        entry = task.history[-1] if emit else None
        refund = task.refunded and task.state in REFUNDED_STATES

        def op(tx: Tx) -> bool:
            c = tx.conn
            cur = c.execute(
                "UPDATE tasks SET state = ?, version = ?, deadline = ?, doc = ?"
                " WHERE id = ? AND state = ? AND version = ?",
                (row[2], row[3], row[4], row[7], task.id, expected_state.value, expected_version),
            )
            if cur.rowcount == 0:
                return False
            if entry is not None:
                c.execute(
                    _FEED_INSERT,
                    (
                        task.id,
                        task.owner,
                        entry.source.value,
                        entry.dest.value,
                        entry.event,
                        entry.at,
                        task.version,
                    ),
                )
                tx.emitted = True
            if refund:
                self._refund(c, task)
            return True

        return await self._write(op)

    @staticmethod
    def _refund(c: sqlite3.Connection, task: Task) -> None:
        """Credit the cost back once per task: the ledger's UNIQUE(task_id, kind) decides."""
        cur = c.execute(
            "INSERT OR IGNORE INTO ledger (user, task_id, kind, amount, at)"
            " VALUES (?, ?, 'refund', ?, ?)",
            (task.owner, task.id, task.cost, task.updated_at),
        )
        if cur.rowcount == 1:
            c.execute(
                "UPDATE users SET balance = balance + ? WHERE name = ?", (task.cost, task.owner)
            )

    async def overdue(self, now: float, limit: int) -> list[Task]:
        sql = _QUERIES["overdue"][0]

        def op(c: sqlite3.Connection) -> list[Task]:
            return [_load(r[0]) for r in c.execute(sql, (now, limit))]

        return await self._read(op)

    async def explain(self, query: str) -> list[str]:
        """The query plan of one of the adapter's indexed statements (``overdue``, ``task_feed``,
        ``count_active``, ``count_active_owner``, ``active_by_owner``,
        ``active_by_owner_provider``, ``prune_feed``, ``old_deliveries``): tests prove each uses
        its index."""
        sql, args = _QUERIES[query]
        plan = f"EXPLAIN QUERY PLAN {sql}"
        return await self._read(lambda c: [str(r[-1]) for r in c.execute(plan, args)])

    async def explain_overdue(self) -> list[str]:
        """The query plan of ``overdue`` (tests prove it goes through the partial index)."""
        return await self.explain("overdue")

    async def count_by_state(self, owner: str | None) -> dict[State, int]:
        sql = "SELECT state, count(*) FROM tasks"
        args: tuple[str, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            args = (owner,)
        sql += " GROUP BY state"
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        counts = dict.fromkeys(State, 0)
        counts.update({state_of(s): n for s, n in rows})
        return counts

    async def count_active(self, provider: str, owner: str | None = None) -> int:
        args: tuple[Any, ...]
        if owner is None:
            sql, args = _QUERIES["count_active"][0], (provider,)
        else:
            sql, args = _QUERIES["count_active_owner"][0], (provider, owner)
        row = await self._read(lambda c: c.execute(sql, args).fetchone())
        return int(row[0])

    async def active_by_owner(self, provider: str | None, limit: int) -> dict[str, int]:
        args: tuple[Any, ...]
        if provider is None:
            sql, args = _QUERIES["active_by_owner"][0], (limit,)
        else:
            sql, args = _QUERIES["active_by_owner_provider"][0], (provider, limit)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return {str(owner): int(n) for owner, n in rows}

    async def tasks_since(self, since: float, owner: str | None) -> list[Task]:
        sql = "SELECT doc FROM tasks WHERE created_at >= ?"
        args: tuple[Any, ...] = (since,)
        if owner is not None:
            sql += " AND owner = ?"
            args = (since, owner)
        sql += " ORDER BY created_at, id"
        return await self._read(lambda c: [_load(r[0]) for r in c.execute(sql, args)])

    async def bulk_load_for_bench(self, docs: Iterable[TaskDoc]) -> None:
        """Bench/test only: insert stored documents as they are, in one transaction, with no
        debit, no idempotency check and no feed event."""

        def rows() -> Iterator[tuple[Any, ...]]:
            for d in docs:
                yield (
                    d["id"],
                    d["owner"],
                    d["state"],
                    d["version"],
                    d["deadline"],
                    d["created_at"],
                    d["idempotency_key"],
                    json.dumps(d, separators=(",", ":")),
                )

        def op(tx: Tx) -> None:
            tx.conn.executemany(_TASK_INSERT, rows())

        await self._write(op)

    # webhook deliveries

    async def seen_delivery(self, provider: str, delivery_id: str) -> bool:
        sql = "SELECT 1 FROM deliveries WHERE provider = ? AND delivery_id = ?"
        return (
            await self._read(lambda c: c.execute(sql, (provider, delivery_id)).fetchone())
            is not None
        )

    async def record_delivery(
        self, provider: str, delivery_id: str, task_id: str, now: float
    ) -> bool:
        sql = "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)"
        args = (provider, delivery_id, task_id, now)
        return await self._write(lambda tx: tx.conn.execute(sql, args).rowcount == 1)

    async def prune_deliveries(self, before_at: float, limit: int) -> int:
        sql = (
            "DELETE FROM deliveries WHERE (provider, delivery_id) IN"
            f" ({_QUERIES['old_deliveries'][0]})"
        )
        args = (before_at, limit)
        return await self._write(lambda tx: tx.conn.execute(sql, args).rowcount)

    # change feed

    async def feed_after(self, position: str | None, limit: int) -> list[FeedEvent]:
        sql = f"SELECT {_FEED_COLUMNS} FROM feed_events WHERE seq > ? ORDER BY seq LIMIT ?"
        args = (_seq(position), limit)
        return await self._read(lambda c: [_feed_event(r) for r in c.execute(sql, args)])

    async def task_feed_after(
        self, task_id: str, position: str | None, limit: int
    ) -> list[FeedEvent]:
        sql = _QUERIES["task_feed"][0]
        after = _seq(position)

        def op(c: sqlite3.Connection) -> list[FeedEvent]:
            events = [_feed_event(r) for r in c.execute(sql, (task_id, after, limit))]
            # Retention deletes from the start of the feed only, so every event after ``after``
            # is still here if the oldest one left follows it directly (same read snapshot).
            tail = c.execute("SELECT min(seq) FROM feed_events").fetchone()[0]
            if tail is not None and after < tail - 1:
                raise StoreError(f"feed events after {position!r} were pruned", code="feed_pruned")
            return events

        return await self._read(op)

    async def feed_head(self) -> str | None:
        row = await self._read(lambda c: c.execute("SELECT max(seq) FROM feed_events").fetchone())
        return None if row is None or row[0] is None else str(row[0])

    async def prune_feed(self, before_at: float, limit: int) -> int:
        def op(tx: Tx) -> int:
            c = tx.conn
            head = c.execute("SELECT max(seq) FROM feed_events").fetchone()[0]
            if head is None:
                return 0
            keep_after = head - 1  # the newest event stays: feed_head keeps its meaning
            for (saved,) in c.execute("SELECT position FROM watcher_positions"):
                keep_after = min(keep_after, _saved_seq(saved))
            rows = c.execute(_QUERIES["prune_feed"][0], (keep_after, limit)).fetchall()
            last = None
            for seq, at in rows:
                if at >= before_at:
                    break  # a contiguous run from the start: stop at the first recent event
                last = seq
            if last is None:
                return 0
            return int(c.execute("DELETE FROM feed_events WHERE seq <= ?", (last,)).rowcount)

        return await self._write(op)

    async def save_position(self, watcher: str, position: str) -> None:
        sql = (
            "INSERT INTO watcher_positions VALUES (?, ?)"
            " ON CONFLICT (watcher) DO UPDATE SET position = excluded.position"
        )

        def op(tx: Tx) -> None:
            tx.conn.execute(sql, (watcher, position))

        await self._write(op)

    async def load_position(self, watcher: str) -> str | None:
        sql = "SELECT position FROM watcher_positions WHERE watcher = ?"
        row = await self._read(lambda c: c.execute(sql, (watcher,)).fetchone())
        return None if row is None else str(row[0])

    async def reconcile(self, now: float) -> int:
        """Nothing to repair: every multi-write operation here is one transaction."""
        return 0
