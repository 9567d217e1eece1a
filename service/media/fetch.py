"""Fetching user- or provider-supplied URLs without becoming an SSRF proxy.

Rules, checked for the first URL and again for every redirect hop (at most ``max_redirects``):

- ``https`` only, unless the host (``host`` or ``host:port``) is in ``allow_hosts``;
- no credentials in the URL;
- the host is resolved once (``resolver``, default ``loop.getaddrinfo``; ``isolated_resolver`` for
  names users choose) and every address must be public: loopback, private, link-local, multicast,
  reserved, unspecified, CGNAT (100.64/10), cloud metadata, and IPv6 forms embedding such an IPv4
  (mapped, 6to4, Teredo, NAT64) are refused — unless the host is in ``allow_hosts``, which trusts
  it whatever it resolves to.

**DNS rebinding.** The request is sent to the address that was checked, not to the name: the URL's
host is replaced by that IP, the ``Host`` header carries the original name, and for https the
original name is aiohttp's ``server_hostname`` (callbacks/transport.py
``OutboundClient.exchange``; the ``sni_hostname`` request extension on any other httpx client),
sent as SNI *and* the name the certificate is verified against. A second resolution, which an
attacker's DNS could answer differently, never happens. (Connections are pooled per IP and, for
https, per name: a pooled TLS connection is reused only for the name its certificate was verified
for.)

**Bytes are counted as they arrive.** The body must be sent as it is: ``identity`` is asked for,
and a response with any other ``Content-Encoding`` (gzip, deflate, br, zstd, stacked ones…) is
refused before its body is read — a few hundred compressed bytes can expand to gigabytes, past any
limit counted after decoding. The body is read raw (``aiter_raw``: never content-decoded), with a
byte limit, and the whole fetch, redirects included, has a time limit.

**Memory.** With a ``budget`` (service/media/budget.py, shared by the process's fetches and
decodes) the body's bytes are reserved before it is read — its ``Content-Length``, or
``max_bytes`` when it has none — and held while it is read; the caller accounts for the returned
bytes from then on (it decodes them under the same budget). Without one, fetches are unbounded
in number, as before.

Errors are ``FetchError`` with a ``code`` and ``retryable`` (5xx, 429, timeouts, connection errors
may succeed later; forbidden hosts, 4xx, encoded or oversized bodies and non-images will not);
``OverBudget`` (service/media/errors.py) when ``max_bytes`` exceeds the whole budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from callbacks.transport import Answer, OutboundClient, new_client
from service.media.budget import MemoryBudget
from service.media.images import sniff_content_type
from statemachine.errors import BadRequest

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack…
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_IDENTITY = frozenset({"", "identity"})


class FetchError(BadRequest):
    """A URL that could not (or may not) be fetched. ``code``: ``url_invalid``, ``url_forbidden``,
    ``url_unreachable``, ``url_timeout``, ``url_too_large``, ``unsupported_encoding``,
    ``too_many_redirects``, ``http_status``, ``not_an_image``. ``retryable``: may the same fetch
    succeed later."""

    code = "url_unreachable"

    def __init__(
        self, message: str, *, code: str, retryable: bool = False, details: Any = None
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class FetchResult:
    data: bytes
    content_type: str
    final_url: str


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the system's preferred order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _addresses_of(infos)


def _addresses_of(infos: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def isolated_resolver(at_once: int) -> Resolver:
    """A resolver for names a user chose (input URLs, webhook destinations): each lookup on a
    daemon thread of its own, at most ``at_once`` at a time, the rest waiting their turn.

    ``getaddrinfo`` cannot be cancelled: a lookup a hostile name's DNS never answers holds its
    thread until the system resolver gives up, whatever the caller's timeout. On the loop's
    shared resolver threads (libuv's four under uvloop, the default executor otherwise) a few
    such names would stall every lookup and every thread hand-off of the process: provider
    hosts, output URLs, blob and image work. Here they hold only their own threads, and a
    daemon thread left hanging does not hold up the process's exit either."""
    gate = asyncio.Semaphore(at_once)  # taken per lookup, given back when its thread ends

    async def resolve(host: str, port: int) -> list[str]:
        await gate.acquire()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[Any]] = loop.create_future()

        def finish(infos: list[Any] | None, error: BaseException | None) -> None:
            gate.release()  # only now: a caller that gave up early does not free the place
            if answer.done():
                return  # the caller gave up (its timeout) before the resolver answered
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(infos or [])

        def lookup() -> None:
            infos: list[Any] | None = None
            error: BaseException | None = None
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except BaseException as exc:  # handed to the caller, whatever it is
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(finish, infos, error)

        try:
            threading.Thread(target=lookup, name="hookline-dns", daemon=True).start()
        except BaseException:
            gate.release()
            raise
        return _addresses_of(await answer)

    return resolve


def is_public_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address that is not a metadata endpoint."""
    if ip in METADATA_ADDRESSES:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    if ip.version == 4 and ip in _CGNAT:
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None


def _ascii_host(url: httpx.URL) -> str:
    """The host as sent on the wire: IDNA-encoded, lower case (IPv6 without brackets)."""
    return url.raw_host.decode("ascii").lower()


def _normalise_hosts(hosts: Iterable[str]) -> frozenset[str]:
    return frozenset(h.strip().lower().rstrip(".") for h in hosts if h.strip())


class SafeFetcher:
    """Downloads images (or other bodies) from untrusted URLs; see the module docstring.

    ``http`` may be a shared client (its redirect setting is overridden per request); with None
    the fetcher makes its own, which ``aclose`` closes. ``allow_hosts`` entries are ``host`` (any
    port) or ``host:port`` (``[v6]:port`` for IPv6 literals). ``budget``: the process's media
    memory budget (None: unbounded).
    """

    def __init__(
        self,
        http: httpx.AsyncClient | None,
        *,
        allow_hosts: Iterable[str] = (),
        max_bytes: int,
        timeout_s: float,
        resolver: Resolver = system_resolver,
        max_redirects: int = 5,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._owns_client = http is None
        self._http = http or new_client(timeout=timeout_s)
        self.allow_hosts = _normalise_hosts(allow_hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._resolve = resolver
        self.max_redirects = max_redirects
        self.budget = budget

    async def aclose(self) -> None:
        if self._owns_client:
            await self._http.aclose()

    async def fetch(
        self, url: str, *, headers: Mapping[str, str] | None = None, accept_image: bool = True
    ) -> FetchResult:
        """GET ``url`` under the rules above; ``headers`` (e.g. a provider's Authorization) are
        sent to the first origin only, never across a redirect to another origin."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, dict(headers or {}), accept_image)
        except TimeoutError:
            raise FetchError(
                f"fetching the URL took over {self.timeout_s:g} s",
                code="url_timeout",
                retryable=True,
            ) from None

    async def check_destination(self, url: str) -> None:
        """Raise ``FetchError`` unless ``url`` may be sent to under the rules above (resolved
        now: a destination registered for later is checked again when it is used), within
        ``timeout_s``: a name whose DNS never answers does not hold the request."""
        parsed = self._parse(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._addresses(parsed)
        except TimeoutError:
            raise FetchError(
                f"resolving {parsed.host} took over {self.timeout_s:g} s",
                code="url_timeout",
                retryable=True,
            ) from None

    async def post(
        self, url: str, content: bytes, headers: Mapping[str, str], *, max_answer_bytes: int
    ) -> int:
        """POST ``content`` to ``url`` under the same rules (pinned to the checked address, no
        redirect followed: a 3xx is the answer) within ``timeout_s``; return the status code.
        At most ``max_answer_bytes`` of the answer are kept, and then dropped (the transport
        hands it up in reads of what has arrived, up to ``callbacks.transport.READ_CHUNK_BYTES``
        each: one read may hold that much more for a moment)."""
        parsed = self._parse(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._send(parsed, dict(headers), method="POST", content=content)
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= max_answer_bytes:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            raise FetchError(
                f"no answer within {self.timeout_s:g} s", code="url_timeout", retryable=True
            ) from None
        except httpx.TransportError as exc:  # the answer's body broke off: the status stands
            raise FetchError(
                f"{parsed.host} failed: {exc}", code="url_unreachable", retryable=True
            ) from exc
        return response.status_code

    async def _fetch(self, url: str, headers: dict[str, str], accept_image: bool) -> FetchResult:
        current = self._parse(url)
        for _ in range(self.max_redirects + 1):
            response = await self._send(current, headers)
            try:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    target = self._parse(str(current.join(response.headers["location"])))
                    if (target.scheme, target.host, target.port) != (
                        current.scheme,
                        current.host,
                        current.port,
                    ):
                        headers = {}
                    current = target
                    continue
                self._check_status(response)
                self._check_encoding(response)
                content_type = self._check_type(response, accept_image)
                data = await self._read(response)
            finally:
                await response.aclose()
            if accept_image and content_type in _GENERIC_TYPES:
                sniffed = sniff_content_type(data)
                if sniffed is None:
                    raise FetchError("the URL did not return an image", code="not_an_image")
                content_type = sniffed
            return FetchResult(data=data, content_type=content_type, final_url=str(current))
        raise FetchError(
            f"more than {self.max_redirects} redirects", code="too_many_redirects", retryable=False
        )

    # -- checks ----------------------------------------------------------------------------------

    def _parse(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
            host = parsed.host  # decodes an IDNA name: a bad one raises here
        except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
            raise FetchError(f"invalid URL: {exc}", code="url_invalid") from exc
        if parsed.scheme not in ("http", "https") or not host:
            raise FetchError("only http(s) URLs with a host can be fetched", code="url_invalid")
        if parsed.userinfo:
            raise FetchError("URLs with credentials are refused", code="url_forbidden")
        if parsed.scheme == "http" and not self._allowed(parsed):
            raise FetchError("only https URLs can be fetched from this host", code="url_forbidden")
        return parsed

    def reachable_by_anyone(self, url: str) -> bool:
        """Whether ``url`` is an https URL on a host not in ``allow_hosts`` (those may be private
        or loopback, out of a provider's reach): a fetch of it checked that every address the
        host resolves to is public."""
        try:
            parsed = httpx.URL(url)
            literal = _parse_ip(_ascii_host(parsed))
        except (httpx.InvalidURL, UnicodeError):
            return False
        if literal is not None and not is_public_address(literal):
            return False
        return parsed.scheme == "https" and bool(parsed.host) and not self._allowed(parsed)

    def _allowed(self, url: httpx.URL) -> bool:
        host = _ascii_host(url).rstrip(".")
        port = url.port or (443 if url.scheme == "https" else 80)
        shown = f"[{host}]" if ":" in host else host
        return bool({host, shown, f"{shown}:{port}"} & self.allow_hosts)

    async def _addresses(self, url: httpx.URL) -> list[str]:
        """The checked addresses to connect to, in order."""
        allowed = self._allowed(url)
        host = _ascii_host(url)
        literal = _parse_ip(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                candidates = await self._resolve(host, port)
            except UnicodeError as exc:  # an empty or oversized label, a bad IDNA name
                raise FetchError(f"invalid host {url.host!r}: {exc}", code="url_invalid") from exc
            except OSError as exc:
                transient = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
                raise FetchError(
                    f"cannot resolve {url.host}: {exc}", code="url_unreachable", retryable=transient
                ) from exc
            if not candidates:
                raise FetchError(f"{url.host} has no address", code="url_unreachable")
        if not allowed:
            for text in candidates:
                ip = _parse_ip(text)
                if ip is None or not is_public_address(ip):
                    raise FetchError(
                        f"{url.host} resolves to a non-public address",
                        code="url_forbidden",
                        details={"host": url.host},
                    )
        return candidates

    async def _send(
        self,
        url: httpx.URL,
        headers: dict[str, str],
        *,
        method: str = "GET",
        content: bytes | None = None,
    ) -> Answer:
        """Send a request to ``url`` pinned to each checked address in turn until one connects
        (by ``OutboundClient.exchange`` on ``new_client``'s client, else by httpx)."""
        last: httpx.TransportError | None = None
        for address in await self._addresses(url):
            try:
                return await self._pinned(url, address, headers, method=method, content=content)
            except httpx.ConnectError as exc:
                last = exc  # try the next address (e.g. ::1 refused, 127.0.0.1 listening)
            except httpx.TimeoutException as exc:
                raise FetchError(
                    f"{url.host} timed out", code="url_timeout", retryable=True
                ) from exc
            except httpx.TransportError as exc:
                raise FetchError(
                    f"{url.host} failed: {exc}", code="url_unreachable", retryable=True
                ) from exc
        raise FetchError(
            f"cannot connect to {url.host}: {last}", code="url_unreachable", retryable=True
        ) from last

    async def _pinned(
        self,
        url: httpx.URL,
        address: str,
        headers: dict[str, str],
        *,
        method: str = "GET",
        content: bytes | None = None,
    ) -> Answer:
        """``url`` sent to ``address``, with the name it was written with as its ``Host`` and
        (https) as the name its certificate must carry."""
        host_header = url.netloc.decode("ascii")  # the name (and a non-default port) as written
        pinned = url.copy_with(host=address)
        sni = _ascii_host(url) if url.scheme == "https" else None
        # identity: a compressed body could expand past max_bytes inside a single decoded chunk
        request_headers = {"Accept-Encoding": "identity", **headers, "Host": host_header}
        if isinstance(self._http, OutboundClient):
            return await self._http.exchange(
                method, str(pinned), headers=request_headers, content=content, sni_hostname=sni
            )
        request = self._http.build_request(
            method,
            pinned,
            headers=request_headers,
            content=content,
            extensions={} if sni is None else {"sni_hostname": sni},
        )
        return await self._http.send(request, stream=True, follow_redirects=False)

    @staticmethod
    def _check_status(response: Answer) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in (408, 425, 429)
        raise FetchError(
            f"the URL answered HTTP {status}",
            code="http_status",
            retryable=retryable,
            details={"status": status},
        )

    @staticmethod
    def _check_encoding(response: Answer) -> None:
        """Only a body sent as it is: its bytes on the wire are the bytes we get."""
        header: str = response.headers.get("content-encoding", "")
        codings = [c.strip().lower() for c in header.split(",")]
        if any(c not in _IDENTITY for c in codings):
            raise FetchError(
                f"the URL answered with Content-Encoding {header.strip()!r}; only uncompressed "
                "(identity) bodies are fetched",
                code="unsupported_encoding",
                details={"content_encoding": header.strip()},
            )

    @staticmethod
    def _check_type(response: Answer, accept_image: bool) -> str:
        header: str = response.headers.get("content-type", "")
        content_type = header.split(";", 1)[0].strip().lower()
        if accept_image and not (
            content_type.startswith("image/") or content_type in _GENERIC_TYPES
        ):
            raise FetchError(
                f"the URL returned {content_type!r}, not an image",
                code="not_an_image",
                details={"content_type": content_type},
            )
        return content_type

    async def _read(self, response: Answer) -> bytes:
        too_large = FetchError(
            f"the body is over {self.max_bytes} bytes",
            code="url_too_large",
            details={"max_bytes": self.max_bytes},
        )
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        expected = int(declared) if declared.isdigit() else self.max_bytes
        if self.budget is None:
            return await self._receive(response, too_large)
        async with self.budget.hold(expected):
            return await self._receive(response, too_large)

    async def _receive(self, response: Answer, too_large: FetchError) -> bytes:
        """The body as it came over the wire (raw: never content-decoded), within max_bytes."""
        body = io.BytesIO()  # grows in place; getvalue() hands its buffer over without a copy
        try:
            async for chunk in response.aiter_raw():
                if body.tell() + len(chunk) > self.max_bytes:
                    raise too_large
                body.write(chunk)
        except httpx.StreamConsumed:
            # A response built in memory (a mock transport) has no stream left to read; it
            # was checked to carry no Content-Encoding, so its content is its raw body.
            assert isinstance(response, httpx.Response)
            if len(response.content) > self.max_bytes:
                raise too_large from None
            return response.content
        except httpx.TransportError as exc:
            raise FetchError(
                f"the body was cut off: {exc}", code="url_unreachable", retryable=True
            ) from exc
        return body.getvalue()
