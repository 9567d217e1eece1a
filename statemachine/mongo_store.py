"""The MongoDB adapter of TaskStore, on PyMongo's async API (Motor is past end of life).

Every write is one single-document atomic operation: no multi-document transactions and no
``bulk_write``, so the adapter runs unchanged on the ``mongomock-motor`` fake that CI uses. Where a
change spans documents (a debit touches the user, the task, the ledger and the feed), the order of
the writes makes every crash point repairable, and ``reconcile`` repairs it:

- **Credits** change only together with a marker in the same user-document update. A debit pushes
  ``pending: {op: "debit:<task>", task: <the task document>}``; a grant pushes ``grant:<id>``. The
  marker carries everything needed to finish the operation, and is pulled only once the task
  document and the ledger entry exist. Only the original caller ever debits; ``reconcile`` (and a
  racing caller) only *complete* a marker, and every completion step is idempotent (unique ``_id``),
  so a crash between any two writes neither loses nor repeats a debit.
- **Refunds** leave nothing behind on the user document (a permanent list of refunded tasks there
  would reach MongoDB's 16 MB limit after a few hundred thousand refunds). The task CAS that enters
  failed/cancelled sets a hidden ``refund_pending`` flag. The credit is the user update
  ``$inc balance, $inc seq, $push pending: {op: "refund:<task>", seq, …}`` under the filter
  ``{seq: <as read>}``, made only after reading the user (the marker is not there) and then the
  ledger (no entry under ``_id: "refund:<task>"``, unique, like the ``(task_id, kind)`` index).
  Then the ledger entry, the event, the marker is pulled, the flag cleared. The durable "this
  refund was credited" is the ledger entry; the marker covers the gap until it exists, and is
  pulled only after it. ``seq`` is the fence: every credit moves it, so a process that read the
  user before another one credited this refund (and then stalled while that one finished and
  pulled its marker) fails its update, reads again and finds the marker or the ledger entry.
- **Documents of the version before** carry ``refunds: ["refund:<task>", …]`` on the user: every
  key there was credited. The credit's filter also says ``refunds: {$ne: key}`` and, when it
  fails, a key found there counts as credited; ``reconcile`` writes the ledger entries such
  refunds may lack (their tasks still have ``refund_pending``), and empties the lists in bounded
  batches, pulling only keys whose ledger entry exists (or whose task is gone) and moving ``seq``
  as it does (the fence again). Processes of the old version must not run beside this one: their
  guard is that list, which no longer records refunds.
- A task document exists only after its debit, so no half-created task is ever visible.

The feed: in production watchers read MongoDB change streams (``mongo_feed.MongoChangeFeed``). For
``feed_after``/``feed_head`` (SSE resume, the contract suite on the fake, where change streams do
not exist) events are also appended to the ``feed`` collection: buckets of ``FEED_BUCKET_SIZE``
events, appended with one ``$push`` each. Appending to the one open bucket is a single atomic
operation that both numbers the event and stores it, so positions follow commit order (a counter
document plus a separate insert would not: a reader could pass a number whose insert is late).
A position is the zero-padded event number, ``bucket * FEED_BUCKET_SIZE + index + 1``.

The module is long because it is one thing: the adapter of one port (``store.TaskStore``) over one
driver, whose write orders and ``reconcile`` repairs only make sense read side by side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import inspect
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, TypeVar, cast

import structlog
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from statemachine import clock
from statemachine.errors import (
    BadRequest,
    Conflict,
    InsufficientCredits,
    NotFound,
    StoreError,
    Unavailable,
)
from statemachine.mongo_feed import EventLog, event_doc, saved_event_number
from statemachine.states import NON_TERMINAL, REFUNDED_STATES, State, state_of
from statemachine.store import FeedEvent, LedgerEntry, LedgerKind, Page, User
from statemachine.task import Task, from_doc, to_doc

log = structlog.get_logger(__name__)

Doc = dict[str, Any]
Fault = Callable[[str], None]
P = ParamSpec("P")
R = TypeVar("R")

DELIVERY_TTL_S: Final = 7 * 24 * 3600
REPAIR_AFTER_S: Final = 10.0
SAME_KEY_POLLS: Final = 20
SAME_KEY_POLL_S: Final = 0.05
REPAIR_BATCH: Final = 500  # documents per kind per reconcile pass
REFUND_TRIES: Final = 50  # credit attempts under contention (each lost to another balance change)
LEGACY_USERS: Final = 20  # users per reconcile pass whose old ``refunds`` lists are emptied
LEGACY_KEYS: Final = 200  # keys looked at per such user and pass
_NON_TERMINAL_VALUES: Final = sorted(s.value for s in NON_TERMINAL)
# Tasks holding a provider slot: every job in ai_processing, and a processing task once its inputs
# are ready and it submits (``holds_slot``).
_IN_FLIGHT: Final[Doc] = {
    "$or": [
        {"state": State.AI_PROCESSING.value},
        {"state": State.PROCESSING.value, "holds_slot": True},
    ]
}
_USER_FIELDS: Final = {
    "name": 1,
    "balance": 1,
    "is_admin": 1,
    "created_at": 1,
    "rate_limit_per_s": 1,
    "rate_limit_burst": 1,
}


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate driver errors at the boundary: connection trouble → Unavailable, else
    StoreError. hookline's own errors (and a test's injected crash) pass through."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ConnectionFailure as exc:
            raise Unavailable(f"mongodb unreachable: {exc}") from exc
        except PyMongoError as exc:
            raise StoreError(f"mongodb: {exc}") from exc

    return wrapper


def encode_cursor(created_at: float, task_id: str) -> str:
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, task_id = json.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        if not isinstance(task_id, str) or not isinstance(created_at, int | float):
            raise ValueError("wrong types")
    except (ValueError, binascii.Error, TypeError) as exc:
        raise BadRequest("invalid cursor", code="invalid_cursor") from exc
    return float(created_at), task_id


def _user(doc: Doc) -> User:
    """A user document as a ``User``; limits an older document lacks read None (the defaults)."""
    rate, burst = doc.get("rate_limit_per_s"), doc.get("rate_limit_burst")
    return User(
        doc["name"],
        int(doc["balance"]),
        bool(doc["is_admin"]),
        doc["created_at"],
        None if rate is None else float(rate),
        None if burst is None else int(burst),
    )


def _task(doc: Doc) -> Task:
    return from_doc(doc)


async def _aggregate(collection: AsyncCollection[Doc], pipeline: list[Doc]) -> list[Doc]:
    """Run ``pipeline``: PyMongo's ``aggregate`` is a coroutine, the fake's returns the cursor."""
    cursor: Any = collection.aggregate(pipeline)
    if inspect.isawaitable(cursor):
        cursor = await cursor
    return cast(list[Doc], await cursor.to_list(None))


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


class MongoStore:
    """TaskStore on a MongoDB database (a replica set in production, for change streams).

    ``db`` is an ``AsyncDatabase`` (or the ``mongomock-motor`` fake of one); ``client``, if given,
    is closed by ``close``. ``fault`` is called with a step name between the writes of multi-write
    operations: tests raise from it to simulate a crash at that point.

    ``event_log=False`` skips the ``feed`` collection (one write per event saved) where change
    streams are the only feed in use (``MongoChangeFeed``); ``feed_after``/``feed_head`` then
    raise ``StoreError``.
    """

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        *,
        client: AsyncMongoClient[Doc] | None = None,
        repair_after_s: float = REPAIR_AFTER_S,
        fault: Fault | None = None,
        event_log: bool = True,
    ) -> None:
        self.db = db
        self.fault = fault
        self._client = client
        self._repair_after_s = repair_after_s
        self._users = db["users"]
        self._keys = db["api_keys"]
        self._ledger = db["ledger"]
        self._tasks = db["tasks"]
        self._events = EventLog(db["feed"]) if event_log else None
        self._deliveries = db["deliveries"]
        self._positions = db["feed_positions"]

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0, **kwargs: Any) -> MongoStore:
        """``mongodb://host[:port]/dbname?replicaSet=rs0`` (the database defaults to hookline).
        Nothing connects until the first operation; ``timeout_s`` bounds server selection."""
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=int(timeout_s * 1000), appname="hookline"
        )
        return cls(client.get_default_database("hookline"), client=client, **kwargs)

    def _step(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    # lifecycle

    @translated
    async def open(self) -> None:
        """Create the indexes (idempotent) and find the open feed bucket."""
        tasks = self._tasks
        await tasks.create_index(
            [("owner", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
            name="owner_created",
        )
        await tasks.create_index([("created_at", DESCENDING), ("_id", DESCENDING)], name="created")
        await tasks.create_index(
            [("provider", ASCENDING), ("state", ASCENDING), ("owner", ASCENDING)],
            name="active_owner",
        )
        await tasks.create_index(
            [("provider_job_id", ASCENDING), ("provider", ASCENDING)],
            name="job",
            partialFilterExpression={"provider_job_id": {"$type": "string"}},
        )
        with contextlib.suppress(OperationFailure):  # its prefix, from before owners were counted
            await tasks.drop_index("active")
        await tasks.create_index(
            [("owner", ASCENDING), ("idempotency_key", ASCENDING)],
            name="idempotency",
            unique=True,
            partialFilterExpression={"idempotency_key": {"$type": "string"}},
        )
        await self._partial_index(
            tasks,
            [("state", ASCENDING), ("deadline", ASCENDING)],
            "overdue",
            {"state": {"$in": _NON_TERMINAL_VALUES}},
        )
        await self._partial_index(
            tasks,
            [("updated_at", ASCENDING)],
            "refund_pending",
            {"refund_pending": {"$exists": True}},
        )
        await self._users.create_index([("pending.at", ASCENDING)], name="pending_at")
        # Only the users still carrying a refund list of the version before (see reconcile).
        await self._users.create_index(
            [("name", ASCENDING)],
            name="legacy_refunds",
            partialFilterExpression={"refunds": {"$exists": True}},
        )
        await self._keys.create_index([("user", ASCENDING)], name="user")
        await self._ledger.create_index(
            [("task_id", ASCENDING), ("kind", ASCENDING)],
            name="task_kind",
            unique=True,
            partialFilterExpression={"task_id": {"$type": "string"}},
        )
        await self._ledger.create_index([("user", ASCENDING), ("at", ASCENDING)], name="user_at")
        await self._deliveries.create_index(
            [("provider", ASCENDING), ("delivery_id", ASCENDING)], name="delivery", unique=True
        )
        await self._deliveries.create_index(
            [("expires_from", ASCENDING)], name="ttl", expireAfterSeconds=DELIVERY_TTL_S
        )
        await self._deliveries.create_index([("at", ASCENDING)], name="at")
        if self._events is not None:
            await self._events.open()

    @staticmethod
    async def _partial_index(
        collection: AsyncCollection[Doc], keys: list[tuple[str, int]], name: str, filt: Doc
    ) -> None:
        try:
            await collection.create_index(keys, name=name, partialFilterExpression=filt)
        except OperationFailure:
            # Servers before 6.0 refuse $in in partial filters: a full index serves as well.
            await collection.create_index(keys, name=name)

    async def close(self) -> None:
        if self._client is not None:
            await _maybe_await(self._client.close())

    async def ping(self) -> None:
        try:
            await self.db.command("ping")
        except PyMongoError as exc:
            raise Unavailable(f"mongodb unavailable: {exc}") from exc

    # users, keys, credits

    @translated
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
        """The key document first: if the user insert then fails (or the process dies), an
        orphan key that names no user is harmless."""
        try:
            await self._keys.insert_one({"_id": key_hash, "user": name, "created_at": now})
        except DuplicateKeyError as exc:
            raise Conflict("API key exists", code="key_exists") from exc
        marker = self._grant_marker(credits, now) if credits else None
        doc: Doc = {
            "_id": name,
            "name": name,
            "balance": credits,
            "is_admin": is_admin,
            "created_at": now,
            "rate_limit_per_s": rate_limit_per_s,
            "rate_limit_burst": rate_limit_burst,
            "seq": 1 if marker else 0,
            "pending": [marker] if marker else [],
        }
        try:
            await self._users.insert_one(doc)
        except DuplicateKeyError as exc:
            await self._keys.delete_one({"_id": key_hash, "user": name})
            raise Conflict(f"user {name!r} exists", code="user_exists") from exc
        if marker is not None:
            self._step("grant.credited")
            await self._settle_grant(name, marker, seq=1)
        return User(name, credits, is_admin, now, rate_limit_per_s, rate_limit_burst)

    @translated
    async def set_user_limits(
        self, name: str, *, rate_limit_per_s: float | None, rate_limit_burst: int | None
    ) -> User:
        doc = await self._users.find_one_and_update(
            {"_id": name},
            {"$set": {"rate_limit_per_s": rate_limit_per_s, "rate_limit_burst": rate_limit_burst}},
            projection=_USER_FIELDS,
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFound(f"no user {name!r}", code="user_not_found")
        return _user(doc)

    @translated
    async def add_api_key(self, name: str, key_hash: str, now: float) -> None:
        if await self._users.find_one({"_id": name}, {"_id": 1}) is None:
            raise NotFound(f"no user {name!r}", code="user_not_found")
        try:
            await self._keys.insert_one({"_id": key_hash, "user": name, "created_at": now})
        except DuplicateKeyError as exc:
            raise Conflict("API key exists", code="key_exists") from exc

    @translated
    async def user_by_key_hash(self, key_hash: str) -> User | None:
        key = await self._keys.find_one({"_id": key_hash})
        if key is None:
            return None
        return await self.get_user(key["user"])

    @translated
    async def get_user(self, name: str) -> User | None:
        doc = await self._users.find_one({"_id": name}, _USER_FIELDS)
        return _user(doc) if doc else None

    @translated
    async def grant(self, name: str, amount: int, now: float) -> int:
        marker = self._grant_marker(amount, now)
        doc = await self._users.find_one_and_update(
            {"_id": name},
            {"$inc": {"balance": amount, "seq": 1}, "$push": {"pending": marker}},
            projection={"balance": 1, "seq": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFound(f"no user {name!r}", code="user_not_found")
        self._step("grant.credited")
        await self._settle_grant(name, marker, seq=doc["seq"])
        return int(doc["balance"])

    @staticmethod
    def _grant_marker(amount: int, now: float) -> Doc:
        return {"op": f"grant:{uuid.uuid4().hex}", "kind": "grant", "amount": amount, "at": now}

    async def _settle_grant(self, user: str, marker: Doc, seq: int | None) -> None:
        await self._write_ledger(
            marker["op"], user, "grant", marker["amount"], marker["at"], None, seq
        )
        await self._pull(user, marker["op"])

    async def _write_ledger(
        self,
        op: str,
        user: str,
        kind: LedgerKind,
        amount: int,
        at: float,
        task_id: str | None,
        seq: int | None,
    ) -> None:
        """Insert a ledger entry under its operation id; already there is fine (a repair)."""
        doc: Doc = {
            "_id": op,
            "user": user,
            "kind": kind,
            "amount": amount,
            "at": at,
            "task_id": task_id,
            "seq": seq,
        }
        with contextlib.suppress(DuplicateKeyError):
            await self._ledger.insert_one(doc)

    async def _pull(self, user: str, op: str) -> None:
        await self._users.update_one({"_id": user}, {"$pull": {"pending": {"op": op}}})

    @translated
    async def ledger(self, name: str) -> list[LedgerEntry]:
        """Oldest first: by the user's change counter (``seq``, taken in the same update as the
        balance change); an entry written by a repair without one sorts by time after them."""
        docs = await self._ledger.find({"user": name}).to_list(None)
        docs.sort(key=lambda d: (d["seq"] is None, d["seq"] or 0, d["at"]))
        return [
            LedgerEntry(d["user"], d["kind"], d["amount"], d["at"], d.get("task_id")) for d in docs
        ]

    # tasks

    @translated
    async def create_task(self, task: Task) -> tuple[Task, bool]:
        """Debit with the marker (the one write that can fail for credits), then the task, the
        ledger entry and the creation event, then the marker goes. See the module docstring."""
        if task.state is not State.PENDING or task.version != 1:
            raise ValueError("a new task is pending at version 1")
        if task.idempotency_key is not None:
            first = await self._by_idempotency_key(task.owner, task.idempotency_key)
            if first is not None:
                return _replay(first, task)
        op = f"debit:{task.id}"
        marker: Doc = {
            "op": op,
            "kind": "debit",
            "amount": -task.cost,
            "at": task.created_at,
            "task": dict(to_doc(task)),
        }
        user = await self._users.find_one_and_update(
            {"_id": task.owner, "balance": {"$gte": task.cost}, "pending.op": {"$ne": op}},
            {"$inc": {"balance": -task.cost, "seq": 1}, "$push": {"pending": marker}},
            projection={"seq": 1},
            return_document=ReturnDocument.AFTER,
        )
        if user is None:
            if task.idempotency_key is not None:
                first = await self._await_same_key(task.owner, task.idempotency_key)
                if first is not None:
                    return _replay(first, task)
            raise await self._debit_refused(task)
        self._step("create.debited")
        return await self._complete_create(marker, seq=user["seq"], repair=False)

    async def _await_same_key(self, owner: str, key: str) -> Task | None:
        """A debit refused while a create with the same key is in flight (the concurrent retries
        spent the balance): wait briefly for that create to land, so a replay is answered as one
        rather than as InsufficientCredits."""
        for _ in range(SAME_KEY_POLLS):
            first = await self._by_idempotency_key(owner, key)
            if first is not None:
                return first
            in_flight = {"_id": owner, "pending.task.idempotency_key": key}
            if await self._users.find_one(in_flight, {"_id": 1}) is None:
                return None
            await asyncio.sleep(SAME_KEY_POLL_S)
        return None

    async def _debit_refused(self, task: Task) -> Exception:
        user = await self.get_user(task.owner)
        if user is None:
            return NotFound(f"no user {task.owner!r}", code="user_not_found")
        if user.balance < task.cost:
            return InsufficientCredits(
                f"balance {user.balance} is below the cost {task.cost}",
                details={"balance": user.balance, "cost": task.cost},
            )
        return Conflict(f"task {task.id!r} is being created", code="task_exists")

    async def _complete_create(
        self, marker: Doc, *, seq: int | None, repair: bool
    ) -> tuple[Task, bool]:
        """Finish a debited create from its marker. Idempotent: run by the creator, and by
        ``reconcile`` for a creator that died. A lost idempotency race rolls the debit back."""
        task = from_doc(marker["task"])
        op = marker["op"]
        try:
            await self._tasks.insert_one({"_id": task.id, **marker["task"]})
            inserted = True
        except DuplicateKeyError:
            existing = await self._tasks.find_one({"_id": task.id})
            if existing is None or existing["callback_token"] != task.callback_token:
                return await self._lost_create(task, op, existing is not None)
            inserted = False  # this very create, inserted by a repair (or the creator)
        self._step("create.task_inserted")
        await self._write_ledger(op, task.owner, "debit", -task.cost, task.created_at, task.id, seq)
        self._step("create.ledger_written")
        # The creator emits only what it inserted; a repair cannot know, so it emits again
        # (at-least-once: watchers act by compare-and-set).
        if inserted or repair:
            await self._emit(event_doc(task, created=True))
        self._step("create.event_emitted")
        await self._pull(task.owner, op)
        return task, True

    async def _lost_create(self, task: Task, op: str, id_taken: bool) -> tuple[Task, bool]:
        """Another task holds this id or this (owner, Idempotency-Key): give the money back
        (guarded by the marker, so exactly once), then answer as a duplicate create would."""
        await self._roll_back_debit(task.owner, op, task.cost)
        if id_taken:
            raise Conflict(f"task {task.id!r} exists", code="task_exists")
        first = await self._by_idempotency_key(task.owner, task.idempotency_key)
        if first is None:
            raise StoreError(f"task {task.id!r}: duplicate key, but no duplicate task found")
        return _replay(first, task)

    async def _roll_back_debit(self, owner: str, op: str, cost: int) -> None:
        """Credit back a debit whose task was never written; the marker guards exactly-once."""
        await self._users.update_one(
            {"_id": owner, "pending.op": op},
            {"$inc": {"balance": cost}, "$pull": {"pending": {"op": op}}},
        )

    async def _by_idempotency_key(self, owner: str, key: str | None) -> Task | None:
        if key is None:
            return None
        doc = await self._tasks.find_one({"owner": owner, "idempotency_key": key})
        return _task(doc) if doc else None

    @translated
    async def get_task(self, task_id: str) -> Task | None:
        doc = await self._tasks.find_one({"_id": task_id})
        return _task(doc) if doc else None

    @translated
    async def task_by_job(self, provider: str, job_id: str) -> Task | None:
        doc = await self._tasks.find_one(
            {
                "provider_job_id": job_id,
                "provider": provider,
                "state": {"$in": _NON_TERMINAL_VALUES},
            }
        )
        return _task(doc) if doc else None

    @translated
    async def list_tasks(
        self, owner: str | None, state: State | None, limit: int, cursor: str | None
    ) -> Page:
        query: Doc = {}
        if owner is not None:
            query["owner"] = owner
        if state is not None:
            query["state"] = state.value
        if cursor is not None:
            created_at, task_id = decode_cursor(cursor)
            query["$or"] = [
                {"created_at": {"$lt": created_at}},
                {"created_at": created_at, "_id": {"$lt": task_id}},
            ]
        docs = (
            await self._tasks.find(query)
            .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
            .limit(limit + 1)
            .to_list(None)
        )
        tasks = [_task(d) for d in docs]
        if len(tasks) <= limit:
            return Page(tasks, None)
        items = tasks[:limit]
        return Page(items, encode_cursor(items[-1].created_at, items[-1].id))

    @translated
    async def transition(
        self, task: Task, expected_state: State, expected_version: int, *, emit: bool = True
    ) -> bool:
        """One ``update_one`` is the compare-and-set; then the feed event (and the refund)."""
        if task.version != expected_version + 1:
            raise ValueError(f"version {task.version} does not follow {expected_version}")
        if emit and not task.history:
            raise ValueError("emit=True needs a history entry to publish")
        refund = (
            task.refunded
            and task.state in REFUNDED_STATES
            and expected_state not in REFUNDED_STATES
        )
        fields: Doc = dict(to_doc(task))
        # Change streams see every update; this tells mongo_feed which ones are not events.
        fields["feed_silent"] = None if emit else task.version
        if refund:
            fields["refund_pending"] = {"emit": emit}
        result = await self._tasks.update_one(
            {"_id": task.id, "state": expected_state.value, "version": expected_version},
            {"$set": fields},
        )
        if result.matched_count == 0:
            return False
        if refund:
            self._step("refund.task_updated")
            await self._refund(task, emit=emit)
        elif emit:
            await self._emit(event_doc(task, created=False))
        return True

    async def _refund(self, task: Task, *, emit: bool) -> None:
        """Credit ``task.cost`` back at most once, record it, publish the transition, pull the
        marker, clear the task's flag (see the module docstring). Every step is safe to repeat,
        by the refunding process or by ``reconcile``, in any interleaving."""
        key = f"refund:{task.id}"
        seq = await self._credit_refund(task, key)
        self._step("refund.credited")
        await self._write_ledger(
            key, task.owner, "refund", task.cost, task.updated_at, task.id, seq
        )
        self._step("refund.ledger_written")
        if emit:
            await self._emit(event_doc(task, created=False))
        self._step("refund.event_emitted")
        await self._pull(task.owner, key)
        self._step("refund.marker_pulled")
        await self._tasks.update_one({"_id": task.id}, {"$unset": {"refund_pending": ""}})

    async def _credit_refund(self, task: Task, key: str) -> int | None:
        """Credit the refund ``key`` unless it was credited already; the user's ``seq`` after the
        credit (None if unknown: credited before, by a process of the version before, or no
        such user). The reads come first, the user before the ledger; the update is fenced by
        ``seq``, and a lost fence reads again."""
        marker: Doc = {
            "op": key,
            "kind": "refund",
            "amount": task.cost,
            "at": task.updated_at,
            "task_id": task.id,
        }
        for attempt in range(REFUND_TRIES):
            user = await self._users.find_one(
                {"_id": task.owner}, {"seq": 1, "pending.op": 1, "pending.seq": 1}
            )
            if user is None:
                log.error("mongo.refund_without_user", task_id=task.id, user=task.owner)
                return None
            for pending in user.get("pending", []):
                if pending.get("op") == key:
                    return cast(int | None, pending.get("seq"))  # credited, being finished
            if await self._ledger.find_one({"_id": key}, {"_id": 1}) is not None:
                return None  # credited and recorded
            seq = int(user["seq"])
            credited = await self._users.find_one_and_update(
                {
                    "_id": task.owner,
                    "seq": seq,
                    "pending.op": {"$ne": key},
                    "refunds": {"$ne": key},
                },
                {
                    "$inc": {"balance": task.cost, "seq": 1},
                    "$push": {"pending": {**marker, "seq": seq + 1}},
                },
                projection={"_id": 1},
            )
            if credited is not None:
                return seq + 1
            if await self._users.find_one({"_id": task.owner, "refunds": key}, {"_id": 1}):
                return None  # credited by the version before, which kept a list of keys
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        raise StoreError(f"refund of {task.id!r}: {REFUND_TRIES} credits lost to contention")

    @translated
    async def overdue(self, now: float, limit: int) -> list[Task]:
        docs = (
            await self._tasks.find(
                {"state": {"$in": _NON_TERMINAL_VALUES}, "deadline": {"$lte": now}}
            )
            .sort([("deadline", ASCENDING)])
            .limit(limit)
            .to_list(None)
        )
        return [_task(d) for d in docs]

    @translated
    async def count_by_state(self, owner: str | None) -> dict[State, int]:
        pipeline: list[Doc] = [] if owner is None else [{"$match": {"owner": owner}}]
        pipeline.append({"$group": {"_id": "$state", "n": {"$sum": 1}}})
        counts = dict.fromkeys(State, 0)
        counts.update(
            {state_of(d["_id"]): int(d["n"]) for d in await _aggregate(self._tasks, pipeline)}
        )
        return counts

    @translated
    async def count_active(self, provider: str, owner: str | None = None) -> int:
        query: Doc = {"provider": provider, **_IN_FLIGHT}
        if owner is not None:
            query["owner"] = owner
        return int(await self._tasks.count_documents(query))

    @translated
    async def active_by_owner(self, provider: str | None, limit: int) -> dict[str, int]:
        match: Doc = dict(_IN_FLIGHT)
        if provider is not None:
            match["provider"] = provider
        pipeline: list[Doc] = [
            {"$match": match},
            {"$group": {"_id": "$owner", "n": {"$sum": 1}}},
            {"$sort": {"n": DESCENDING, "_id": ASCENDING}},
            {"$limit": limit},
        ]
        return {str(d["_id"]): int(d["n"]) for d in await _aggregate(self._tasks, pipeline)}

    @translated
    async def tasks_since(self, since: float, owner: str | None) -> list[Task]:
        query: Doc = {"created_at": {"$gte": since}}
        if owner is not None:
            query["owner"] = owner
        docs = (
            await self._tasks.find(query)
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list(None)
        )
        return [_task(d) for d in docs]

    # webhook deliveries

    @translated
    async def seen_delivery(self, provider: str, delivery_id: str) -> bool:
        query = {"provider": provider, "delivery_id": delivery_id}
        return await self._deliveries.find_one(query, {"_id": 1}) is not None

    @translated
    async def record_delivery(
        self, provider: str, delivery_id: str, task_id: str, now: float
    ) -> bool:
        """``expires_from`` is when the write happened (the process clock, as a BSON date), so the
        TTL index drops deliveries a week after they were recorded whatever ``now`` says."""
        doc: Doc = {
            "provider": provider,
            "delivery_id": delivery_id,
            "task_id": task_id,
            "at": now,
            "expires_from": datetime.fromtimestamp(clock.now(), UTC),
        }
        try:
            await self._deliveries.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    @translated
    async def prune_deliveries(self, before_at: float, limit: int) -> int:
        """Oldest first through the ``at`` index. The TTL index drops deliveries a week after
        they were written anyway (``DELIVERY_TTL_S``), so a longer retention is not kept here."""
        old = (
            await self._deliveries.find({"at": {"$lt": before_at}}, {"_id": 1})
            .sort("at", ASCENDING)
            .limit(limit)
            .to_list(None)
        )
        if not old:
            return 0
        result = await self._deliveries.delete_many({"_id": {"$in": [d["_id"] for d in old]}})
        return int(result.deleted_count)

    # change feed (the events collection; change streams are in mongo_feed)

    async def _emit(self, event: Doc) -> None:
        if self._events is not None:
            await self._events.append(event)

    def _event_log(self) -> EventLog:
        if self._events is None:
            raise StoreError("this MongoStore keeps no event log: read the change stream")
        return self._events

    @translated
    async def feed_after(self, position: str | None, limit: int) -> list[FeedEvent]:
        return await self._event_log().after(position, limit)

    @translated
    async def task_feed_after(
        self, task_id: str, position: str | None, limit: int
    ) -> list[FeedEvent]:
        """Through the event log's ``task`` index; without an event log, ``StoreError``: change
        streams cannot be replayed by position, the caller starts from the current state."""
        return await self._event_log().task_after(task_id, position, limit)

    @translated
    async def feed_head(self) -> str | None:
        return await self._event_log().head()

    @translated
    async def prune_feed(self, before_at: float, limit: int) -> int:
        """Whole buckets of the event log; without one there is nothing to prune (change streams
        live in the server's oplog, which the server bounds)."""
        if self._events is None:
            return 0
        keep_after: int | None = None
        async for doc in self._positions.find({}, {"position": 1}):
            number = saved_event_number(str(doc["position"]))
            if number is not None:
                keep_after = number if keep_after is None else min(keep_after, number)
        return await self._events.prune(
            before_at, limit, keep_after if keep_after is not None else 2**62
        )

    @translated
    async def save_position(self, watcher: str, position: str) -> None:
        await self._positions.update_one(
            {"_id": watcher}, {"$set": {"position": position}}, upsert=True
        )

    @translated
    async def load_position(self, watcher: str) -> str | None:
        doc = await self._positions.find_one({"_id": watcher})
        return None if doc is None else str(doc["position"])

    # repair

    @translated
    async def reconcile(self, now: float) -> int:
        """Finish what a dead process left half-done, older than ``repair_after_s``: credit
        markers (grants, debits) and refunds whose task CAS won but whose credit, ledger entry
        or event may be missing. Returns how many operations were repaired."""
        cutoff = now - self._repair_after_s
        repaired = 0
        # Refunds first: finishing one pulls its marker, which the marker pass would count again.
        tasks = await self._tasks.find(
            {"refund_pending": {"$exists": True}, "updated_at": {"$lte": cutoff}}
        ).to_list(REPAIR_BATCH)
        for doc in tasks:
            log.warning("mongo.repair", op="refund", task_id=doc["_id"])
            await self._refund(_task(doc), emit=bool(doc["refund_pending"].get("emit", True)))
            repaired += 1
        users = await self._users.find({"pending.at": {"$lte": cutoff}}, {"pending": 1}).to_list(
            REPAIR_BATCH
        )
        for user in users:
            for marker in user["pending"]:
                if marker["at"] <= cutoff:
                    await self._repair_marker(user["_id"], marker)
                    repaired += 1
        await self._empty_legacy_refunds()
        return repaired

    async def _empty_legacy_refunds(self) -> None:
        """Shorten the ``refunds`` lists of the version before (see the module docstring): per
        pass, ``LEGACY_KEYS`` keys of ``LEGACY_USERS`` users. A key goes once its ledger entry
        exists (or its task is gone); one whose task still waits for its refund repair stays
        until that repair wrote the entry. An empty list goes, and the user leaves the index."""
        users = (
            await self._users.find(
                {"refunds": {"$exists": True}}, {"name": 1, "refunds": {"$slice": LEGACY_KEYS}}
            )
            .sort("name", ASCENDING)
            .hint("legacy_refunds")  # the partial index: its users only, never a collection scan
            .limit(LEGACY_USERS)
            .to_list(None)
        )
        if not users:
            return
        keys = sorted({k for u in users for k in u["refunds"] if isinstance(k, str)})
        recorded = await self._ledger.find({"_id": {"$in": keys}}, {"_id": 1}).to_list(None)
        done = {d["_id"] for d in recorded}
        unrecorded = {k.removeprefix("refund:"): k for k in keys if k not in done}
        tasks = await self._tasks.find({"_id": {"$in": sorted(unrecorded)}}, {"_id": 1}).to_list(
            None
        )
        done |= set(unrecorded.values()) - {unrecorded[d["_id"]] for d in tasks}
        for user in users:
            gone = sorted(done.intersection(user["refunds"]))
            if gone:
                # ``seq`` moves: a credit fenced on a read that still saw the key must fail.
                await self._users.update_one(
                    {"_id": user["_id"]},
                    {"$pull": {"refunds": {"$in": gone}}, "$inc": {"seq": 1}},
                )
            elif not user["refunds"]:
                await self._users.update_one(
                    {"_id": user["_id"], "refunds": {"$size": 0}}, {"$unset": {"refunds": ""}}
                )
        if done:
            log.info("mongo.legacy_refunds_emptied", keys=len(done), users=len(users))

    async def _repair_marker(self, user: str, marker: Doc) -> None:
        log.warning("mongo.repair", op=marker["op"], user=user)
        if marker["kind"] == "grant":
            await self._settle_grant(user, marker, seq=None)
            return
        if marker["kind"] == "refund":
            # Credited; its task's flag (or that task's own repair) will publish the event.
            await self._write_ledger(
                marker["op"],
                user,
                "refund",
                marker["amount"],
                marker["at"],
                marker["task_id"],
                marker.get("seq"),
            )
            await self._pull(user, marker["op"])
            return
        # A Conflict means the task id was taken by another task: the debit was rolled back.
        with contextlib.suppress(Conflict):
            await self._complete_create(marker, seq=None, repair=True)


def _replay(first: Task, task: Task) -> tuple[Task, bool]:
    """The answer to a create whose (owner, Idempotency-Key) already names ``first``."""
    if first.request_hash != task.request_hash:
        raise Conflict("Idempotency-Key reused with another request", code="idempotency_conflict")
    return first, False
