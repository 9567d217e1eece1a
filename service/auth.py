"""API keys: generated with 256 bits of randomness, stored only as SHA-256 hashes, looked up by
hash (so the comparison is on a digest through the store's index, never on the key itself)."""

from __future__ import annotations

import hashlib
import secrets

from starlette.requests import Request

from statemachine.errors import AuthError
from statemachine.store import TaskStore, User

KEY_PREFIX = "hk_"


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


async def authenticate(store: TaskStore, request: Request) -> User:
    """The user whose key is in the Authorization header; ``AuthError`` otherwise."""
    return await authenticate_hash(store, hash_key(bearer_key(request)))


async def authenticate_hash(store: TaskStore, key_hash: str) -> User:
    """The user whose key hashes to ``key_hash``; ``AuthError`` otherwise."""
    user = await store.user_by_key_hash(key_hash)
    if user is None:
        raise AuthError("invalid API key", code="invalid_key")
    return user
