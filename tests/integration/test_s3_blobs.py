"""The S3 blob store against moto's S3 server over real HTTP on a loopback port."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from minio import Minio
from minio.error import S3Error
from moto.server import ThreadedMotoServer

from service.blobs.s3 import S3BlobStore, split_endpoint
from service.runtime import build_blob_store
from service.settings import Settings
from statemachine.errors import BadRequest, NotFound, Unavailable

ACCESS, SECRET, REGION = "test-access", "test-secret", "us-east-1"
_names = itertools.count()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


def fresh_bucket() -> str:
    return f"hookline-test-{next(_names)}"


def make_store(endpoint: str, bucket: str, **kw: object) -> S3BlobStore:
    return S3BlobStore(endpoint, ACCESS, SECRET, bucket, secure=False, region=REGION, **kw)  # type: ignore[arg-type]


def raw_client(endpoint: str) -> Minio:
    return Minio(endpoint, ACCESS, SECRET, secure=False, region=REGION)


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def test_bucket_is_created_on_first_use(endpoint: str) -> None:
    bucket = fresh_bucket()
    assert not raw_client(endpoint).bucket_exists(bucket)
    store = make_store(endpoint, bucket)
    await store.put("outputs/t1/0.png", b"png", "image/png")
    assert raw_client(endpoint).bucket_exists(bucket)
    await store.close()


async def test_racing_bucket_creation_is_tolerated(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes see no bucket and both create it: the loser's "already owned" error (which
    moto, like AWS us-east-1, doesn't send on its own) is treated as success."""
    bucket = fresh_bucket()
    racer = make_store(endpoint, bucket)
    checks = iter([False])
    real_exists = racer._client.bucket_exists

    def lose_the_race(name: str, *args: object, **kw: object) -> None:
        raw_client(endpoint).make_bucket(name)  # the other process wins
        raise S3Error(
            None,  # type: ignore[arg-type]
            "BucketAlreadyOwnedByYou",
            "Your previous request to create the named bucket succeeded",
            f"/{name}",
            None,
            None,
        )

    monkeypatch.setattr(racer._client, "bucket_exists", lambda n: next(checks, real_exists(n)))
    monkeypatch.setattr(racer._client, "make_bucket", lose_the_race)
    await racer.put("a.txt", b"x", "text/plain")
    assert await racer.get("a.txt") == b"x"


async def test_concurrent_first_use_creates_the_bucket_once(endpoint: str) -> None:
    bucket = fresh_bucket()
    stores = [make_store(endpoint, bucket) for _ in range(4)]
    await asyncio.gather(*(s.put(f"k{i}.png", b"x", "image/png") for i, s in enumerate(stores)))
    assert await stores[0].list_keys("") == ["k0.png", "k1.png", "k2.png", "k3.png"]


async def test_put_get_overwrite_exists(endpoint: str) -> None:
    store = make_store(endpoint, fresh_bucket())
    key = "outputs/t1/0.jpg"
    assert not await store.exists(key)
    await store.put(key, b"first", "image/jpeg")
    await store.put(key, b"second", "image/jpeg")
    assert await store.get(key) == b"second"
    assert await store.exists(key)
    with pytest.raises(NotFound):
        await store.get("outputs/t1/9.jpg")
    stat = raw_client(endpoint).stat_object(store.bucket, key)
    assert stat.content_type == "image/jpeg"


async def test_list_and_delete_prefix(endpoint: str) -> None:
    store = make_store(endpoint, fresh_bucket())
    keys = ["outputs/t1/0.png", "outputs/t1/1.png", "outputs/t10/0.png", "uploads/u/a.jpg"]
    for key in keys:
        await store.put(key, b"x", "image/png")
    assert await store.list_keys("outputs/t1/") == keys[:2]
    assert await store.list_keys("outputs/t1") == keys[:3]
    assert await store.list_keys("") == sorted(keys)
    assert await store.delete_prefix("outputs/t1/") == 2
    assert await store.list_keys("") == ["outputs/t10/0.png", "uploads/u/a.jpg"]
    assert await store.delete_prefix("outputs/t1/") == 0


async def test_prefix_namespaces_every_key(endpoint: str) -> None:
    store = make_store(endpoint, fresh_bucket(), prefix="/env/prod/")
    await store.put("outputs/t1/0.png", b"x", "image/png")
    raw = [o.object_name for o in raw_client(endpoint).list_objects(store.bucket, recursive=True)]
    assert raw == ["env/prod/outputs/t1/0.png"]
    assert await store.list_keys("outputs/") == ["outputs/t1/0.png"]
    assert await store.delete_prefix("outputs/") == 1


async def test_presigned_url_downloads_with_plain_http(endpoint: str) -> None:
    store = make_store(endpoint, fresh_bucket())
    await store.put("outputs/t1/0.png", b"\x89PNG-bytes", "image/png")
    url = await store.url("outputs/t1/0.png", 900)
    query = query_of(url)
    assert query["X-Amz-Expires"] == "900"
    assert len(query["X-Amz-Signature"]) == 64
    assert urlsplit(url).netloc == endpoint
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG-bytes"


async def test_presigning_with_a_public_endpoint_uses_that_host(endpoint: str) -> None:
    """The signer never contacts the public host (``.invalid`` can't resolve), and a public host
    that does reach the server (``localhost``) serves the object."""
    bucket = fresh_bucket()
    store = make_store(endpoint, bucket, public_endpoint="https://files.example.invalid")
    await store.put("outputs/t1/0.png", b"img", "image/png")
    url = await store.url("outputs/t1/0.png", 60)
    assert url.startswith(f"https://files.example.invalid/{bucket}/outputs/t1/0.png?")
    assert query_of(url)["X-Amz-Expires"] == "60"

    port = endpoint.rsplit(":", 1)[1]
    local = make_store(endpoint, bucket, public_endpoint=f"http://localhost:{port}")
    url = await local.url("outputs/t1/0.png", 60)
    assert urlsplit(url).netloc == f"localhost:{port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).content == b"img"


async def test_presign_lifetime_is_bounded(endpoint: str) -> None:
    store = make_store(endpoint, fresh_bucket())
    with pytest.raises(BadRequest):
        await store.url("a.png", 0)
    with pytest.raises(BadRequest):
        await store.url("a.png", 8 * 24 * 3600)


async def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = make_store(f"127.0.0.1:{port}", fresh_bucket(), timeout_s=2.0)
    with pytest.raises(Unavailable) as err:
        await store.ping()
    assert err.value.__cause__ is not None
    await store.close()


async def test_build_blob_store_from_settings(endpoint: str) -> None:
    bucket = fresh_bucket()
    settings = Settings(
        blob_url=f"s3://{bucket}/pre",
        s3_endpoint=f"http://{endpoint}",
        s3_access_key=ACCESS,  # type: ignore[arg-type]
        s3_secret_key=SECRET,  # type: ignore[arg-type]
        s3_region=REGION,
    )
    store = build_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    await store.put("k.png", b"v", "image/png")
    assert raw_client(endpoint).get_object(bucket, "pre/k.png").read() == b"v"
    await store.close()


def test_invalid_bucket_names_fail_at_construction() -> None:
    with pytest.raises(ValueError):
        make_store("127.0.0.1:9", "No_Such..Bucket")


def test_split_endpoint() -> None:
    assert split_endpoint("minio:9000", default_secure=True) == ("minio:9000", True)
    assert split_endpoint("http://minio:9000/", default_secure=True) == ("minio:9000", False)
    assert split_endpoint("https://s3.example.com", default_secure=False) == (
        "s3.example.com",
        True,
    )
