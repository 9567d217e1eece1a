"""The change feed on MongoDB: change streams for watchers, an event log for ``feed_after``.

``MongoChangeFeed`` is the ChangeFeed watchers use in production: ``tasks.watch()`` with
``full_document="updateLookup"``. A position is the JSON of the change's resume token; a stream
resumes with ``resume_after``, retries resumable errors with backoff, and when the token is older
than the oplog (``ChangeStreamHistoryLost``) or unknown, it opens a fresh stream and first yields a
synthetic event for the current state of every non-terminal task (watchers act by compare-and-set,
so a repeated event is harmless; a lost one would not be). ``statemachine.feed.Watcher`` and
``Broadcaster`` consume it like any other ChangeFeed.

``EventLog`` is the ``feed`` collection the store appends to after each change, which serves
``TaskStore.feed_after``/``feed_head`` (SSE resume, and the fake, which has no change streams). It
holds buckets of ``FEED_BUCKET_SIZE`` events; one ``$push`` into the open bucket both numbers and
stores an event, so numbers follow commit order (a counter document plus a separate insert would
let a reader pass a number whose insert comes late). A position is the zero-padded event number.
One task's events are found through a multikey index on the task ids in each bucket
(``task_after``). Retention deletes whole full buckets from the start (``prune``), never the
newest; a read from a position before the oldest bucket left knows events may be missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Final

import structlog
from bson import json_util
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from statemachine.errors import BadRequest, StoreError
from statemachine.states import NON_TERMINAL, state_of
from statemachine.store import FeedEvent, TaskStore
from statemachine.task import Task

log = structlog.get_logger(__name__)

Doc = dict[str, Any]

FEED_BUCKET_SIZE: Final = 128
POSITION_WIDTH: Final = 16
CREATED_EVENT: Final = "created"
# The resume token is gone from the oplog, or is not a token this server can resume from.
HISTORY_LOST_CODES: Final = frozenset({286, 280, 260})  # HistoryLost, FatalError, InvalidToken
_NON_TERMINAL_VALUES: Final = sorted(s.value for s in NON_TERMINAL)


# the event log (feed_after / feed_head)


def encode_position(seq: int) -> str:
    """The position of event number ``seq`` (1-based); sorts the same as a string or a number."""
    return f"{seq:0{POSITION_WIDTH}d}"


def decode_position(position: str | None) -> int:
    if position is None:
        return 0
    try:
        seq = int(position)
    except ValueError as exc:
        raise BadRequest(f"invalid feed position {position!r}", code="invalid_position") from exc
    if seq < 0:
        raise BadRequest(f"invalid feed position {position!r}", code="invalid_position")
    return seq


def event_doc(task: Task, *, created: bool) -> Doc:
    """The stored event for ``task``'s creation, or for its last history entry."""
    if created:
        source, dest, event, at = None, task.state.value, CREATED_EVENT, task.created_at
    else:
        entry = task.history[-1]
        source, dest, event, at = entry.source.value, entry.dest.value, entry.event, entry.at
    return {
        "t": task.id,
        "o": task.owner,
        "s": source,
        "d": dest,
        "e": event,
        "a": at,
        "v": task.version,
    }


def _logged_event(seq: int, doc: Doc) -> FeedEvent:
    source = state_of(doc["s"]) if doc["s"] is not None else None
    return FeedEvent(
        encode_position(seq),
        doc["t"],
        doc["o"],
        source,
        state_of(doc["d"]),
        doc["e"],
        doc["a"],
        doc["v"],
    )


def saved_event_number(position: str) -> int | None:
    """What a watcher's saved position says about the event log: the number of the last event it
    handled; None for a change-stream resume token (that watcher never reads the log); 0 (it
    needs everything) for anything else, so retention keeps rather than guesses."""
    if position_to_token(position) is not None:
        return None
    try:
        return decode_position(position)
    except BadRequest:
        return 0


class EventLog:
    """Append-only, numbered events in bucket documents of one collection."""

    def __init__(self, collection: AsyncCollection[Doc]) -> None:
        self._collection = collection
        self._bucket: int | None = None  # the open bucket, as far as this process knows

    async def open(self) -> None:
        await self._collection.create_index(
            [("events.t", ASCENDING), ("_id", ASCENDING)], name="task"
        )
        self._bucket = await self._last_bucket()

    async def _last_bucket(self) -> int:
        doc = await self._collection.find_one({}, {"_id": 1}, sort=[("_id", DESCENDING)])
        return int(doc["_id"]) if doc else 0

    async def append(self, event: Doc) -> str:
        """Append ``event`` with one atomic ``$push`` into the open bucket; return its position.

        When that bucket is full (or this process's idea of it is stale), the newest bucket is
        looked up and, if full too, the next one is inserted: a bucket is only ever created
        after the newest one, never again where retention deleted one (an upsert would)."""
        bucket: int | None = self._bucket
        while True:
            if bucket is not None:
                doc = await self._collection.find_one_and_update(
                    {"_id": bucket, "n": {"$lt": FEED_BUCKET_SIZE}},
                    {"$push": {"events": event}, "$inc": {"n": 1}},
                    projection={"n": 1},
                    return_document=ReturnDocument.AFTER,
                )
                if doc is not None:
                    self._bucket = bucket
                    return encode_position(bucket * FEED_BUCKET_SIZE + int(doc["n"]))
            newest = await self._collection.find_one({}, {"n": 1}, sort=[("_id", DESCENDING)])
            if newest is not None and int(newest["n"]) < FEED_BUCKET_SIZE:
                bucket = int(newest["_id"])
                continue
            bucket = 0 if newest is None else int(newest["_id"]) + 1
            try:
                await self._collection.insert_one({"_id": bucket, "n": 1, "events": [event]})
            except DuplicateKeyError:
                bucket = None  # another writer opened it first: look again
                continue
            self._bucket = bucket
            return encode_position(bucket * FEED_BUCKET_SIZE + 1)

    async def after(self, position: str | None, limit: int) -> list[FeedEvent]:
        """Up to ``limit`` events after ``position``, oldest first (from the oldest bucket left,
        if retention deleted the one ``position`` is in)."""
        bucket, skip = divmod(decode_position(position), FEED_BUCKET_SIZE)
        events: list[FeedEvent] = []
        while len(events) < limit:
            doc = await self._collection.find_one(
                {"_id": {"$gte": bucket}},
                {"n": 1, "events": {"$slice": [skip, limit - len(events)]}},
                sort=[("_id", ASCENDING)],
            )
            if doc is None:
                break
            if doc["_id"] != bucket:  # pruned: the run resumes at the oldest bucket left
                bucket, skip = int(doc["_id"]), 0
                continue
            first = bucket * FEED_BUCKET_SIZE + skip + 1
            events.extend(_logged_event(first + i, e) for i, e in enumerate(doc.get("events", [])))
            if doc["n"] < FEED_BUCKET_SIZE:
                break
            bucket, skip = bucket + 1, 0
        return events

    async def task_after(self, task_id: str, position: str | None, limit: int) -> list[FeedEvent]:
        """Up to ``limit`` events of ``task_id`` after ``position``, oldest first: only the
        buckets holding one of its events are read (the ``task`` index). ``StoreError``
        (``feed_pruned``) if retention deleted events after ``position``."""
        after = decode_position(position)
        docs = (
            await self._collection.find(
                {"events.t": task_id, "_id": {"$gte": after // FEED_BUCKET_SIZE}},
                {"events": 1},
            )
            .sort("_id", ASCENDING)
            .limit(limit + 1)  # every bucket but the first holds one of the events wanted
            .to_list(None)
        )
        events: list[FeedEvent] = []
        for doc in docs:
            first = int(doc["_id"]) * FEED_BUCKET_SIZE + 1
            for i, event in enumerate(doc["events"]):
                if first + i > after and event["t"] == task_id and len(events) < limit:
                    events.append(_logged_event(first + i, event))
        # Read after the events: a bucket pruned before they were read shows here.
        oldest = await self._collection.find_one({}, {"_id": 1}, sort=[("_id", ASCENDING)])
        if oldest is not None and after < int(oldest["_id"]) * FEED_BUCKET_SIZE:
            raise StoreError(f"feed events after {position!r} were pruned", code="feed_pruned")
        return events

    async def head(self) -> str | None:
        doc = await self._collection.find_one({}, {"n": 1}, sort=[("_id", DESCENDING)])
        if doc is None:
            return None
        return encode_position(int(doc["_id"]) * FEED_BUCKET_SIZE + int(doc["n"]))

    async def prune(self, before_at: float, limit: int, keep_after: int) -> int:
        """Delete the oldest full buckets, as many as hold ``limit`` events (rounded up), while
        every event in one is older than ``before_at`` and numbered at most ``keep_after``;
        never the newest bucket (it holds the head). Returns how many events went."""
        newest = await self._last_bucket()
        docs = (
            await self._collection.find({"_id": {"$lt": newest}}, {"n": 1, "events.a": 1})
            .sort("_id", ASCENDING)
            .limit(-(-limit // FEED_BUCKET_SIZE))
            .to_list(None)
        )
        doomed: list[int] = []
        for doc in docs:
            bucket = int(doc["_id"])
            if (
                doc["n"] < FEED_BUCKET_SIZE
                or (bucket + 1) * FEED_BUCKET_SIZE > keep_after
                or any(event["a"] >= before_at for event in doc["events"])
            ):
                break  # a contiguous run from the start: stop at the first bucket to keep
            doomed.append(bucket)
        if not doomed:
            return 0
        result = await self._collection.delete_many({"_id": {"$in": doomed}})
        return int(result.deleted_count) * FEED_BUCKET_SIZE


class EventLogFeed:
    """A ChangeFeed that polls ``store.feed_after``: for a standalone server (no change streams),
    for the fake in tests, and wherever positions must match ``feed_after``'s (SSE resume)."""

    def __init__(self, store: TaskStore, poll_interval_s: float = 0.5, batch: int = 500) -> None:
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._batch = batch

    async def subscribe(self, after: str | None) -> AsyncIterator[FeedEvent]:
        """Every event after ``after``, in order, then new ones as they are written, forever."""
        position = after
        while True:
            events = await self._store.feed_after(position, self._batch)
            for event in events:
                yield event
                position = event.position
            if len(events) < self._batch:
                await asyncio.sleep(self._poll_interval_s)


# change streams (pure parts first: they are unit-tested on canned change documents)


def token_to_position(token: Mapping[str, Any] | None) -> str:
    """A resume token as a feed position (its canonical extended JSON)."""
    return json_util.dumps(token)


def position_to_token(position: str | None) -> Doc | None:
    """The resume token in ``position``; None for no position or one that is not a token (an
    event-log number, say), which the caller treats as "start fresh"."""
    if position is None:
        return None
    try:
        token = json_util.loads(position)
    except (ValueError, TypeError):
        return None
    return token if isinstance(token, dict) and "_data" in token else None


def _appended_history(fields: Doc) -> Doc | None:
    """The history entry an update appended: ``history`` set whole, or ``history.N`` keys."""
    history = fields.get("history")
    if isinstance(history, list):
        return history[-1] if history and isinstance(history[-1], dict) else None
    appended = [
        (int(key.split(".", 1)[1]), value)
        for key, value in fields.items()
        if key.startswith("history.") and key.split(".", 1)[1].isdigit() and isinstance(value, dict)
    ]
    return max(appended, key=lambda item: item[0])[1] if appended else None


def event_from_change(change: Doc) -> FeedEvent | None:
    """The FeedEvent a change-stream document stands for, or None (not a transition: a lease,
    a bookkeeping field, a silent write, a delete)."""
    kind = change.get("operationType")
    full: Doc = change.get("fullDocument") or {}
    task_id = str(change.get("documentKey", {}).get("_id", full.get("_id", "")))
    position = token_to_position(change["_id"])
    if kind == "insert":
        return FeedEvent(
            position,
            task_id,
            full["owner"],
            None,
            state_of(full["state"]),
            CREATED_EVENT,
            full["created_at"],
            full["version"],
        )
    if kind == "update":
        fields: Doc = change.get("updateDescription", {}).get("updatedFields", {})
    elif kind == "replace":
        fields = full
    else:
        return None
    version = fields.get("version")
    if version is None or fields.get("feed_silent") == version:
        return None
    entry = _appended_history(fields)
    if entry is None:
        return None
    return FeedEvent(
        position,
        task_id,
        str(full.get("owner", "")),
        state_of(entry["from"]),
        state_of(entry["to"]),
        entry["event"],
        entry["at"],
        version,
    )


def synthetic_event(doc: Doc, position: str) -> FeedEvent:
    """An event for a task's current state (after a resume token was lost)."""
    history = doc.get("history") or []
    last = history[-1] if history else None
    return FeedEvent(
        position,
        str(doc["_id"]),
        doc["owner"],
        state_of(last["from"]) if last else None,
        state_of(doc["state"]),
        last["event"] if last else CREATED_EVENT,
        doc["updated_at"],
        doc["version"],
    )


def history_lost(exc: BaseException) -> bool:
    """True if the stream cannot resume from its token and must start afresh with a scan."""
    return isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES


def resumable(exc: BaseException) -> bool:
    """True for errors after which reopening the stream from the same token should work."""
    if isinstance(exc, ConnectionFailure):
        return True
    return isinstance(exc, OperationFailure) and (
        exc.has_error_label("ResumableChangeStreamError") or exc.code in (43, 63, 150, 13388)
    )


def retry_delay_s(failures: int, base_s: float, max_s: float) -> float:
    return float(min(base_s * 2 ** max(failures - 1, 0), max_s))


class MongoChangeFeed:
    """ChangeFeed over ``tasks.watch(full_document="updateLookup")`` (needs a replica set)."""

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        *,
        retry_base_s: float = 0.2,
        retry_max_s: float = 10.0,
        max_retries: int = 20,
    ) -> None:
        self._tasks = db["tasks"]
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._max_retries = max_retries

    async def subscribe(self, after: str | None) -> AsyncIterator[FeedEvent]:
        """Every change after ``after``, then new ones, forever. With no ``after`` it starts at
        the current end of the oplog; with one it cannot resume from, it scans first."""
        token = position_to_token(after)
        scan = after is not None and token is None
        if scan:
            log.warning("mongo_feed.unknown_position", position=after)
        failures = 0
        while True:
            try:
                async with contextlib.aclosing(self._stream(token, scan)) as events:
                    async for event in events:
                        failures = 0
                        scan = False
                        token = position_to_token(event.position)
                        yield event
                # A stream only ends when the server closed its cursor: reopen from the token.
            except PyMongoError as exc:
                if history_lost(exc):
                    log.warning("mongo_feed.history_lost", error=str(exc), action="scan")
                    token, scan = None, True
                    continue
                failures += 1
                if not resumable(exc) or failures > self._max_retries:
                    raise
                delay_s = retry_delay_s(failures, self._retry_base_s, self._retry_max_s)
                log.warning("mongo_feed.retry", error=str(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)

    async def _stream(self, token: Doc | None, scan: bool) -> AsyncGenerator[FeedEvent, None]:
        async with await self._tasks.watch(
            full_document="updateLookup", resume_after=token
        ) as stream:
            if scan:
                # The stream is open first, so nothing written during the scan is missed.
                start = token_to_position(stream.resume_token)
                async with contextlib.aclosing(self._scan(start)) as synthetic:
                    async for fake in synthetic:
                        yield fake
            async for change in stream:
                if change.get("operationType") == "invalidate":
                    raise OperationFailure("change stream invalidated", code=280)
                event = event_from_change(change)
                if event is not None:
                    yield event

    async def _scan(self, position: str) -> AsyncGenerator[FeedEvent, None]:
        cursor = self._tasks.find({"state": {"$in": _NON_TERMINAL_VALUES}}).sort("_id", ASCENDING)
        count = 0
        async for doc in cursor:
            count += 1
            yield synthetic_event(doc, position)
        log.info("mongo_feed.scanned", tasks=count)
