"""The BlobStore port and its deterministic key helpers.

Adapters live beside this module: ``local.LocalBlobStore`` (files under ``var/``, served by
hookline through signed expiring URLs) and ``s3.S3BlobStore`` (S3 / MinIO via the ``minio``
SDK); service/runtime.py picks one from ``HOOKLINE_BLOB_URL``. Keys are deterministic
(``uploads/<owner>/<digest>.<ext>``, ``outputs/<task>/<n>.<ext>``, ``derived/<variant>/<source>``)
so a retried step overwrites what an earlier attempt wrote instead of leaving a second copy, and
an upload is prepared for a provider once, not once per task.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from statemachine.errors import BadRequest

MAX_KEY_CHARS = 512

# A segment may not start with "." (no "..", no hidden or temp files) and uses a safe charset.
_SEGMENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_EXT = re.compile(r"[a-z0-9]{1,8}")

_CONTENT_TYPES: dict[str, str] = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}
_EXTENSIONS: dict[str, str] = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}


class InvalidBlobKey(BadRequest):
    """A blob key (or prefix) outside the safe grammar: ``seg(/seg)*``, no ``..``, no leading
    ``/``, characters ``[A-Za-z0-9._-]``, a segment never starting with ``.``."""

    code = "invalid_blob_key"


class BlobStore(Protocol):
    """Where uploads and watermarked outputs live. Every method is safe to retry."""

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, overwriting (retries are idempotent)."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes under ``key``; raise ``NotFound`` when there are none."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether ``key`` holds a blob."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob whose key starts with ``prefix`` (non-empty); return how many."""
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (may be empty), sorted."""
        ...

    async def url(self, key: str, ttl_s: int) -> str:
        """A URL a browser or an AI provider can GET until it expires in ``ttl_s`` seconds."""
        ...

    async def ping(self) -> None:
        """Raise ``Unavailable``/``StoreError`` when the store can't be used (readiness)."""
        ...

    async def close(self) -> None:
        """Release connections and threads' resources."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` when it is a safe relative key, else raise ``InvalidBlobKey``."""
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidBlobKey(f"blob key must be 1..{MAX_KEY_CHARS} characters", details=key[:80])
    if not all(_SEGMENT.fullmatch(part) for part in key.split("/")):
        raise InvalidBlobKey(
            "blob key must be segments of [A-Za-z0-9._-] joined by '/', with no '..', no "
            "leading '/' and no segment starting with '.'",
            details=key[:80],
        )
    return key


def validate_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """A prefix is a key, optionally ending with ``/``; empty only when ``allow_empty``."""
    if not prefix:
        if allow_empty:
            return prefix
        raise InvalidBlobKey("an empty prefix is refused here (it would match every blob)")
    validate_key(prefix.removesuffix("/"))
    return prefix


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value):
        raise InvalidBlobKey(f"{what} is not a safe key segment", details=value[:80])
    return value


def _extension(ext: str) -> str:
    ext = ext.removeprefix(".").lower()
    if not _EXT.fullmatch(ext):
        raise InvalidBlobKey("file extension must be 1..8 of [a-z0-9]", details=ext[:20])
    return ext


def upload_key(owner: str, digest: str, ext: str) -> str:
    """``uploads/<owner>/<digest>.<ext>``: the same bytes from the same owner land on one key."""
    return f"uploads/{_segment(owner, 'owner')}/{_segment(digest, 'digest')}.{_extension(ext)}"


def output_key(task_id: str, index: int, ext: str) -> str:
    """``outputs/<task_id>/<index>.<ext>``: a retried watermarking step overwrites its output."""
    if index < 0:
        raise InvalidBlobKey("output index must be >= 0", details=index)
    return f"outputs/{_segment(task_id, 'task id')}/{index}.{_extension(ext)}"


def provider_output_key(task_id: str, job_id: str, index: int, ext: str) -> str:
    """``outputs/<task_id>/provider/<job digest>-<index>.<ext>``: the bytes a provider answered
    with (OpenAI), kept until the watermarking step reads them (and removed with the task's
    outputs). The job id is digested: it comes from the provider."""
    if index < 0:
        raise InvalidBlobKey("output index must be >= 0", details=index)
    job = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return f"outputs/{_segment(task_id, 'task id')}/provider/{job}-{index}.{_extension(ext)}"


def derived_key(source_key: str, variant: str, ext: str) -> str:
    """``derived/<variant>/<source key>.<ext>``: the one prepared copy of a stored blob for a
    ``variant`` (a provider's input limits, say); the same source and variant land on one key."""
    stem = validate_key(source_key).rpartition(".")[0] or source_key
    return validate_key(f"derived/{_segment(variant, 'variant')}/{stem}.{_extension(ext)}")


def content_type_for_key(key: str) -> str:
    """The content type implied by a key's extension (``application/octet-stream`` if unknown)."""
    _, _, ext = key.rpartition(".")
    return _CONTENT_TYPES.get(ext.lower(), "application/octet-stream")


def extension_for(content_type: str) -> str:
    """The extension used in keys for an image content type; raise ``InvalidBlobKey`` if none."""
    base = content_type.split(";", 1)[0].strip().lower()
    try:
        return _EXTENSIONS[base]
    except KeyError:
        raise InvalidBlobKey(f"no blob extension for content type {base!r}") from None
