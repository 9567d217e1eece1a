"""The SQLite adapter of the Timeline port: one table in the store's file, its statements run by
the store's one database thread (``SqliteStore.run_read`` / ``run_write``: the same batches and
group commits as the store's own writes, so a note costs a savepoint of a shared transaction, not
a commit of its own).

A note is its insert and the trim of the task's notes past ``max_notes``, in one savepoint; both
walk the ``(task_id, at, seq)`` index, so their cost grows with ``max_notes``, not the table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any, Final

import orjson

from statemachine.sqlite_exec import Tx
from statemachine.sqlite_store import SqliteStore
from statemachine.timeline import DEFAULT_MAX_NOTES, MAX_NOTE_BYTES, Note, bounded, checked_kind

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS timeline_notes (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timeline_notes_task ON timeline_notes (task_id, at, seq);
"""

_INSERT: Final = "INSERT INTO timeline_notes (task_id, at, kind, data) VALUES (?, ?, ?, ?)"

# The statements whose plans the contract suite checks (``explain``), with sample arguments.
QUERIES: Final[dict[str, tuple[str, tuple[Any, ...]]]] = {
    "notes": (
        "SELECT seq, at, kind, data FROM timeline_notes WHERE task_id = ?"
        " ORDER BY at DESC, seq DESC LIMIT ?",
        ("t", 1),
    ),
    "past_bound": (
        "SELECT seq FROM timeline_notes WHERE task_id = ?"
        " ORDER BY at DESC, seq DESC LIMIT -1 OFFSET ?",
        ("t", 1),
    ),
}
_TRIM: Final = f"DELETE FROM timeline_notes WHERE seq IN ({QUERIES['past_bound'][0]})"


class SqliteTimeline:
    """The Timeline in ``store``'s file: at most ``max_notes`` notes per task, each note's data
    at most ``max_note_bytes`` encoded."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        max_notes: int = DEFAULT_MAX_NOTES,
        max_note_bytes: int = MAX_NOTE_BYTES,
    ) -> None:
        if max_notes < 1:
            raise ValueError("max_notes must be at least 1")
        self._store = store
        self.max_notes = max_notes
        self.max_note_bytes = max_note_bytes

    async def open(self) -> None:
        def create(tx: Tx) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.conn.execute(statement)

        await self._store.run_write(create)

    async def note(self, task_id: str, kind: str, at: float, data: Mapping[str, Any]) -> None:
        row = (task_id, at, checked_kind(kind), _encode(bounded(data, self.max_note_bytes)))
        trim = (task_id, self.max_notes)

        def op(tx: Tx) -> None:
            tx.conn.execute(_INSERT, row)
            tx.conn.execute(_TRIM, trim)

        await self._store.run_write(op)

    async def notes(self, task_id: str, limit: int) -> list[Note]:
        sql = QUERIES["notes"][0]

        def op(c: sqlite3.Connection) -> list[Note]:
            rows = c.execute(sql, (task_id, limit)).fetchall()
            return [Note(task_id, at, kind, orjson.loads(data)) for _, at, kind, data in rows]

        newest_first = await self._store.run_read(op)
        return newest_first[::-1]

    async def explain(self, query: str) -> list[str]:
        """The query plan of ``notes`` or ``past_bound`` (the trim's): tests prove each goes
        through the task index."""
        sql, args = QUERIES[query]
        plan = f"EXPLAIN QUERY PLAN {sql}"
        return await self._store.run_read(lambda c: [str(r[-1]) for r in c.execute(plan, args)])


def _encode(data: dict[str, Any]) -> str:
    return orjson.dumps(data).decode()
