"""The contract suite's fixtures: one ``store`` fixture parametrised over every TaskStore adapter.

To add an adapter, write an async context-manager factory ``make_x(tmp_path)`` that yields an open,
empty store, and a ``feed_x(store)`` giving its ChangeFeed, and append
``pytest.param(Adapter("x", make_x, feed_x), id="x")`` to ADAPTERS.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine.decide import Deadlines, Transition, apply, decide
from statemachine.sqlite_feed import SqliteFeed
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event
from statemachine.store import ChangeFeed, TaskStore
from statemachine.task import Task
from tests.support.factories import T0, make_task


@dataclass(frozen=True)
class Adapter:
    """A store adapter under test. ``kind`` lets adapter-specific tests skip the others."""

    kind: str
    make: Callable[[Path], AbstractAsyncContextManager[TaskStore]]
    feed: Callable[[TaskStore], ChangeFeed]


def sqlite_feed(store: TaskStore) -> ChangeFeed:
    assert isinstance(store, SqliteStore)
    # A short poll: tests that need the in-process wake-up build their own feed with a long one.
    return SqliteFeed(store, poll_interval_s=0.05)


@asynccontextmanager
async def make_sqlite(tmp_path: Path) -> AsyncIterator[TaskStore]:
    store = SqliteStore(tmp_path / "hookline.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def mongo_feed(store: TaskStore) -> ChangeFeed:
    """The Mongo adapter's event-log feed: its positions are ``feed_after``'s, which these tests
    mix with ``subscribe``. Change streams (other positions) are tested in tests/mongo."""
    from statemachine.mongo_feed import EventLogFeed

    return EventLogFeed(store, poll_interval_s=0.05)


@asynccontextmanager
async def make_mongomock(tmp_path: Path) -> AsyncIterator[TaskStore]:
    """MongoStore on the mongomock-motor fake: a fresh client, so a fresh database, per test."""
    from mongomock_motor import AsyncMongoMockClient

    from statemachine.mongo_store import MongoStore

    store = MongoStore(AsyncMongoMockClient()[f"hookline_{uuid.uuid4().hex[:8]}"])
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def make_mongo_real(tmp_path: Path) -> AsyncIterator[TaskStore]:
    """MongoStore on the server of HOOKLINE_TEST_MONGODB_URL, in a database dropped afterwards."""
    import os

    from pymongo import AsyncMongoClient

    from statemachine.mongo_store import MongoStore

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        os.environ["HOOKLINE_TEST_MONGODB_URL"], serverSelectionTimeoutMS=5000
    )
    name = f"hookline_test_{uuid.uuid4().hex[:12]}"
    store = MongoStore(client[name])  # type: ignore[arg-type]
    await store.open()
    try:
        yield store
    finally:
        await client.drop_database(name)
        await client.close()


_MONGO_URL_MISSING = "set HOOKLINE_TEST_MONGODB_URL to a MongoDB replica set to run this adapter"

ADAPTERS = [
    pytest.param(Adapter("sqlite", make_sqlite, sqlite_feed), id="sqlite"),
    pytest.param(Adapter("mongo", make_mongomock, mongo_feed), id="mongomock"),
    pytest.param(
        Adapter("mongo-real", make_mongo_real, mongo_feed),
        id="mongo-real",
        marks=[
            pytest.mark.mongo_real,
            pytest.mark.skipif(
                not __import__("os").environ.get("HOOKLINE_TEST_MONGODB_URL"),
                reason=_MONGO_URL_MISSING,
            ),
        ],
    ),
]


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> Adapter:
    param: Adapter = request.param
    return param


@pytest.fixture
async def store(adapter: Adapter, tmp_path: Path) -> AsyncIterator[TaskStore]:
    async with adapter.make(tmp_path) as opened:
        yield opened


@pytest.fixture
def feed(adapter: Adapter, store: TaskStore) -> ChangeFeed:
    return adapter.feed(store)


@pytest.fixture
def sqlite_store(adapter: Adapter, store: TaskStore) -> SqliteStore:
    """The store, for tests that only make sense on SQLite (one file, OS processes, query plans)."""
    if adapter.kind != "sqlite" or not isinstance(store, SqliteStore):
        pytest.skip(f"SQLite-specific (one database file shared by processes); not {adapter.kind}")
    return store


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_task(
    owner: str,
    *,
    cost: int = 10,
    key: str | None = None,
    request_hash: str | None = None,
    created_at: float = T0,
    task_id: str | None = None,
) -> Task:
    """A fresh pending task (version 1) as the REST API would build it."""
    task = make_task(
        owner=owner,
        cost=cost,
        now=created_at,
        idempotency_key=key,
        request_hash=request_hash if request_hash is not None else ("h1" if key else None),
    )
    return task if task_id is None else task.with_changes(id=task_id)


def step(
    task: Task, event: Event, now: float, *, detail: str | None = None, **changes: object
) -> Task:
    """The record after ``event``, decided and applied as the service does."""
    transition = decide(task, event, now, Deadlines(), detail=detail)
    assert isinstance(transition, Transition), transition
    return apply(task, transition, **changes)


async def user_with(store: TaskStore, credits: int, name: str | None = None) -> str:
    """A new user with ``credits``; returns the name."""
    name = name or f"user-{uuid.uuid4().hex[:8]}"
    await store.create_user(
        name, credits, is_admin=False, key_hash=key_hash(secrets.token_hex(8)), now=T0
    )
    return name
