"""The outbound HTTP client (callbacks/transport.py ``new_client``: httpx on aiohttp, and its
``exchange``, aiohttp alone) fails the way its callers expect: every failure of a peer is an
``httpx.TransportError`` of the kind httpcore gave (the fetcher, the provider calls and the
webhook deliverer catch those, nothing else), its text carries no request header, and a provider
exchange is bounded as a whole. The peers are real sockets on loopback that misbehave on
purpose."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from callbacks.errors import PermanentProviderError, RetryableProviderError
from callbacks.http import request_answer
from callbacks.transport import READ_CHUNK_BYTES, OutboundClient, new_client
from service.media.fetch import FetchError, SafeFetcher
from tests.support.gc import collector_off

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SECRET = "sk-live-do-not-log-me"
GUARD_S = 30.0  # only against hangs: nothing here waits on time for its result


@contextlib.asynccontextmanager
async def peer(handle: Handler) -> AsyncIterator[str]:
    """A TCP server on loopback running ``handle`` per connection; yields its base URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await handle(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def answering(raw: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()

    return handle


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # reads the request, answers nothing


async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)  # accepts, then reads nothing: the sender's buffers fill up


MALFORMED = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nNo Colon Here\r\n\r\n"
BAD_STATUS = b"HTTP/1.1 twohundred OK\r\n\r\n"
CUT_OFF = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10


def fetcher(base: str, timeout_s: float = 5.0) -> SafeFetcher:
    host = base.removeprefix("http://")
    return SafeFetcher(None, allow_hosts={host}, max_bytes=100_000, timeout_s=timeout_s)


async def fetch_refused(base: str, path: str, headers: dict[str, str] | None = None) -> FetchError:
    """The ``FetchError`` a fetch of ``base + path`` (allow-listed) ends with."""
    fetch = fetcher(base)
    try:
        with pytest.raises(FetchError) as caught:
            await fetch.fetch(f"{base}{path}", headers=headers)
    finally:
        await fetch.aclose()
    return caught.value


@pytest.mark.parametrize("raw", [MALFORMED, BAD_STATUS], ids=["header", "status line"])
async def test_a_malformed_answer_is_a_transport_error(raw: bytes) -> None:
    async with peer(answering(raw)) as base, new_client(timeout=5) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get(f"{base}/x", headers={"Authorization": f"Bearer {SECRET}"})
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    # the aiohttp error (its repr holds the request's headers) is neither chained nor shown
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("raw", [MALFORMED, BAD_STATUS, CUT_OFF], ids=["header", "status", "cut"])
async def test_the_fetcher_reports_a_broken_peer_as_unreachable_and_retryable(raw: bytes) -> None:
    async with peer(answering(raw)) as base:
        error = await fetch_refused(base, "/in.png", headers={"x-key": SECRET})
    assert error.code == "url_unreachable" and error.retryable
    assert SECRET not in error.message


async def test_a_peer_that_hangs_up_is_not_a_timeout() -> None:
    async with peer(hang_up) as base:
        error = await fetch_refused(base, "/in.png")
    assert error.code == "url_unreachable", error.message


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with new_client(timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/x")


async def test_a_provider_answering_malformed_http_is_a_retryable_provider_error() -> None:
    async with peer(answering(MALFORMED)) as base, new_client(timeout=5) as client:
        with pytest.raises(RetryableProviderError) as caught:
            await request_answer(
                client, "POST", f"{base}/v1/jobs", provider="p", headers={"x-key": SECRET}, json={}
            )
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value.details)


async def test_a_provider_that_never_reads_the_submit_is_cut_off_as_a_whole() -> None:
    """The transport bounds connecting and each read, not sending: a peer that stops reading a
    large body would hold the submit (and its provider slot) forever without the whole-exchange
    limit."""
    big = {"input": "x" * 32_000_000}  # more than any socket buffer takes without a reader
    async with peer(never_read) as base, new_client(timeout=0.3) as client:
        with pytest.raises(RetryableProviderError) as caught:
            await request_answer(client, "POST", f"{base}/v1/jobs", provider="p", json=big)
    assert "took over" in caught.value.message or "timeout" in caught.value.message


async def bad_chunk_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
    writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # the malformed chunk size in a packet of its own
    writer.write(b"zz\r\n")
    await writer.drain()
    await asyncio.sleep(3600)


async def read_raw(client: OutboundClient, way: str, url: str) -> list[bytes]:
    """The body of a GET of ``url`` in the pieces read: by httpx or by ``exchange``."""
    if way == "httpx":
        async with client.stream("GET", url) as answer:
            return [chunk async for chunk in answer.aiter_raw()]
    direct = await client.exchange("GET", url, headers={})
    try:
        return [chunk async for chunk in direct.aiter_raw()]
    finally:
        await direct.aclose()


WAYS = ["httpx", "exchange"]


@pytest.mark.parametrize("way", WAYS)
async def test_a_malformed_chunk_after_the_head_ends_within_the_read_timeout(way: str) -> None:
    """aiohttp's compiled parser neither fails such a body nor keeps its read timer: the read
    waited forever. Each chunk is read within the request's read timeout instead (the guard
    only keeps a regression from hanging the suite)."""
    async with peer(bad_chunk_later) as base, new_client(timeout=0.3) as client:
        async with asyncio.timeout(GUARD_S):
            with pytest.raises((httpx.ReadTimeout, httpx.RemoteProtocolError)):
                await read_raw(client, way, f"{base}/out.png")


PNG_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 4\r\n\r\nPNG!"
JSON_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def answering_each(raw: bytes) -> Handler:
    """Like ``answering``, for every request of a kept-alive connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(raw)
            await writer.drain()

    return handle


async def test_a_finished_exchange_is_freed_without_the_cyclic_collector() -> None:
    """Each exchange's objects go when its caller lets go of them, not when the cyclic GC finds
    them: httpx's response and the stream wrapped around it held each other, and under load
    those cycles were megabytes of garbage held per in-flight burst (bench/RESULTS.md)."""
    async with (
        peer(answering_each(JSON_ANSWER)) as json_base,
        peer(answering_each(PNG_ANSWER)) as png_base,
        new_client(timeout=5) as client,
    ):
        fetch = fetcher(png_base)
        try:
            for _ in range(2):  # the first exchange opens the pools and connections
                await client.get(f"{json_base}/x")
                await request_answer(client, "POST", f"{json_base}/v1/jobs", provider="p", json={})
                await fetch.fetch(f"{png_base}/out.png")
            with collector_off():
                response = await client.get(f"{json_base}/x")
                assert response.json() == {}
                held = weakref.ref(response)
                del response
                assert held() is None
                for _ in range(5):
                    await client.get(f"{json_base}/x")
                    await request_answer(
                        client, "POST", f"{json_base}/v1/jobs", provider="p", json={}
                    )
                    assert (await fetch.fetch(f"{png_base}/out.png")).data == b"PNG!"
                assert gc.collect() == 0
        finally:
            await fetch.aclose()


BIG = 200_000
BIG_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG
)


@pytest.mark.parametrize("way", WAYS)
async def test_a_body_is_read_in_pieces_of_what_has_arrived_not_16_kib(way: str) -> None:
    """httpx-aiohttp reads a body 16 KiB at a time: a 200 KB answer written at once took 13
    passes through the stream layers. Each read now hands up what has arrived (up to
    ``READ_CHUNK_BYTES``); the bytes are the same."""
    async with peer(answering(BIG_ANSWER)) as base, new_client(timeout=5) as client:
        chunks = await read_raw(client, way, f"{base}/out.png")
    assert b"".join(chunks) == b"x" * BIG
    assert max(len(c) for c in chunks) > 16 * 1024
    assert max(len(c) for c in chunks) <= READ_CHUNK_BYTES


def cookie_setter(seen: list[str | None]) -> Handler:
    """Answers every request on the connection with a ``Set-Cookie``; records each request's
    ``Cookie`` header (None: none sent)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            cookie = [line for line in head.split("\r\n") if line.startswith("cookie:")]
            seen.append(cookie[0].removeprefix("cookie:").strip() if cookie else None)
            writer.write(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: session=of-whoever-came-first; Path=/\r\n"
                b"Content-Type: image/png\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    return handle


async def test_no_cookie_an_answer_sets_is_kept_or_sent_back() -> None:
    """One client serves every user's fetches and every provider call: a cookie one answer set
    would go with the next request to that host, another user's. Both jars (httpx's and
    aiohttp's, which keeps a named host's cookies) keep nothing."""
    seen: list[str | None] = []
    async with peer(cookie_setter(seen)) as base, new_client(timeout=5) as client:
        port = base.rsplit(":", 1)[1]
        for url in (
            f"{base}/a",
            f"{base}/b",
            f"http://localhost:{port}/c",
            f"http://localhost:{port}/d",
        ):
            assert (await client.get(url)).status_code == 200
        assert not client.cookies
        fetch = fetcher(base)
        try:
            for _ in range(2):
                assert (await fetch.fetch(f"{base}/e")).data == b"ok"
        finally:
            await fetch.aclose()
    assert seen == [None] * 6


def recording(seen: list[str], raw: bytes) -> Handler:
    """Answers ``raw`` to every request on the connection; records each request's head."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower())
            writer.write(raw)
            await writer.drain()

    return handle


async def test_every_way_out_names_hookline_as_its_user_agent() -> None:
    seen: list[str] = []
    async with peer(recording(seen, JSON_ANSWER)) as base, new_client(timeout=5) as client:
        await client.get(f"{base}/x")  # httpx
        await request_answer(client, "POST", f"{base}/v1/jobs", provider="p", json={})
        fetch = SafeFetcher(
            client, allow_hosts={base.removeprefix("http://")}, max_bytes=100, timeout_s=5
        )
        await fetch.fetch(f"{base}/out.json", accept_image=False)
        await (await client.exchange("GET", f"{base}/x", headers={"user-agent": "mine"})).aclose()
    agents = [[v for v in head.split("\r\n") if v.startswith("user-agent:")] for head in seen]
    assert agents == [["user-agent: hookline"]] * 3 + [["user-agent: mine"]]


STACKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: identity\r\n"
    b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x8b\x08\x00"
)


async def test_a_header_sent_on_two_lines_reads_as_both_values() -> None:
    """An answer's headers read as httpx reads them: ``identity`` then ``gzip`` on a line each
    is ``identity, gzip``, a stacked encoding the fetcher refuses (aiohttp alone gives the
    first line only: identity, and compressed bytes stored as an image)."""
    async with peer(answering_each(STACKED)) as base, new_client(timeout=5) as client:
        direct = await client.exchange("GET", f"{base}/out.png", headers={})
        await direct.aclose()
        assert direct.headers["content-encoding"] == "identity, gzip"
        refused = await fetch_refused(base, "/out.png")
    assert refused.code == "unsupported_encoding"


async def test_a_closed_client_sends_nothing() -> None:
    seen: list[str] = []
    async with peer(recording(seen, JSON_ANSWER)) as base:
        client = new_client(timeout=5)
        await client.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await client.exchange("GET", f"{base}/x", headers={})
        with pytest.raises(RuntimeError, match="closed"):
            await request_answer(client, "GET", f"{base}/x", provider="p")
    assert seen == []


async def test_a_bad_url_with_params_is_a_permanent_provider_error() -> None:
    async with new_client(timeout=5) as client:
        with pytest.raises(PermanentProviderError, match="bad request URL"):
            await request_answer(client, "GET", "http://h:port/x", provider="p", params={"a": "1"})
