"""Fixtures of the MongoDB adapter's own tests: the store on the mongomock-motor fake (always) and
on a real server (only when HOOKLINE_TEST_MONGODB_URL is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from mongomock_motor import AsyncMongoMockClient
from pymongo import AsyncMongoClient

from statemachine.mongo_store import MongoStore
from statemachine.store import TaskStore

MONGO_URL = os.environ.get("HOOKLINE_TEST_MONGODB_URL")
NEEDS_SERVER = "needs a MongoDB replica set: set HOOKLINE_TEST_MONGODB_URL (make test-mongo)"

real_server = pytest.mark.skipif(not MONGO_URL, reason=NEEDS_SERVER)


class Crash(Exception):
    """The process "dies" here: raised by the store's fault hook between two writes."""


def crash_at(step: str) -> Callable[[str], None]:
    def fault(name: str) -> None:
        if name == step:
            raise Crash(name)

    return fault


@pytest.fixture
def mock_db() -> object:
    return AsyncMongoMockClient()[f"hookline_{uuid.uuid4().hex[:8]}"]


@pytest.fixture
async def store(mock_db: object) -> AsyncIterator[MongoStore]:
    opened = MongoStore(mock_db)  # type: ignore[arg-type]
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def real_store() -> AsyncIterator[MongoStore]:
    """A MongoStore in a fresh database on the real server, dropped afterwards."""
    if not MONGO_URL:
        pytest.skip(NEEDS_SERVER)
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        MONGO_URL, serverSelectionTimeoutMS=5000
    )
    name = f"hookline_test_{uuid.uuid4().hex[:12]}"
    opened = MongoStore(client[name], client=client)  # type: ignore[arg-type]
    await opened.open()
    try:
        yield opened
    finally:
        await client.drop_database(name)
        await opened.close()


async def books_balance(store: TaskStore, owner: str) -> None:
    """Money is exact: balance == grants - debits + refunds, one debit and at most one refund
    per task."""
    user = await store.get_user(owner)
    assert user is not None
    ledger = await store.ledger(owner)
    assert user.balance == sum(e.amount for e in ledger)
    for kind in ("debit", "refund"):
        ids = [e.task_id for e in ledger if e.kind == kind]
        assert len(ids) == len(set(ids)), f"a task has two {kind} entries: {ids}"
