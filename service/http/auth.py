"""API keys: generated with 256 bits of randomness, stored only as SHA-256 hashes, looked up by
hash (so the comparison is on a digest through the store's index, never on the key itself).

A key that authenticated recently is remembered for a few seconds (``TtlCache``): most requests
then cost no store round trip for authentication. Only identity (name, admin) is taken from the
cache; anything that shows the balance reads the user again.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Generic, TypeVar

from starlette.requests import Request

from service.http.errors import AuthError
from statemachine.store import TaskStore, User

KEY_PREFIX = "hk_"
KEY_CACHE_TTL_S = 5.0
KEY_CACHE_MAX = 10_000

V = TypeVar("V")


class TtlCache(Generic[V]):
    """A small bounded map whose entries expire ``ttl_s`` after they were put (least recently
    put evicted first). Per process, kept on the HTTP layer's state (service/http/state.py)."""

    def __init__(self, ttl_s: float, max_items: int) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str, now: float) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        return item[1]

    def put(self, key: str, value: V, now: float) -> None:
        self._items[key] = (now + self.ttl_s, value)
        self._items.move_to_end(key)
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'", code="missing_key")
    return key.strip()


async def authenticate_hash(
    store: TaskStore,
    key_hash: str,
    cache: TtlCache[User] | None = None,
    now: float = 0.0,
) -> User:
    """The user whose key hashes to ``key_hash`` (from ``cache`` when it knows the key: its
    ``balance`` may then be a few seconds old); ``AuthError`` otherwise. Unknown keys are never
    cached."""
    if cache is not None and (known := cache.get(key_hash, now)) is not None:
        return known
    user = await store.user_by_key_hash(key_hash)
    if user is None:
        raise AuthError("invalid API key", code="invalid_key")
    if cache is not None:
        cache.put(key_hash, user, now)
    return user
