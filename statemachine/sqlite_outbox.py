"""The SQLite adapter of the Outbox port: its tables in the store's file, its statements run by
the store's one database thread (``SqliteStore.run_read`` / ``run_write``: same batches, same
group commits, so a claim or a settle is one savepoint of a shared transaction).

A claim is an ``UPDATE … RETURNING`` over the due-pending index: the write lock makes it exclusive
across processes, so two deliverers never hold one message at once.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

import orjson

from statemachine.errors import Conflict, NotFound
from statemachine.outbox import (
    DeliveryAttempt,
    Depth,
    Endpoint,
    Message,
    MessageState,
    OwnerSecret,
)
from statemachine.sqlite_exec import Tx
from statemachine.sqlite_store import SqliteStore

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    previous_secret TEXT,
    previous_until REAL,
    disabled_at REAL,
    disabled_reason TEXT
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner, created_at);
CREATE TABLE IF NOT EXISTS webhook_owner_secrets (
    owner TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    previous_secret TEXT,
    previous_until REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    task_id TEXT NOT NULL,
    event TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at REAL,
    lease_owner TEXT,
    lease_expires REAL,
    last_status INTEGER,
    last_error TEXT,
    settled_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_task ON outbox (task_id, created_at);
CREATE INDEX IF NOT EXISTS outbox_settled ON outbox (settled_at) WHERE state != 'pending';
CREATE INDEX IF NOT EXISTS outbox_pending_owner ON outbox (owner) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_pending_age ON outbox (created_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_leased ON outbox (url, lease_expires)
    WHERE state = 'pending' AND lease_expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS outbox_attempts (
    message_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    at REAL NOT NULL,
    latency_ms REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    next_retry_at REAL,
    PRIMARY KEY (message_id, number)
) WITHOUT ROWID;
"""

_ENDPOINT_COLUMNS: Final = (
    "id, owner, url, events, secret, created_at, previous_secret, previous_until, disabled_at,"
    " disabled_reason"
)
_MESSAGE_COLUMNS: Final = (
    "id, owner, task_id, event, endpoint_id, url, body, created_at, queued_at, state, attempts,"
    " next_at, lease_owner, lease_expires, last_status, last_error, settled_at"
)
_ATTEMPT_COLUMNS: Final = "message_id, number, at, latency_ms, status_code, error, next_retry_at"

# The statements whose plans the contract suite checks, with sample arguments.
QUERIES: Final[dict[str, tuple[str, tuple[Any, ...]]]] = {
    "claim": (
        "SELECT id, url FROM outbox WHERE state = 'pending' AND next_at <= ?"
        " AND (lease_expires IS NULL OR lease_expires <= ?) ORDER BY next_at LIMIT ?",
        (0.0, 0.0, 1),
    ),
    "leased": (
        "SELECT count(*) FROM outbox WHERE state = 'pending' AND lease_expires IS NOT NULL"
        " AND url = ? AND lease_expires > ?",
        ("u", 0.0),
    ),
    "pending_owner": (
        "SELECT count(*) FROM outbox WHERE state = 'pending' AND owner = ?",
        ("alice",),
    ),
    "task_messages": (
        f"SELECT {_MESSAGE_COLUMNS} FROM outbox WHERE task_id = ? ORDER BY created_at LIMIT ?",
        ("t", 1),
    ),
    "prune": (
        "SELECT id FROM outbox WHERE state != 'pending' AND settled_at < ?"
        " ORDER BY settled_at LIMIT ?",
        (0.0, 1),
    ),
}


def _endpoint(row: tuple[Any, ...]) -> Endpoint:
    return Endpoint(
        id=row[0],
        owner=row[1],
        url=row[2],
        events=tuple(orjson.loads(row[3])),
        secret=row[4],
        created_at=row[5],
        previous_secret=row[6],
        previous_until=row[7],
        disabled_at=row[8],
        disabled_reason=row[9],
    )


def _message(row: tuple[Any, ...]) -> Message:
    return Message(
        id=row[0],
        owner=row[1],
        task_id=row[2],
        event=row[3],
        endpoint_id=row[4],
        url=row[5],
        body=bytes(row[6]),
        created_at=row[7],
        queued_at=row[8],
        state=row[9],
        attempts=row[10],
        next_at=row[11],
        lease_owner=row[12],
        lease_expires=row[13],
        last_status=row[14],
        last_error=row[15],
        settled_at=row[16],
    )


def _attempt(row: tuple[Any, ...]) -> DeliveryAttempt:
    return DeliveryAttempt(
        message_id=row[0],
        number=row[1],
        at=row[2],
        latency_ms=row[3],
        status_code=row[4],
        error=row[5],
        next_retry_at=row[6],
    )


class SqliteOutbox:
    """The Outbox on the tables of one ``SqliteStore``'s file."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    async def open(self) -> None:
        def create(tx: Tx) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.conn.execute(statement)

        await self._store.run_write(create)

    # endpoints

    async def add_endpoint(self, endpoint: Endpoint, *, max_per_owner: int) -> None:
        def add(tx: Tx) -> None:
            (count,) = tx.conn.execute(
                "SELECT count(*) FROM webhook_endpoints WHERE owner = ?", (endpoint.owner,)
            ).fetchone()
            if count >= max_per_owner:
                raise Conflict(
                    f"at most {max_per_owner} webhook endpoints per user",
                    code="too_many_webhooks",
                )
            tx.conn.execute(
                f"INSERT INTO webhook_endpoints ({_ENDPOINT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    endpoint.id,
                    endpoint.owner,
                    endpoint.url,
                    orjson.dumps(list(endpoint.events)).decode(),
                    endpoint.secret,
                    endpoint.created_at,
                    endpoint.previous_secret,
                    endpoint.previous_until,
                    endpoint.disabled_at,
                    endpoint.disabled_reason,
                ),
            )

        await self._store.run_write(add)

    async def endpoints(self, owner: str) -> list[Endpoint]:
        def read(conn: sqlite3.Connection) -> list[Endpoint]:
            rows = conn.execute(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE owner = ?"
                " ORDER BY created_at, id",
                (owner,),
            ).fetchall()
            return [_endpoint(r) for r in rows]

        return await self._store.run_read(read)

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        def read(conn: sqlite3.Connection) -> Endpoint | None:
            row = conn.execute(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = ?", (endpoint_id,)
            ).fetchone()
            return _endpoint(row) if row else None

        return await self._store.run_read(read)

    async def delete_endpoint(self, owner: str, endpoint_id: str) -> bool:
        def delete(tx: Tx) -> bool:
            cur = tx.conn.execute(
                "DELETE FROM webhook_endpoints WHERE id = ? AND owner = ?", (endpoint_id, owner)
            )
            return cur.rowcount == 1

        return await self._store.run_write(delete)

    async def rotate_endpoint(
        self, owner: str, endpoint_id: str, secret: str, previous_until: float
    ) -> Endpoint:
        def rotate(tx: Tx) -> Endpoint:
            row = tx.conn.execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = ?,"
                f" secret = ? WHERE id = ? AND owner = ? RETURNING {_ENDPOINT_COLUMNS}",
                (previous_until, secret, endpoint_id, owner),
            ).fetchone()
            if row is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}", code="webhook_not_found")
            return _endpoint(row)

        return await self._store.run_write(rotate)

    async def disable_endpoint(self, endpoint_id: str, reason: str, now: float) -> None:
        def disable(tx: Tx) -> None:
            tx.conn.execute(
                "UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ?"
                " WHERE id = ? AND disabled_at IS NULL",
                (now, reason, endpoint_id),
            )

        await self._store.run_write(disable)

    # owners' secrets

    async def owner_secret(self, owner: str) -> OwnerSecret | None:
        def read(conn: sqlite3.Connection) -> OwnerSecret | None:
            row = conn.execute(
                "SELECT owner, secret, created_at, previous_secret, previous_until"
                " FROM webhook_owner_secrets WHERE owner = ?",
                (owner,),
            ).fetchone()
            return OwnerSecret(*row) if row else None

        return await self._store.run_read(read)

    async def set_owner_secret(self, owner: str, secret: str, now: float, overlap_s: float) -> None:
        def put(tx: Tx) -> None:
            tx.conn.execute(
                "INSERT INTO webhook_owner_secrets (owner, secret, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET previous_secret = secret,"
                " previous_until = ?, secret = excluded.secret, created_at = excluded.created_at",
                (owner, secret, now, now + overlap_s),
            )

        await self._store.run_write(put)

    # messages

    async def enqueue(self, messages: list[Message], *, max_pending: int) -> int:
        if not messages:
            return 0
        owner = messages[0].owner
        assert all(m.owner == owner for m in messages), "one owner per enqueue"
        rows = [
            (
                m.id,
                m.owner,
                m.task_id,
                m.event,
                m.endpoint_id,
                m.url,
                m.body,
                m.created_at,
                m.queued_at,
                m.state,
                m.attempts,
                m.next_at,
            )
            for m in messages
        ]

        def insert(tx: Tx) -> int:
            (pending,) = tx.conn.execute(QUERIES["pending_owner"][0], (owner,)).fetchone()
            del rows[max(0, max_pending - pending) :]
            before = tx.conn.total_changes
            tx.conn.executemany(
                "INSERT OR IGNORE INTO outbox (id, owner, task_id, event, endpoint_id, url, body,"
                " created_at, queued_at, state, attempts, next_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return tx.conn.total_changes - before

        return await self._store.run_write(insert)

    async def claim(
        self, now: float, worker: str, lease_s: float, limit: int, *, per_destination: int
    ) -> list[Message]:
        sql, leased_sql = QUERIES["claim"][0], QUERIES["leased"][0]

        def claim(tx: Tx) -> list[Message]:
            # a few times the limit: candidates past a busy destination's share are passed over
            candidates = tx.conn.execute(sql, (now, now, limit * 4)).fetchall()
            held: dict[str, int] = {}
            ids: list[str] = []
            for message_id, url in candidates:
                if url not in held:
                    held[url] = tx.conn.execute(leased_sql, (url, now)).fetchone()[0]
                if held[url] >= per_destination:
                    continue
                held[url] += 1
                ids.append(message_id)
                if len(ids) == limit:
                    break
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            rows = tx.conn.execute(
                f"UPDATE outbox SET lease_owner = ?, lease_expires = ? WHERE id IN ({marks})"
                f" RETURNING {_MESSAGE_COLUMNS}",
                (worker, now + lease_s, *ids),
            ).fetchall()
            return sorted((_message(r) for r in rows), key=lambda m: (m.next_at or 0.0, m.id))

        return await self._store.run_write(claim)

    async def settle(
        self,
        message: Message,
        worker: str,
        attempt: DeliveryAttempt,
        state: MessageState,
        *,
        keep_attempts: int,
    ) -> bool:
        settled_at = None if state == "pending" else attempt.at

        def settle(tx: Tx) -> bool:
            cur = tx.conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, next_at = ?,"
                " lease_owner = NULL, lease_expires = NULL, last_status = ?, last_error = ?,"
                " settled_at = ? WHERE id = ? AND lease_owner = ? AND state = 'pending'",
                (
                    state,
                    attempt.next_retry_at if state == "pending" else None,
                    attempt.status_code,
                    attempt.error,
                    settled_at,
                    message.id,
                    worker,
                ),
            )
            if cur.rowcount != 1:
                return False
            tx.conn.execute(
                f"INSERT OR REPLACE INTO outbox_attempts ({_ATTEMPT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    attempt.message_id,
                    attempt.number,
                    attempt.at,
                    attempt.latency_ms,
                    attempt.status_code,
                    attempt.error,
                    attempt.next_retry_at,
                ),
            )
            tx.conn.execute(
                "DELETE FROM outbox_attempts WHERE message_id = ? AND number <= ?",
                (message.id, attempt.number - keep_attempts),
            )
            return True

        return await self._store.run_write(settle)

    async def get_message(self, message_id: str) -> Message | None:
        def read(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM outbox WHERE id = ?", (message_id,)
            ).fetchone()
            return _message(row) if row else None

        return await self._store.run_read(read)

    async def task_messages(self, task_id: str, limit: int) -> list[Message]:
        sql = QUERIES["task_messages"][0]

        def read(conn: sqlite3.Connection) -> list[Message]:
            return [_message(r) for r in conn.execute(sql, (task_id, limit)).fetchall()]

        return await self._store.run_read(read)

    async def attempts(self, message_id: str) -> list[DeliveryAttempt]:
        def read(conn: sqlite3.Connection) -> list[DeliveryAttempt]:
            rows = conn.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM outbox_attempts WHERE message_id = ?"
                " ORDER BY number",
                (message_id,),
            ).fetchall()
            return [_attempt(r) for r in rows]

        return await self._store.run_read(read)

    async def replay(self, message_id: str, now: float) -> Message | None:
        def replay(tx: Tx) -> Message | None:
            sending = tx.conn.execute(
                "SELECT 1 FROM outbox WHERE id = ? AND state = 'pending' AND lease_expires > ?",
                (message_id, now),
            ).fetchone()
            if sending:
                raise Conflict("the delivery is being sent right now", code="delivery_in_flight")
            row = tx.conn.execute(
                "UPDATE outbox SET state = 'pending', next_at = ?, queued_at = ?,"
                " lease_owner = NULL, lease_expires = NULL, settled_at = NULL"
                f" WHERE id = ? RETURNING {_MESSAGE_COLUMNS}",
                (now, now, message_id),
            ).fetchone()
            return _message(row) if row else None

        return await self._store.run_write(replay)

    async def depth(self) -> Depth:
        def read(conn: sqlite3.Connection) -> Depth:
            count, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM outbox INDEXED BY outbox_pending_age"
                " WHERE state = 'pending'"
            ).fetchone()
            return Depth(count, oldest)

        return await self._store.run_read(read)

    async def prune(self, before_at: float, limit: int) -> int:
        sql = QUERIES["prune"][0]

        def prune(tx: Tx) -> int:
            ids = [r[0] for r in tx.conn.execute(sql, (before_at, limit)).fetchall()]
            if not ids:
                return 0
            marks = ", ".join("?" * len(ids))
            tx.conn.execute(f"DELETE FROM outbox_attempts WHERE message_id IN ({marks})", ids)
            tx.conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
            return len(ids)

        return await self._store.run_write(prune)
