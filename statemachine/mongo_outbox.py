"""The MongoDB adapter of the Outbox port: collections on the store's database.

Every write is one single-document operation (no transactions, so the CRUD-compatible fake runs
it too). A claim is ``find_one_and_update`` per message, so two deliverers never hold one message;
a settle is a conditional update on (id, lease owner) followed by the attempt's insert: a crash
between the two loses that attempt's record, never the message's state. Driver errors leave as
``StoreError`` / ``Unavailable``, as the store's do.
"""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from statemachine.errors import Conflict, NotFound
from statemachine.mongo_store import translated
from statemachine.outbox import (
    DeliveryAttempt,
    Depth,
    Endpoint,
    Message,
    MessageState,
    OwnerSecret,
)

Doc = dict[str, Any]

_ENDPOINT_FIELDS = (
    "owner",
    "url",
    "events",
    "secret",
    "created_at",
    "previous_secret",
    "previous_until",
    "disabled_at",
    "disabled_reason",
)
_MESSAGE_FIELDS = (
    "owner",
    "task_id",
    "event",
    "endpoint_id",
    "url",
    "body",
    "created_at",
    "queued_at",
    "state",
    "attempts",
    "next_at",
    "lease_owner",
    "lease_expires",
    "last_status",
    "last_error",
    "settled_at",
)


def _endpoint(doc: Doc) -> Endpoint:
    fields: dict[str, Any] = {k: doc.get(k) for k in _ENDPOINT_FIELDS}
    fields["events"] = tuple(doc["events"])
    return Endpoint(id=doc["_id"], **fields)


def _message(doc: Doc) -> Message:
    fields: dict[str, Any] = {k: doc.get(k) for k in _MESSAGE_FIELDS}
    fields["body"] = bytes(doc["body"])
    return Message(id=doc["_id"], **fields)


def _attempt(doc: Doc) -> DeliveryAttempt:
    return DeliveryAttempt(
        message_id=doc["message_id"],
        number=doc["number"],
        at=doc["at"],
        latency_ms=doc["latency_ms"],
        status_code=doc.get("status_code"),
        error=doc.get("error"),
        next_retry_at=doc.get("next_retry_at"),
    )


class MongoOutbox:
    """The Outbox on collections of ``db`` (the store's database)."""

    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self._endpoints = db["webhook_endpoints"]
        self._secrets = db["webhook_owner_secrets"]
        self._messages = db["outbox"]
        self._attempts = db["outbox_attempts"]

    @translated
    async def open(self) -> None:
        await self._endpoints.create_index(
            [("owner", ASCENDING), ("created_at", ASCENDING)], name="owner"
        )
        await self._messages.create_index(
            [("state", ASCENDING), ("next_at", ASCENDING)], name="due"
        )
        await self._messages.create_index(
            [("task_id", ASCENDING), ("created_at", ASCENDING)], name="task"
        )
        await self._messages.create_index(
            [("state", ASCENDING), ("settled_at", ASCENDING)], name="settled"
        )
        await self._messages.create_index(
            [("state", ASCENDING), ("owner", ASCENDING)], name="pending_owner"
        )
        await self._messages.create_index(
            [("state", ASCENDING), ("url", ASCENDING), ("lease_expires", ASCENDING)],
            name="leased",
        )
        await self._messages.create_index(
            [("state", ASCENDING), ("created_at", ASCENDING)], name="age"
        )
        await self._attempts.create_index(
            [("message_id", ASCENDING), ("number", ASCENDING)], name="message", unique=True
        )

    # endpoints

    @translated
    async def add_endpoint(self, endpoint: Endpoint, *, max_per_owner: int) -> None:
        count = await self._endpoints.count_documents({"owner": endpoint.owner})
        if count >= max_per_owner:
            raise Conflict(
                f"at most {max_per_owner} webhook endpoints per user", code="too_many_webhooks"
            )
        doc: Doc = {"_id": endpoint.id}
        doc.update({k: getattr(endpoint, k) for k in _ENDPOINT_FIELDS})
        doc["events"] = list(endpoint.events)
        await self._endpoints.insert_one(doc)

    @translated
    async def endpoints(self, owner: str) -> list[Endpoint]:
        cursor = self._endpoints.find({"owner": owner}).sort([("created_at", 1), ("_id", 1)])
        return [_endpoint(d) async for d in cursor]

    @translated
    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        doc = await self._endpoints.find_one({"_id": endpoint_id})
        return _endpoint(doc) if doc else None

    @translated
    async def delete_endpoint(self, owner: str, endpoint_id: str) -> bool:
        result = await self._endpoints.delete_one({"_id": endpoint_id, "owner": owner})
        return result.deleted_count == 1

    @translated
    async def rotate_endpoint(
        self, owner: str, endpoint_id: str, secret: str, previous_until: float
    ) -> Endpoint:
        current = await self._endpoints.find_one({"_id": endpoint_id, "owner": owner})
        if current is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}", code="webhook_not_found")
        doc = await self._endpoints.find_one_and_update(
            {"_id": endpoint_id, "owner": owner, "secret": current["secret"]},
            {
                "$set": {
                    "secret": secret,
                    "previous_secret": current["secret"],
                    "previous_until": previous_until,
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # rotated (or deleted) in between: the caller may try again
            raise Conflict("the endpoint changed while rotating", code="webhook_changed")
        return _endpoint(doc)

    @translated
    async def disable_endpoint(self, endpoint_id: str, reason: str, now: float) -> None:
        await self._endpoints.update_one(
            {"_id": endpoint_id, "disabled_at": None},
            {"$set": {"disabled_at": now, "disabled_reason": reason}},
        )

    # owners' secrets

    @translated
    async def owner_secret(self, owner: str) -> OwnerSecret | None:
        doc = await self._secrets.find_one({"_id": owner})
        if doc is None:
            return None
        return OwnerSecret(
            owner=owner,
            secret=doc["secret"],
            created_at=doc["created_at"],
            previous_secret=doc.get("previous_secret"),
            previous_until=doc.get("previous_until"),
        )

    @translated
    async def set_owner_secret(self, owner: str, secret: str, now: float, overlap_s: float) -> None:
        current = await self._secrets.find_one({"_id": owner})
        doc: Doc = {"_id": owner, "secret": secret, "created_at": now}
        if current is not None:
            doc["previous_secret"] = current["secret"]
            doc["previous_until"] = now + overlap_s
        await self._secrets.replace_one({"_id": owner}, doc, upsert=True)

    # messages

    @translated
    async def enqueue(self, messages: list[Message], *, max_pending: int) -> int:
        if not messages:
            return 0
        owner = messages[0].owner
        pending = await self._messages.count_documents({"state": "pending", "owner": owner})
        new = 0
        for m in messages[: max(0, max_pending - pending)]:
            doc: Doc = {"_id": m.id}
            doc.update({k: getattr(m, k) for k in _MESSAGE_FIELDS})
            try:
                await self._messages.insert_one(doc)
            except DuplicateKeyError:
                continue
            new += 1
        return new

    @translated
    async def claim(
        self, now: float, worker: str, lease_s: float, limit: int, *, per_destination: int
    ) -> list[Message]:
        due: Doc = {
            "state": "pending",
            "next_at": {"$lte": now},
            "$or": [{"lease_expires": None}, {"lease_expires": {"$lte": now}}],
        }
        # a few times the limit: candidates past a busy destination's share are passed over
        cursor = self._messages.find(due, {"_id": 1, "url": 1}).sort("next_at", 1)
        candidates = [d async for d in cursor.limit(limit * 4)]
        held: dict[str, int] = {}
        claimed: list[Message] = []
        for candidate in candidates:
            url = candidate["url"]
            if url not in held:
                held[url] = await self._messages.count_documents(
                    {"state": "pending", "url": url, "lease_expires": {"$gt": now}}
                )
            if held[url] >= per_destination:
                continue
            doc = await self._messages.find_one_and_update(
                {**due, "_id": candidate["_id"]},
                {"$set": {"lease_owner": worker, "lease_expires": now + lease_s}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:  # another worker took it in between
                continue
            held[url] += 1
            claimed.append(_message(doc))
            if len(claimed) == limit:
                break
        return claimed

    @translated
    async def settle(
        self,
        message: Message,
        worker: str,
        attempt: DeliveryAttempt,
        state: MessageState,
        *,
        keep_attempts: int,
    ) -> bool:
        result = await self._messages.update_one(
            {"_id": message.id, "lease_owner": worker, "state": "pending"},
            {
                "$set": {
                    "state": state,
                    "next_at": attempt.next_retry_at if state == "pending" else None,
                    "lease_owner": None,
                    "lease_expires": None,
                    "last_status": attempt.status_code,
                    "last_error": attempt.error,
                    "settled_at": None if state == "pending" else attempt.at,
                },
                "$inc": {"attempts": 1},
            },
        )
        if result.modified_count != 1:
            return False
        await self._attempts.replace_one(
            {"message_id": attempt.message_id, "number": attempt.number},
            {
                "message_id": attempt.message_id,
                "number": attempt.number,
                "at": attempt.at,
                "latency_ms": attempt.latency_ms,
                "status_code": attempt.status_code,
                "error": attempt.error,
                "next_retry_at": attempt.next_retry_at,
            },
            upsert=True,
        )
        await self._attempts.delete_many(
            {"message_id": message.id, "number": {"$lte": attempt.number - keep_attempts}}
        )
        return True

    @translated
    async def get_message(self, message_id: str) -> Message | None:
        doc = await self._messages.find_one({"_id": message_id})
        return _message(doc) if doc else None

    @translated
    async def task_messages(self, task_id: str, limit: int) -> list[Message]:
        cursor = self._messages.find({"task_id": task_id}).sort("created_at", 1).limit(limit)
        return [_message(d) async for d in cursor]

    @translated
    async def attempts(self, message_id: str) -> list[DeliveryAttempt]:
        cursor = self._attempts.find({"message_id": message_id}).sort("number", 1)
        return [_attempt(d) async for d in cursor]

    @translated
    async def replay(self, message_id: str, now: float) -> Message | None:
        sending = await self._messages.find_one(
            {"_id": message_id, "state": "pending", "lease_expires": {"$gt": now}}
        )
        if sending is not None:
            raise Conflict("the delivery is being sent right now", code="delivery_in_flight")
        doc = await self._messages.find_one_and_update(
            {"_id": message_id},
            {
                "$set": {
                    "state": "pending",
                    "next_at": now,
                    "queued_at": now,
                    "lease_owner": None,
                    "lease_expires": None,
                    "settled_at": None,
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        return _message(doc) if doc else None

    @translated
    async def depth(self) -> Depth:
        pending = await self._messages.count_documents({"state": "pending"})
        oldest = await self._messages.find_one(
            {"state": "pending"}, sort=[("created_at", ASCENDING)]
        )
        return Depth(pending, oldest["created_at"] if oldest else None)

    @translated
    async def prune(self, before_at: float, limit: int) -> int:
        cursor = (
            self._messages.find(
                {"state": {"$in": ["delivered", "failed"]}, "settled_at": {"$lt": before_at}},
                {"_id": 1},
            )
            .sort("settled_at", 1)
            .limit(limit)
        )
        ids = [d["_id"] async for d in cursor]
        if not ids:
            return 0
        await self._attempts.delete_many({"message_id": {"$in": ids}})
        result = await self._messages.delete_many({"_id": {"$in": ids}})
        return int(result.deleted_count)
