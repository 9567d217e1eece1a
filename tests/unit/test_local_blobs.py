"""The local-files blob store, its signed URLs and the route that serves them, key helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.blobs.base import (
    InvalidBlobKey,
    content_type_for_key,
    extension_for,
    output_key,
    upload_key,
    validate_key,
)
from service.blobs.local import (
    BadSignature,
    LocalBlobStore,
    UrlExpired,
    load_or_create_secret,
)
from service.http.errors import http_status
from service.http.files import file_route
from service.runtime import build_blob_store
from service.settings import Settings
from statemachine import clock
from statemachine.errors import HooklineError, NotFound

PUBLIC = "http://files.test"
NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", PUBLIC, b"k" * 32)


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The one clock, frozen at NOW; tests move it by assigning ``fixed_clock[0]``."""
    current = [NOW]
    monkeypatch.setattr(clock, "now", lambda: current[0])
    return current


def client_for(store: LocalBlobStore) -> httpx.AsyncClient:
    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HooklineError)
        return JSONResponse({"error": {"code": exc.code}}, status_code=http_status(exc))

    app = Starlette(routes=[file_route(store)], exception_handlers={HooklineError: on_error})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC)


def split(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


# -- keys ----------------------------------------------------------------------------------------


def test_key_helpers_are_deterministic() -> None:
    assert upload_key("alice", "ab12", ".JPG") == "uploads/alice/ab12.jpg"
    assert upload_key("alice", "ab12", "jpg") == upload_key("alice", "ab12", "jpg")
    assert output_key("t-1", 0, "png") == "outputs/t-1/0.png"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a/../b",
        "..",
        "a//b",
        "a/./b",
        "a/.hidden",
        "a b",
        "a\\b",
        "ä",
        "a/b/",
        "x" * 600,
    ],
)
def test_unsafe_keys_are_refused_with_a_clear_error(key: str) -> None:
    with pytest.raises(InvalidBlobKey) as err:
        validate_key(key)
    assert (http_status(err.value), err.value.code) == (422, "invalid_blob_key")


def test_key_helpers_refuse_unsafe_parts() -> None:
    with pytest.raises(InvalidBlobKey):
        upload_key("../bob", "ab", "jpg")
    with pytest.raises(InvalidBlobKey):
        output_key("t1", -1, "png")
    with pytest.raises(InvalidBlobKey):
        upload_key("alice", "ab", "j/pg")


def test_content_types_and_extensions() -> None:
    assert content_type_for_key("outputs/t/0.jpg") == "image/jpeg"
    assert content_type_for_key("outputs/t/0.webp") == "image/webp"
    assert content_type_for_key("x/y.bin") == "application/octet-stream"
    assert extension_for("image/png; q=1") == "png"
    with pytest.raises(InvalidBlobKey):
        extension_for("text/html")


# -- the store -----------------------------------------------------------------------------------


async def test_put_get_overwrite_exists(store: LocalBlobStore) -> None:
    key = output_key("t1", 0, "png")
    assert not await store.exists(key)
    await store.put(key, b"first", "image/png")
    await store.put(key, b"second", "image/png")
    assert await store.get(key) == b"second"
    assert await store.exists(key)
    assert not list((store.root / "outputs/t1").glob(".tmp-*"))  # no temp file left behind


async def test_get_missing_is_not_found(store: LocalBlobStore) -> None:
    with pytest.raises(NotFound):
        await store.get("outputs/none/0.png")


async def test_list_and_delete_prefix(store: LocalBlobStore) -> None:
    for key in ("outputs/t1/0.png", "outputs/t1/1.png", "outputs/t10/0.png", "uploads/u/a.jpg"):
        await store.put(key, b"x", "image/png")
    assert await store.list_keys("outputs/t1/") == ["outputs/t1/0.png", "outputs/t1/1.png"]
    assert await store.list_keys("outputs/t1") == [
        "outputs/t1/0.png",
        "outputs/t1/1.png",
        "outputs/t10/0.png",
    ]
    assert len(await store.list_keys("")) == 4
    assert await store.list_keys("nothing/") == []
    assert await store.delete_prefix("outputs/t1/") == 2
    assert await store.list_keys("outputs/") == ["outputs/t10/0.png"]
    assert await store.delete_prefix("outputs/t1/") == 0
    assert not (store.root / "outputs" / "t1").exists()  # emptied directories are removed
    assert (store.root / "outputs" / "t10").is_dir()


async def test_delete_prefix_refuses_everything_and_traversal(store: LocalBlobStore) -> None:
    with pytest.raises(InvalidBlobKey):
        await store.delete_prefix("")
    with pytest.raises(InvalidBlobKey):
        await store.delete_prefix("../")
    with pytest.raises(InvalidBlobKey):
        await store.put("../escape.png", b"x", "image/png")


async def test_ping_creates_the_root(store: LocalBlobStore) -> None:
    await store.ping()
    assert store.root.is_dir()


# -- signed URLs ---------------------------------------------------------------------------------


async def test_url_is_signed_and_expires(store: LocalBlobStore, fixed_clock: list[float]) -> None:
    url = await store.url("outputs/t1/0.png", 60)
    path, query = split(url)
    assert url.startswith(f"{PUBLIC}/files/outputs/t1/0.png?")
    assert path == "/files/outputs/t1/0.png"
    assert int(query["exp"]) == int(NOW) + 60
    store.verify_signature("outputs/t1/0.png", query["exp"], query["sig"], NOW + 59)
    with pytest.raises(UrlExpired) as err:
        store.verify_signature("outputs/t1/0.png", query["exp"], query["sig"], NOW + 60)
    assert (http_status(err.value), err.value.code) == (403, "url_expired")


@pytest.mark.parametrize("field", ["key", "exp", "sig"])
async def test_tampered_urls_are_forbidden(
    store: LocalBlobStore, fixed_clock: list[float], field: str
) -> None:
    _, query = split(await store.url("outputs/t1/0.png", 60))
    key, exp, sig = "outputs/t1/0.png", query["exp"], query["sig"]
    if field == "key":
        key = "outputs/t2/0.png"
    elif field == "exp":
        exp = str(int(exp) + 3600)  # extending the lifetime is tampering, not a valid URL
    else:
        sig = sig[:-2] + ("AA" if not sig.endswith("AA") else "BB")
    with pytest.raises(BadSignature) as err:
        store.verify_signature(key, exp, sig, NOW)
    assert (http_status(err.value), err.value.code) == (403, "bad_signature")


async def test_a_url_signed_with_another_secret_is_forbidden(
    store: LocalBlobStore, fixed_clock: list[float]
) -> None:
    other = LocalBlobStore(store.root, PUBLIC, b"z" * 32)
    _, query = split(await other.url("outputs/t1/0.png", 60))
    with pytest.raises(BadSignature):
        store.verify_signature("outputs/t1/0.png", query["exp"], query["sig"], NOW)


# -- the route -----------------------------------------------------------------------------------


async def test_route_serves_bytes_with_type_and_cache_control(
    store: LocalBlobStore, fixed_clock: list[float]
) -> None:
    await store.put("outputs/t1/0.webp", b"RIFF....WEBP", "image/webp")
    url = await store.url("outputs/t1/0.webp", 120)
    fixed_clock[0] = NOW + 20
    async with client_for(store) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"RIFF....WEBP"
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["cache-control"] == "private, max-age=100"


async def test_route_expired_tampered_missing(
    store: LocalBlobStore, fixed_clock: list[float]
) -> None:
    await store.put("outputs/t1/0.png", b"png", "image/png")
    good = await store.url("outputs/t1/0.png", 60)
    missing = await store.url("outputs/t1/9.png", 60)
    async with client_for(store) as client:
        assert (await client.get(missing)).status_code == 404
        assert (await client.get(good.replace("t1/0", "t1/9"))).status_code == 403
        assert (await client.get(good.split("?")[0])).status_code == 403  # unsigned
        fixed_clock[0] = NOW + 61
        expired = await client.get(good)
    assert expired.status_code == 403
    assert expired.json() == {"error": {"code": "url_expired"}}


async def test_route_does_not_reveal_existence_without_a_signature(
    store: LocalBlobStore, fixed_clock: list[float]
) -> None:
    await store.put("outputs/t1/0.png", b"png", "image/png")
    async with client_for(store) as client:
        present = await client.get("/files/outputs/t1/0.png?exp=9999999999&sig=x")
        absent = await client.get("/files/outputs/t1/1.png?exp=9999999999&sig=x")
    assert present.status_code == absent.status_code == 403


# -- the secret ----------------------------------------------------------------------------------


def test_secret_is_created_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "var")
    assert len(first) == 32
    assert load_or_create_secret(tmp_path / "var") == first
    assert (tmp_path / "var" / "secret.key").read_text().strip() == first.hex()
    assert [p.name for p in (tmp_path / "var").iterdir()] == ["secret.key"]


def test_racing_threads_agree_on_one_secret(tmp_path: Path) -> None:
    barrier = threading.Barrier(16)
    results: list[bytes] = []

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_secret(tmp_path / "var"))

    threads = [threading.Thread(target=start) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert len(set(results)) == 1


def test_racing_processes_agree_on_one_secret(tmp_path: Path) -> None:
    """Several processes starting at once: exactly one key wins and all of them read it."""
    code = (
        "import sys, time; from pathlib import Path;"
        "from service.blobs.local import load_or_create_secret as f;"
        "t = float(sys.argv[2]);"
        "time.sleep(max(0.0, t - time.time()));"
        "print(f(Path(sys.argv[1])).hex())"
    )
    start_at = str(time.time() + 1.0)  # all processes call at about the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "var"), start_at],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
            text=True,
        )
        for _ in range(6)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(keys) == 1
    assert (tmp_path / "var" / "secret.key").read_text().strip() == keys.pop()


# -- the factory ---------------------------------------------------------------------------------


def test_build_blob_store_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = build_blob_store(Settings(blob_url="file://var/blobs", var_dir=Path("var")))
    assert isinstance(relative, LocalBlobStore)
    assert relative.root == Path("var/blobs")
    assert (tmp_path / "var" / "secret.key").exists()
    absolute = build_blob_store(
        Settings(blob_url=f"file://{tmp_path}/abs", secret_key="s3cret")  # type: ignore[arg-type]
    )
    assert isinstance(absolute, LocalBlobStore)
    assert absolute.root == tmp_path / "abs"


def test_build_blob_store_refuses_unknown_schemes() -> None:
    with pytest.raises(ValueError):
        build_blob_store(Settings(blob_url="ftp://x"))
    with pytest.raises(ValueError):
        build_blob_store(Settings(blob_url="s3://bucket", s3_endpoint=None))


async def test_delete_prefix_also_removes_temp_files_a_killed_writer_left(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    await store.put("outputs/t9/0.png", b"png", "image/png")
    folder = store.root / "outputs" / "t9"
    stale = folder / ".tmp-abandoned"
    stale.write_bytes(b"half a write")
    old = clock.now() - 3600
    os.utime(stale, (old, old))
    fresh = folder / ".tmp-in-progress"
    fresh.write_bytes(b"a live write")
    assert await store.delete_prefix("outputs/t9/") == 1
    assert not stale.exists()
    assert fresh.exists()  # may belong to a write still running
