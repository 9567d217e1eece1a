"""The BlobStore port, deterministic key helpers, and the factory that picks an adapter.

Adapters live beside this module: ``local_blobs.LocalBlobStore`` (files under ``var/``, served by
hookline through signed expiring URLs) and ``s3_blobs.S3BlobStore`` (S3 / MinIO via the ``minio``
SDK). Keys are deterministic (``uploads/<owner>/<digest>.<ext>``, ``outputs/<task>/<n>.<ext>``) so a
retried step overwrites what an earlier attempt wrote instead of leaving a second copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from statemachine.errors import BadRequest

if TYPE_CHECKING:
    from service.settings import Settings

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


def build_blob_store(settings: Settings) -> BlobStore:
    """The adapter named by ``settings.blob_url``.

    ``file://var/blobs`` (relative to the working directory), ``file:///abs/path``, or
    ``s3://bucket[/prefix]`` with ``s3_endpoint`` (``host:port`` or ``http(s)://host:port``; an
    explicit scheme decides ``secure``), ``s3_access_key``, ``s3_secret_key``, ``s3_region``,
    ``s3_public_endpoint``. Local file URLs are signed with ``secret_key``, or with a key created
    once under ``var_dir``.
    """
    url = settings.blob_url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"HOOKLINE_BLOB_URL must be file://… or s3://…, got {url!r}")
    if scheme == "file":
        from service.blobs.local import LocalBlobStore, load_or_create_secret

        if not rest:
            raise ValueError("HOOKLINE_BLOB_URL file:// needs a path")
        secret = (
            settings.secret_key.get_secret_value().encode()
            if settings.secret_key is not None
            else load_or_create_secret(settings.var_dir)
        )
        return LocalBlobStore(Path(rest), settings.public_url, secret)
    if scheme == "s3":
        from service.blobs.s3 import S3BlobStore, split_endpoint

        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError("HOOKLINE_BLOB_URL s3:// needs a bucket")
        if not settings.s3_endpoint:
            raise ValueError("HOOKLINE_S3_ENDPOINT is required with an s3:// blob URL")
        endpoint, secure = split_endpoint(settings.s3_endpoint, default_secure=settings.s3_secure)
        return S3BlobStore(
            endpoint,
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            bucket,
            secure=secure,
            region=settings.s3_region,
            prefix=prefix.strip("/"),
            public_endpoint=settings.s3_public_endpoint,
        )
    raise ValueError(f"unknown blob store scheme {scheme!r} in HOOKLINE_BLOB_URL")
