"""SSRF-safe fetching: refused destinations, pinned connections, redirects, limits, errors.

Real HTTP goes to a loopback server started here (allow-listed where a test needs it); nothing
reaches the internet: public names resolve through a fake resolver to a mock transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import ipaddress
import socket
import ssl
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import trustme
from PIL import Image

from callbacks.transport import new_client
from service.http.errors import http_status
from service.media.budget import MemoryBudget
from service.media.errors import OverBudget
from service.media.fetch import (
    FetchError,
    SafeFetcher,
    is_public_address,
    isolated_resolver,
    system_resolver,
)

PUBLIC_IP = "93.184.215.14"


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()
BOMB = gzip.compress(PNG + b"\0" * 20_000_000, compresslevel=9, mtime=0)


@dataclass
class Server:
    port: int
    seen: list[dict[str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    body_release: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Iterator[Server]:
    holder: list[Server] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server = holder[0]
            # names lowercased: they are case-insensitive (the client sends them in lower case)
            server.seen.append(
                {"path": self.path, **{k.lower(): v for k, v in self.headers.items()}}
            )
            if self.path == "/slow":
                server.release.wait(10)
            if self.path == "/stalled-body":
                # headers and half the body, then the rest once the test lets it go
                body = PNG + b"\0" * 20_000
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:10_000])
                self.wfile.flush()
                server.body_release.wait(10)
                self.wfile.write(body[10_000:])
                return
            if self.path == "/chunked-big":
                # HTTP/1.0 style: no Content-Length, the body ends when the connection closes
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(PNG + b"\0" * 20_000)
                self.close_connection = True
                return
            status, headers, body = routes.get(
                self.path, (404, {"Content-Type": "text/plain"}, b"no")
            )
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value.replace("{port}", str(server.port)))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class QuietServer(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the client hanging up mid-body (byte limit, time limit) is expected here

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = Server(port=httpd.server_address[1])
    holder.append(server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.body_release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def other() -> Iterator[Server]:
    """A second loopback server, allow-listed only in some tests."""
    yield from start_server({"/echo.png": (200, {"Content-Type": "image/png"}, PNG)})


@pytest.fixture(scope="module")
def server(other: Server) -> Iterator[Server]:
    png = {"Content-Type": "image/png"}
    yield from start_server(
        {
            "/image.png": (200, png, PNG),
            "/image-with-params": (200, {"Content-Type": "image/png; charset=binary"}, PNG),
            "/octet.png": (200, {"Content-Type": "application/octet-stream"}, PNG),
            "/octet.html": (200, {"Content-Type": "application/octet-stream"}, b"<html>"),
            "/big.png": (200, png, PNG + b"\0" * 20_000),
            "/page.html": (200, {"Content-Type": "text/html; charset=utf-8"}, b"<html></html>"),
            "/missing": (404, {"Content-Type": "text/plain"}, b"gone"),
            "/busy": (503, {"Content-Type": "text/plain"}, b"busy"),
            "/limited": (429, {"Content-Type": "text/plain"}, b"slow down"),
            "/to-image": (302, {"Location": "/image.png"}, b""),
            "/to-private": (302, {"Location": "http://10.0.0.7/x.png"}, b""),
            "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/"}, b""),
            "/to-other": (302, {"Location": f"http://127.0.0.1:{other.port}/echo.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            # 20 MB of zeros in ~20 KB: past any limit once decoded
            "/gzip-bomb": (200, {"Content-Type": "image/png", "Content-Encoding": "gzip"}, BOMB),
            "/gzip-image": (
                200,
                {"Content-Type": "image/png", "Content-Encoding": "gzip"},
                gzip.compress(PNG, mtime=0),
            ),
            "/identity.png": (
                200,
                {"Content-Type": "image/png", "Content-Encoding": "identity"},
                PNG,
            ),
        }
    )


GUARD_S = 30.0  # only against hangs: nothing here waits on time for its result


def allow(*servers: Server) -> set[str]:
    return {f"127.0.0.1:{s.port}" for s in servers}


def fetcher(
    allow_hosts: set[str], *, max_bytes: int = 100_000, timeout_s: float = 5.0
) -> SafeFetcher:
    return SafeFetcher(None, allow_hosts=allow_hosts, max_bytes=max_bytes, timeout_s=timeout_s)


def never_called_client() -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request may be sent, got {request.url}")

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def fake_resolver(table: dict[str, list[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


async def expect(fetch: SafeFetcher, url: str, code: str, *, retryable: bool = False) -> FetchError:
    with pytest.raises(FetchError) as err:
        await fetch.fetch(url)
    assert err.value.code == code, err.value.message
    assert err.value.retryable is retryable
    return err.value


# -- refused destinations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/a.png",
        "https://127.8.9.10/a.png",
        "https://10.1.2.3/a.png",
        "https://172.16.0.1/a.png",
        "https://192.168.1.1/a.png",
        "https://169.254.169.254/latest/meta-data/",
        "https://100.64.0.1/a.png",
        "https://0.0.0.0/a.png",
        "https://224.0.0.1/a.png",
        "https://240.0.0.1/a.png",
        "https://[::1]/a.png",
        "https://[::]/a.png",
        "https://[fe80::1]/a.png",
        "https://[fd00:ec2::254]/latest/",
        "https://[::ffff:127.0.0.1]/a.png",
        "https://[::ffff:169.254.169.254]/a.png",
        "https://[2002:7f00:1::]/a.png",
        "https://[64:ff9b::a00:1]/a.png",
    ],
)
async def test_non_public_addresses_are_refused_before_connecting(url: str) -> None:
    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=5)
    err = await expect(fetch, url, "url_forbidden")
    assert http_status(err) == 422


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    resolver = fake_resolver({"sneaky.example": ["127.0.0.1"]})
    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=5, resolver=resolver)
    await expect(fetch, "https://sneaky.example/a.png", "url_forbidden")


async def test_a_name_with_any_private_address_is_refused() -> None:
    resolver = fake_resolver({"mixed.example": [PUBLIC_IP, "10.0.0.1"]})
    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=5, resolver=resolver)
    await expect(fetch, "https://mixed.example/a.png", "url_forbidden")


async def test_plain_http_is_refused_unless_allow_listed() -> None:
    calls: list[str] = []
    resolver = fake_resolver({"images.example": [PUBLIC_IP]}, calls)
    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=5, resolver=resolver)
    await expect(fetch, "http://images.example/a.png", "url_forbidden")
    assert calls == []


@pytest.mark.parametrize(
    "url", ["ftp://x.example/a", "file:///etc/passwd", "https://u:p@x.example/"]
)
async def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=5)
    with pytest.raises(FetchError) as err:
        await fetch.fetch(url)
    assert err.value.code in ("url_invalid", "url_forbidden")
    assert not err.value.retryable


async def test_unknown_names_are_unreachable_and_not_retried() -> None:
    fetch = SafeFetcher(
        never_called_client(), max_bytes=1000, timeout_s=5, resolver=fake_resolver({})
    )
    await expect(fetch, "https://nowhere.example/a.png", "url_unreachable")


def test_public_address_classification() -> None:
    public = ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    private = ["100.100.100.200", "198.18.0.1", "192.0.2.1", "::ffff:10.0.0.1", "ff02::1"]
    assert all(is_public_address(ipaddress.ip_address(a)) for a in public)
    assert not any(is_public_address(ipaddress.ip_address(a)) for a in private)


# -- pinning (DNS rebinding) ---------------------------------------------------------------------


async def test_the_request_goes_to_the_checked_ip_with_host_and_sni() -> None:
    """The name is resolved once; the connection targets that IP, Host and SNI carry the name."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Content-Type": "image/png"}, content=PNG)

    calls: list[str] = []
    resolver = fake_resolver({"images.example": [PUBLIC_IP]}, calls)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    fetch = SafeFetcher(http, max_bytes=10_000, timeout_s=5, resolver=resolver)
    result = await fetch.fetch("https://images.example:8443/out/1.png?sig=abc")
    (request,) = seen
    assert request.url.host == PUBLIC_IP
    assert request.url.port == 8443
    assert request.url.raw_path == b"/out/1.png?sig=abc"
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"
    assert calls == ["images.example"]
    assert result.final_url == "https://images.example:8443/out/1.png?sig=abc"
    assert (result.data, result.content_type) == (PNG, "image/png")


async def test_international_names_are_resolved_and_sent_as_idna() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Content-Type": "image/png"}, content=PNG)

    calls: list[str] = []
    resolver = fake_resolver({"xn--mnchen-3ya.example": [PUBLIC_IP]}, calls)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    fetch = SafeFetcher(http, max_bytes=10_000, timeout_s=5, resolver=resolver)
    await fetch.fetch("https://münchen.example/a.png")
    assert calls == ["xn--mnchen-3ya.example"]
    assert seen[0].extensions["sni_hostname"] == "xn--mnchen-3ya.example"
    assert seen[0].headers["host"] == "xn--mnchen-3ya.example"


# -- real HTTP against allow-listed loopback -----------------------------------------------------


async def test_allow_listed_loopback_host_works_over_real_http(server: Server) -> None:
    fetch = fetcher(allow(server))
    result = await fetch.fetch(f"{server.base}/image.png")
    await fetch.aclose()
    assert (result.data, result.content_type) == (PNG, "image/png")
    assert result.final_url == f"{server.base}/image.png"


async def test_loopback_is_refused_when_not_allow_listed(server: Server) -> None:
    await expect(fetcher(set()), f"{server.base}/image.png", "url_forbidden")
    await expect(fetcher({"127.0.0.1:1"}), f"{server.base}/image.png", "url_forbidden")


async def test_redirects_are_followed_and_rechecked(server: Server, other: Server) -> None:
    fetch = fetcher(allow(server))
    result = await fetch.fetch(f"{server.base}/to-image")
    assert result.final_url == f"{server.base}/image.png"
    await expect(fetch, f"{server.base}/to-private", "url_forbidden")
    await expect(fetch, f"{server.base}/to-metadata", "url_forbidden")
    await expect(fetch, f"{server.base}/to-other", "url_forbidden")  # loopback, other port
    await expect(fetch, f"{server.base}/loop", "too_many_redirects")


async def test_headers_do_not_follow_a_redirect_to_another_origin(
    server: Server, other: Server
) -> None:
    fetch = fetcher(allow(server, other))
    result = await fetch.fetch(f"{server.base}/to-other", headers={"Authorization": "Token t"})
    assert result.data == PNG
    assert server.seen[-1]["authorization"] == "Token t"
    assert "authorization" not in other.seen[-1]


async def test_byte_limit_with_and_without_content_length(server: Server) -> None:
    fetch = fetcher(allow(server), max_bytes=5_000)
    err = await expect(fetch, f"{server.base}/big.png", "url_too_large")
    assert http_status(err) == 413
    await expect(fetch, f"{server.base}/chunked-big", "url_too_large")


async def test_html_is_not_an_image(server: Server) -> None:
    fetch = fetcher(allow(server))
    await expect(fetch, f"{server.base}/page.html", "not_an_image")
    await expect(fetch, f"{server.base}/octet.html", "not_an_image")


async def test_generic_types_are_sniffed(server: Server) -> None:
    fetch = fetcher(allow(server))
    assert (await fetch.fetch(f"{server.base}/octet.png")).content_type == "image/png"
    assert (await fetch.fetch(f"{server.base}/image-with-params")).content_type == "image/png"


async def test_non_images_pass_when_not_asked_for_an_image(server: Server) -> None:
    result = await fetcher(allow(server)).fetch(f"{server.base}/page.html", accept_image=False)
    assert result.content_type == "text/html"


async def test_http_status_errors_and_retryability(server: Server) -> None:
    fetch = fetcher(allow(server))
    missing = await expect(fetch, f"{server.base}/missing", "http_status", retryable=False)
    assert missing.details == {"status": 404}
    await expect(fetch, f"{server.base}/busy", "http_status", retryable=True)
    await expect(fetch, f"{server.base}/limited", "http_status", retryable=True)


async def test_total_time_limit_is_retryable(server: Server) -> None:
    try:
        await expect(
            fetcher(allow(server), timeout_s=0.2),
            f"{server.base}/slow",
            "url_timeout",
            retryable=True,
        )
    finally:
        server.release.set()


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetch = fetcher({f"127.0.0.1:{port}"})
    await expect(fetch, f"http://127.0.0.1:{port}/a.png", "url_unreachable", retryable=True)


# -- content encodings: the bytes counted are the bytes received ---------------------------------


async def test_a_gzip_bomb_is_refused_before_its_body_is_read(server: Server) -> None:
    assert len(BOMB) < 50_000
    fetch = fetcher(allow(server), max_bytes=100_000)
    err = await expect(fetch, f"{server.base}/gzip-bomb", "unsupported_encoding")
    assert err.details == {"content_encoding": "gzip"}
    assert http_status(err) == 422
    assert server.seen[-1]["accept-encoding"] == "identity"


async def test_an_encoded_body_is_refused_even_when_it_would_fit(server: Server) -> None:
    """A gzip'ed image that would decode within the limit is still refused: the limit is on the
    bytes received, and only bodies sent as they are can be counted that way."""
    await expect(fetcher(allow(server)), f"{server.base}/gzip-image", "unsupported_encoding")


async def test_identity_is_the_one_accepted_encoding(server: Server) -> None:
    result = await fetcher(allow(server)).fetch(f"{server.base}/identity.png")
    assert result.data == PNG


class _Body(httpx.AsyncByteStream):
    """A response body that records whether anyone started reading it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        yield self.data


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(PNG, mtime=0)),
        ("x-gzip", gzip.compress(PNG, mtime=0)),
        ("deflate", zlib.compress(PNG)),
        ("br", b"\x0b\x02\x80hello\x03"),
        ("zstd", b"\x28\xb5\x2f\xfd\x00\x58\x29\x00\x00hello"),
        ("compress", b"\x1f\x9d\x90hello"),
        ("gzip, gzip", gzip.compress(gzip.compress(PNG, mtime=0), mtime=0)),
        ("identity, gzip", gzip.compress(PNG, mtime=0)),
        ("GZIP", gzip.compress(PNG, mtime=0)),
    ],
    ids=lambda value: value if isinstance(value, str) else "body",
)
async def test_every_content_encoding_but_identity_is_refused_unread(
    encoding: str, body: bytes
) -> None:
    streams: list[_Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        streams.append(_Body(body))
        headers = {"Content-Type": "image/png", "Content-Encoding": encoding}
        return httpx.Response(200, headers=headers, stream=streams[-1])

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    resolver = fake_resolver({"images.example": [PUBLIC_IP]})
    fetch = SafeFetcher(http, max_bytes=10_000, timeout_s=5, resolver=resolver)
    await expect(fetch, "https://images.example/a.png", "unsupported_encoding")
    assert streams and not streams[0].read


# -- the memory budget ---------------------------------------------------------------------------


async def until(condition: object, what: str) -> None:
    """Wait for ``condition()`` (a bound against hangs, not a measurement)."""
    for _ in range(1000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_a_body_holds_its_length_in_the_budget_and_a_second_waits_for_it(
    server: Server,
) -> None:
    size = len(PNG) + 20_000
    budget = MemoryBudget(30_000)
    fetch = SafeFetcher(
        None, allow_hosts=allow(server), max_bytes=100_000, timeout_s=10, budget=budget
    )
    server.body_release.clear()
    try:
        first = asyncio.get_running_loop().create_task(fetch.fetch(f"{server.base}/stalled-body"))
        await until(lambda: budget.held == size, "the first body's bytes are held")
        second = asyncio.get_running_loop().create_task(fetch.fetch(f"{server.base}/big.png"))
        await until(lambda: budget.waiting == 1, "the second fetch waits for memory")
        assert not second.done()
        server.body_release.set()
        assert (await first).data == PNG + b"\0" * 20_000
        assert len((await second).data) == size
        assert (budget.held, budget.waiting) == (0, 0)
    finally:
        server.body_release.set()
        await fetch.aclose()


async def test_a_body_without_a_length_holds_max_bytes(server: Server) -> None:
    """No Content-Length: all of ``max_bytes`` is reserved — over the whole budget, refused."""
    fetch = SafeFetcher(
        None,
        allow_hosts=allow(server),
        max_bytes=100_000,
        timeout_s=10,
        budget=MemoryBudget(50_000),
    )
    with pytest.raises(OverBudget):
        await fetch.fetch(f"{server.base}/chunked-big")
    assert len((await fetch.fetch(f"{server.base}/image.png")).data) == len(PNG)
    await fetch.aclose()


async def test_a_destination_whose_dns_never_answers_is_given_up_on() -> None:
    """``check_destination`` (webhook registration) resolves on the request path: a hostile
    name whose DNS hangs is refused after the fetcher's time limit, not waited on."""
    hung = asyncio.Event()

    async def never(host: str, port: int) -> list[str]:
        await hung.wait()
        return [PUBLIC_IP]

    fetch = SafeFetcher(never_called_client(), max_bytes=1000, timeout_s=0.05, resolver=never)
    with pytest.raises(FetchError) as caught:
        await fetch.check_destination("https://slow.example/hook")
    assert caught.value.code == "url_timeout"
    assert not hung.is_set()


async def test_a_hanging_user_lookup_holds_only_its_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo cannot be cancelled: a name whose DNS never answers keeps its thread. Names
    users choose are looked up on threads of their own, at most ``at_once`` at a time, so the
    loop's shared resolver (provider hosts, output URLs) and its executor keep working; a lookup
    whose caller gave up still holds its place until its thread ends. Proven by the order of
    the lookups' starts and ends, not by waiting."""
    release = {f"hang{i}.example": threading.Event() for i in range(3)}
    seen: list[tuple[str, str]] = []  # ("start" | "end", host), in the order they happened
    lock = threading.Lock()
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host in release:
            with lock:
                seen.append(("start", host))
            release[host].wait(GUARD_S)
            with lock:
                seen.append(("end", host))
            raise socket.gaierror(socket.EAI_AGAIN, "no answer")
        if host == "public.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real(host, port, *args, **kwargs)

    async def until(condition: Any) -> None:
        async with asyncio.timeout(GUARD_S):
            while not condition():
                await asyncio.sleep(0.01)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    resolve = isolated_resolver(2)
    try:
        hung = [asyncio.ensure_future(resolve(host, 443)) for host in release]
        await until(lambda: len(seen) >= 2)
        # two threads hang; the shared resolver and the default executor are untouched by them
        assert await system_resolver("public.example", 443) == ["93.184.216.34"]
        assert await asyncio.to_thread(lambda: 42) == 42
        hung[0].cancel()  # its caller gives up: its thread, and its place, stay
        release["hang1.example"].set()  # one lookup ends: now the third may start
        await until(lambda: ("start", "hang2.example") in seen)
    finally:
        for event in release.values():
            event.set()
    async with asyncio.timeout(GUARD_S):
        results = await asyncio.gather(*hung, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, socket.gaierror) for r in results[1:])
    starts = [host for kind, host in seen if kind == "start"]
    assert sorted(starts[:2]) == ["hang0.example", "hang1.example"]
    # the third started only after a lookup ended: the cancelled caller freed no place
    assert seen.index(("start", "hang2.example")) > seen.index(("end", "hang1.example"))
    assert ("end", "hang0.example") not in seen[: seen.index(("start", "hang2.example"))]
    assert await resolve("public.example", 443) == ["93.184.216.34"]  # the places came back


# -- real TLS: the pinned connection checks the certificate against the name ----------------------


@asynccontextmanager
async def tls_peer(ca: trustme.CA, name: str, seen: list[str]) -> AsyncIterator[int]:
    """An HTTPS server on 127.0.0.1 whose certificate is for ``name``; records each request's
    ``Host`` header; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            seen.extend(
                v.split(":", 1)[1].strip()
                for v in head.split("\r\n")
                if v.lower().startswith("host:")
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
                % len(PNG)
                + PNG
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("certified", ["images.example", "other.example"])
async def test_a_pinned_https_fetch_checks_the_certificate_against_the_name(certified: str) -> None:
    """hookline's own client (``OutboundClient.exchange``) connects to the checked address and
    sends the name as Host and SNI: a certificate for that name is accepted, one for another
    name is refused, although both servers are the same address."""
    ca = trustme.CA()
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    seen: list[str] = []
    async with tls_peer(ca, certified, seen) as port, new_client(timeout=5, verify=trusted) as http:
        host = f"images.example:{port}"
        fetch = SafeFetcher(
            http,
            allow_hosts={host},
            max_bytes=10_000,
            timeout_s=5,
            resolver=fake_resolver({"images.example": ["127.0.0.1"]}),
        )
        if certified == "images.example":
            result = await fetch.fetch(f"https://{host}/a.png")
            assert (result.data, seen) == (PNG, [host])
        else:
            error = await expect(fetch, f"https://{host}/a.png", "url_unreachable", retryable=True)
            assert "certificate" in error.message.lower() and seen == []
