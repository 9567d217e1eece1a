"""hookline's outbound HTTP client: every provider call, fetch and webhook delivery goes out
through ``new_client``'s ``OutboundClient``, httpx's interface on aiohttp's client.

- **Errors.** Every failure of a peer is the ``httpx.TransportError`` httpcore raised for it
  (``_translated``), its message free of the request's headers.
- **The hot exchanges skip httpx.** A task's submit (callbacks/http.py ``request_answer``) and
  its output's fetch (service/media/fetch.py) go by ``OutboundClient.exchange``: the same
  request on the same aiohttp session without httpx's client and models in between, which cost
  about three times aiohttp's own CPU per request (270–310 against 85–110 µs, bench/RESULTS.md).
  The answer reads as an httpx one does: its headers joined as httpx joins them (a header sent
  on two lines is one value, ``a, b``), its body raw, each read within the read timeout.
- **No cookies**, and one ``User-Agent`` (``hookline``) either way.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final, Protocol

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

USER_AGENT: Final = "hookline"

DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)
READ_CHUNK_BYTES: Final = 256 * 1024  # the most one read of a body hands up (``_Transport``)


class _Transport(AiohttpTransport):
    """httpx's interface on aiohttp's client (``httpx-aiohttp``): the same requests, responses
    and errors for the code above it, at a quarter of httpcore's CPU per request (about 0.35
    against 1.2 ms here, bench/RESULTS.md).

    Every aiohttp error, from the request or from the body's stream, leaves as the
    ``httpx.TransportError`` httpcore raised for the same failure (``_translated``): the
    library's own mapping misses some (a malformed answer came out as a bare aiohttp error no
    caller catches) and files others under the wrong kind (a refused connection or a peer that
    hung up as a connect timeout). Messages never carry the request's headers, and the aiohttp
    error is not chained (``from None``): its repr holds the request's headers, an API key among
    them; the message names its type instead.

    A closed response lets go of its stream: httpx wraps the stream in one that holds the
    response (``BoundAsyncStream``), a reference cycle that kept each exchange's 40-odd objects
    (both libraries' requests, responses, headers and buffers, about 2 KB) until the cyclic GC
    ran, often only after they had aged into its oldest generation: megabytes of garbage in
    flight under load, and the collector's time to find it.

    A body is read in pieces of whatever has arrived, up to ``READ_CHUNK_BYTES`` each, not
    httpx-aiohttp's 16 KiB: a 169 KB output took 11 passes through both libraries' stream
    layers and this module's timeout, 180 µs of the fetch's 950 (bench/RESULTS.md)."""

    def get_client(self) -> aiohttp.ClientSession:
        """httpx-aiohttp's session for these limits, with a jar that keeps no cookies (see
        ``new_client``)."""
        limit = self.limits.max_connections
        connector = aiohttp.TCPConnector(
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
            limit=100 if limit is None else limit,  # aiohttp's own default, as httpx-aiohttp
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise _translated(exc, request) from None
        if isinstance(response.stream, AiohttpResponseStream):
            response.stream.CHUNK_SIZE = READ_CHUNK_BYTES
        response.stream = _TranslatedStream(response.stream, request, weakref.ref(response))
        return response


class _TranslatedStream(httpx.AsyncByteStream):
    """A response body whose aiohttp errors leave as httpx's (a body cut off, a bad chunk), each
    chunk within the request's read timeout: aiohttp's compiled parser, given a malformed chunk
    size in a packet after the head, neither fails nor keeps its own read timer (the read
    waited forever, the server gone or not)."""

    def __init__(
        self,
        inner: httpx.AsyncByteStream | httpx.SyncByteStream,
        request: httpx.Request,
        owner: weakref.ref[httpx.Response],
    ):
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner
        self._request = request
        self._owner = owner
        timeouts = request.extensions.get("timeout") or {}
        self._read_s: float | None = timeouts.get("read")

    def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._inner)

        async def next_piece() -> bytes:
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                return b""

        return _timed_pieces(next_piece, self._read_s, lambda: self._request)

    async def aclose(self) -> None:
        response = self._owner()
        if response is not None:  # closed: never read again (httpx raises StreamClosed first)
            response.stream = _CLOSED
        try:
            await self._inner.aclose()
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise _translated(exc, self._request) from None


_CLOSED: Final = httpx.ByteStream(b"")  # the stream of a closed response (``_Transport``)


async def _timed_pieces(
    next_piece: Callable[[], Awaitable[bytes]],
    read_s: float | None,
    request: Callable[[], httpx.Request | None],
) -> AsyncIterator[bytes]:
    """A body's pieces from ``next_piece`` until an empty one, each within ``read_s`` (see
    ``_TranslatedStream``), every aiohttp error leaving as httpx's; ``request`` names the
    request in an error (made only then)."""
    try:
        while True:
            try:
                async with asyncio.timeout(read_s):
                    piece = await next_piece()
            except TimeoutError:
                raise httpx.ReadTimeout(
                    "no data within the read timeout (a stalled body)", request=request()
                ) from None
            if not piece:
                return
            yield piece
    except (httpx.HTTPError, aiohttp.ClientError) as exc:
        raise _translated(exc, request()) from None


def _cause(exc: BaseException) -> BaseException:
    """The aiohttp error behind ``exc`` (httpx-aiohttp raises its mapped errors from it)."""
    cause = exc.__cause__
    return cause if isinstance(exc, httpx.HTTPError) and cause is not None else exc


def _translated(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError:
    """The httpx error httpcore would have raised for the aiohttp error behind ``exc``."""
    cause = _cause(exc)
    kind: type[httpx.TransportError]
    if isinstance(cause, aiohttp.SocketTimeoutError):
        kind, text = httpx.ReadTimeout, "no data within the read timeout"
    elif isinstance(cause, aiohttp.ServerTimeoutError):  # connecting, or waiting for the pool
        kind, text = httpx.ConnectTimeout, "no connection within the connect timeout"
    elif isinstance(cause, aiohttp.ClientConnectorError):  # refused, unresolvable, bad TLS
        kind, text = httpx.ConnectError, f"cannot connect: {cause}"
    elif isinstance(cause, aiohttp.ServerDisconnectedError):
        kind, text = httpx.RemoteProtocolError, "the server disconnected without an answer"
    elif isinstance(cause, aiohttp.ClientPayloadError):
        kind, text = httpx.ReadError, "the answer's body was cut off or malformed"
    elif isinstance(cause, aiohttp.ClientOSError):
        kind, text = httpx.ReadError, f"the connection failed: {cause.strerror or cause}"
    elif isinstance(cause, aiohttp.ClientResponseError):  # a malformed status line or header
        kind, text = httpx.RemoteProtocolError, "the answer is not valid HTTP"
    elif isinstance(cause, aiohttp.InvalidURL):
        kind, text = httpx.UnsupportedProtocol, "the URL cannot be requested"
    elif isinstance(exc, httpx.TransportError) and not isinstance(cause, aiohttp.ClientError):
        return exc  # an httpx error of httpx's own
    else:
        kind, text = httpx.RemoteProtocolError, "the HTTP exchange failed"
    return kind(f"{text} ({type(cause).__name__})", request=request)


def new_client(
    *,
    timeout: httpx.Timeout | float,
    limits: httpx.Limits = DEFAULT_LIMITS,
    verify: ssl.SSLContext | bool = True,
) -> OutboundClient:
    """The client for hookline's own outbound requests (providers, fetches, webhooks): no
    redirect followed, no proxy or ``.netrc`` from the environment, no cookies, aiohttp
    underneath. Its aiohttp session is made on the first request, on the loop that sends it.

    No cookies: neither library's jar keeps what an answer sets, so nothing is sent back. One
    client fetches every user's URLs: a jar would hand a cookie one user's host set to the
    next task fetching from it, and no provider API needs one. Both jars also cost CPU on
    every answer (httpx's built a ``urllib`` request and response for each: 4 % of the loop
    thread's time under cProfile, bench/RESULTS.md).

    ``verify``: the TLS context servers are checked with (default: the system's CAs, through
    httpx's ``create_ssl_context``)."""
    return OutboundClient(timeout=timeout, limits=limits, verify=verify)


class Answer(Protocol):
    """What the fetcher reads of an answer: an ``httpx.Response`` (any httpx client) or a
    ``DirectAnswer`` (``OutboundClient.exchange``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class OutboundClient(httpx.AsyncClient):
    """``new_client``'s client: httpx's interface on aiohttp, and ``exchange``, the same request
    sent on the same aiohttp session without httpx's layers in between.

    The two requests every task makes (its submit, ``request_answer``, and its output's fetch,
    service/media/fetch.py) go through ``exchange``: httpx's client and models cost about
    three times aiohttp's own CPU per request (270–310 against 85–110 µs, bench/RESULTS.md).
    What a caller sees is the same either way: the answer's status, headers and raw body, and
    every failure as the ``httpx.TransportError`` ``_Transport`` raises for it, its message
    free of the request's headers."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout | float,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._direct = _Transport(limits=limits, trust_env=False, verify=verify)
        super().__init__(
            transport=self._direct,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            limits=limits,
            headers={"User-Agent": USER_AGENT},
        )
        self._cookies = _NoCookies()  # httpx's setter would copy it into a plain jar

    @property
    def max_connections(self) -> int | None:
        """The most connections the pool opens at once (None: aiohttp's default)."""
        return self._direct.limits.max_connections

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeouts: httpx.Timeout | None = None,
        sni_hostname: str | None = None,
        decode: bool = False,
    ) -> DirectAnswer:
        """Send one request (no redirect followed) and return its answer, the body unread:
        read it with ``aiter_raw`` (each read within the read timeout), then ``aclose`` it.
        ``decode``: a compressed body is decompressed (a provider's JSON), else it is handed
        up as it came (the fetcher asks for and checks identity)."""
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        limit = timeouts or self.timeout
        if not isinstance(self._direct.client, aiohttp.ClientSession):
            self._direct.client = self._direct.get_client()
        try:
            response = await self._direct.client.request(
                method,
                url,
                headers=_with_user_agent(headers),
                data=content,
                allow_redirects=False,
                auto_decompress=decode,
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=limit.connect, sock_read=limit.read, connect=limit.pool
                ),
                server_hostname=sni_hostname,
            )
        except aiohttp.ClientError as exc:
            raise _translated(exc, _request(method, url)) from None
        return DirectAnswer(response, method, url, limit.read)


class DirectAnswer:
    """An answer of ``OutboundClient.exchange`` (see ``Answer``)."""

    __slots__ = ("_method", "_read_s", "_response", "_url", "headers", "status_code")

    def __init__(
        self, response: aiohttp.ClientResponse, method: str, url: str, read_s: float | None
    ) -> None:
        self._response = response
        self._method = method
        self._url = url
        self._read_s = read_s
        self.status_code: int = response.status
        # httpx's: a name given on several lines reads as one value, joined with ", " (the
        # fetcher refuses a stacked Content-Encoding; aiohttp's .get gives the first line only)
        self.headers: Mapping[str, str] = httpx.Headers(response.raw_headers)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body in pieces of whatever has arrived, up to ``READ_CHUNK_BYTES`` each, each
        within the read timeout."""
        body = self._response.content
        return _timed_pieces(lambda: body.read(READ_CHUNK_BYTES), self._read_s, self._request)

    async def aread(self) -> bytes:
        """The whole body (``aiter_raw``'s pieces joined)."""
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read to
        its end, else it is closed."""
        try:
            await self._response.__aexit__(None, None, None)
        except aiohttp.ClientError as exc:
            raise _translated(exc, self._request()) from None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._response.raw_headers)

    def _request(self) -> httpx.Request | None:
        return _request(self._method, self._url)


def _with_user_agent(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` with hookline's ``User-Agent`` unless they name one (in any case)."""
    if any(name.lower() == "user-agent" for name in headers):
        return headers
    return {"User-Agent": USER_AGENT, **headers}


def _request(method: str, url: str) -> httpx.Request | None:
    """The request an error names (None: a URL httpx cannot parse, which aiohttp refused)."""
    try:
        return httpx.Request(method, url)
    except httpx.InvalidURL:
        return None


class _NoCookies(httpx.Cookies):
    """An httpx cookie jar that keeps nothing an answer sets (``new_client``)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        raise TypeError("hookline's outbound clients keep no cookies")
