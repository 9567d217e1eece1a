"""Blobs in S3 / MinIO through the ``minio`` SDK.

The SDK is synchronous, so every call runs in a thread (``asyncio.to_thread``). Its errors are
translated at this boundary: a missing object is ``NotFound``; an S3 error response is
``StoreError``; a connection failure or a non-S3 5xx is ``Unavailable`` — always ``from exc``.

URLs are presigned GETs. With ``public_endpoint`` (the host browsers and providers reach, e.g. a
reverse proxy in front of MinIO) a second client, configured with that host and an explicit region,
signs them: presigning is pure computation and never contacts that host.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from service.blobs.base import validate_key, validate_prefix
from statemachine.errors import BadRequest, NotFound, StoreError, Unavailable

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"  # MinIO's, and what presigning for a public endpoint assumes unset
MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # SigV4's ceiling
_MISSING_OBJECT = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_BUCKET_TAKEN = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def split_endpoint(endpoint: str, *, default_secure: bool) -> tuple[str, bool]:
    """``http://host:port`` → (``host:port``, False); a bare ``host:port`` keeps
    ``default_secure``. The minio SDK wants the host without a scheme."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint.rstrip("/"), default_secure
    if scheme not in ("http", "https"):
        raise ValueError(f"S3 endpoint scheme must be http or https, got {endpoint!r}")
    return rest.rstrip("/"), scheme == "https"


def _http_client(timeout_s: float) -> urllib3.PoolManager:
    # The SDK's default waits 5 minutes per connect/read; a readiness probe must not.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
        maxsize=16,
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class S3BlobStore:
    """``BlobStore`` on an S3-compatible service. ``prefix`` namespaces every key in the bucket."""

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        *,
        secure: bool,
        region: str | None,
        prefix: str = "",
        public_endpoint: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        check_bucket_name(bucket)  # ValueError at startup, not on the first request
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self._http = _http_client(timeout_s)
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        self._signer = self._client
        if public_endpoint:
            host, public_secure = split_endpoint(public_endpoint, default_secure=secure)
            self._signer = Minio(
                host,
                access_key=access_key,
                secret_key=secret_key,
                secure=public_secure,
                region=region or DEFAULT_REGION,  # a region set means no GetBucketLocation call
                http_client=self._http,
            )
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one SDK call in a thread and translate its errors."""
        try:
            return await asyncio.to_thread(fn)
        except S3Error as exc:
            if exc.code in _MISSING_OBJECT:
                raise NotFound(f"{what}: no such blob", code="blob_not_found") from exc
            raise StoreError(f"{what}: S3 error {exc.code}: {exc.message}") from exc
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(f"{what}: S3 server error: {exc}", code="blob_store_down") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"{what}: S3 unreachable: {exc}", code="blob_store_down") from exc
        except MinioException as exc:
            raise StoreError(f"{what}: {exc}") from exc

    async def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if not self._bucket_ready:
                await self._call("create bucket", self._create_bucket_sync)
                self._bucket_ready = True

    def _create_bucket_sync(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as exc:
            # Another process created it between our check and our create: that's success.
            if exc.code not in _BUCKET_TAKEN or not self._client.bucket_exists(self.bucket):
                raise

    # -- BlobStore -------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        name = self._name(key)
        await self._ensure_bucket()
        await self._call(
            "put",
            lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    async def get(self, key: str) -> bytes:
        name = self._name(key)
        await self._ensure_bucket()

        def read() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return await self._call("get", read)

    async def exists(self, key: str) -> bool:
        name = self._name(key)
        await self._ensure_bucket()
        try:
            await self._call("exists", lambda: self._client.stat_object(self.bucket, name))
        except NotFound:
            return False
        return True

    async def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        await self._ensure_bucket()
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def names() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=full or None, recursive=True)
            return sorted(o.object_name[strip:] for o in objects if o.object_name)

        return await self._call("list", names)

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        await self._ensure_bucket()
        full = self._full_prefix(prefix)

        def delete() -> int:
            names = [
                o.object_name
                for o in self._client.list_objects(self.bucket, prefix=full, recursive=True)
                if o.object_name
            ]
            if not names:
                return 0
            # remove_objects is lazy: iterating it performs the deletes and yields failures.
            errors = list(
                self._client.remove_objects(self.bucket, (DeleteObject(n) for n in names))
            )
            if errors:
                raise StoreError(
                    f"delete_prefix: {len(errors)} of {len(names)} deletes failed",
                    details=[f"{e.name}: {e.code}" for e in errors[:10]],
                )
            return len(names)

        return await self._call("delete_prefix", delete)

    async def url(self, key: str, ttl_s: int) -> str:
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise BadRequest(f"URL lifetime must be 1..{MAX_PRESIGN_TTL_S} s", code="bad_ttl")
        name = self._name(key)
        expires = timedelta(seconds=ttl_s)
        return await self._call(
            "presign",
            lambda: self._signer.presigned_get_object(self.bucket, name, expires=expires),
        )

    async def ping(self) -> None:
        self._bucket_ready = False
        await self._ensure_bucket()

    async def close(self) -> None:
        await asyncio.to_thread(self._http.clear)
