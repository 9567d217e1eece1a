"""The MongoDB adapter of the Timeline port: the ``timeline`` collection on the store's database.

One document per note, found through the ``(task_id, at, _id)`` index (``_id`` orders the notes
of one instant). A note is an insert, then the
look-up of the task's first note past ``max_notes`` (newest first, through the index) and, when
there is one, the deletion of it and everything older: single-document writes and an indexed
query, nothing the CRUD-compatible fake lacks. Two notes written at once may both trim; each
deletes only what is past the bound, so the newest ``max_notes`` always stay.

A note's data is stored as its JSON text, not as a subdocument: header names are the sender's
choice and may hold characters (``.``, a leading ``$``) that field names may not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, PyMongoError

from statemachine.errors import StoreError, Unavailable
from statemachine.timeline import DEFAULT_MAX_NOTES, MAX_NOTE_BYTES, Note, bounded, checked_kind

Doc = dict[str, Any]

COLLECTION: Final = "timeline"
_NEWEST_FIRST: Final = [("at", DESCENDING), ("_id", DESCENDING)]


class MongoTimeline:
    """The Timeline on a collection of ``db`` (the store's database): at most ``max_notes`` notes
    per task, each note's data at most ``max_note_bytes`` encoded."""

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        *,
        max_notes: int = DEFAULT_MAX_NOTES,
        max_note_bytes: int = MAX_NOTE_BYTES,
    ) -> None:
        if max_notes < 1:
            raise ValueError("max_notes must be at least 1")
        self._notes = db[COLLECTION]
        self.max_notes = max_notes
        self.max_note_bytes = max_note_bytes

    async def open(self) -> None:
        try:
            # _id last: the order of notes at the same instant, so sorts need no SORT stage
            await self._notes.create_index(
                [("task_id", ASCENDING), ("at", ASCENDING), ("_id", ASCENDING)], name="task_at"
            )
        except PyMongoError as exc:
            raise _translated(exc) from exc

    async def note(self, task_id: str, kind: str, at: float, data: Mapping[str, Any]) -> None:
        doc: Doc = {
            "task_id": task_id,
            "at": at,
            "kind": checked_kind(kind),
            "data": orjson.dumps(bounded(data, self.max_note_bytes)).decode(),
        }
        try:
            await self._notes.insert_one(doc)
            await self._trim(task_id)
        except PyMongoError as exc:
            raise _translated(exc) from exc

    async def _trim(self, task_id: str) -> None:
        """Delete the task's notes past the newest ``max_notes``, if there are any."""
        past = (
            await self._notes.find({"task_id": task_id}, {"at": 1})
            .sort(_NEWEST_FIRST)
            .skip(self.max_notes)
            .limit(1)
            .to_list(1)
        )
        if not past:
            return
        at, oid = past[0]["at"], past[0]["_id"]
        await self._notes.delete_many(
            {"task_id": task_id, "$or": [{"at": {"$lt": at}}, {"at": at, "_id": {"$lte": oid}}]}
        )

    async def notes(self, task_id: str, limit: int) -> list[Note]:
        try:
            docs = (
                await self._notes.find({"task_id": task_id})
                .sort(_NEWEST_FIRST)
                .limit(limit)
                .to_list(limit)
            )
        except PyMongoError as exc:
            raise _translated(exc) from exc
        return [Note(task_id, d["at"], d["kind"], orjson.loads(d["data"])) for d in reversed(docs)]


def _translated(exc: PyMongoError) -> StoreError | Unavailable:
    """The driver's error at the boundary: connection trouble is Unavailable, else StoreError."""
    if isinstance(exc, ConnectionFailure):
        return Unavailable(f"mongodb unreachable: {exc}")
    return StoreError(f"mongodb: {exc}")
