"""Limits on how much one caller may ask of a process, per process:

- ``RateLimiter``: a token bucket per key — requests per API key (``rate_limit_per_s``, or the
  user's own limits), failed authentications per client address (``auth_failure_rate_per_s``,
  ``client_address``);
- ``Slots``: at most N at once per key — concurrent uploads per user (``upload_decodes_per_user``).

Both keep a bounded table and raise ``RateLimited`` (429 with ``Retry-After``) when a key is over
its limit.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from service.http.errors import RateLimited

MAX_KEYS = 100_000
IPV6_PREFIX = 64  # one IPv6 client usually holds a whole /64: it counts as one address


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """``rate_per_s`` requests a second per key with bursts up to ``burst`` (``rate_per_s`` 0:
    no limit); a call may give its key's own rate and burst instead. The ``max_keys`` least
    recently seen keys are remembered (a forgotten key starts again with a full bucket)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = MAX_KEYS,
        message: str = "too many requests for this API key",
        code: str | None = None,
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self.message = message
        self.code = code
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(
        self, key: str, now: float, *, rate_per_s: float | None = None, burst: int | None = None
    ) -> None:
        """Take one token for ``key`` or raise ``RateLimited`` with the wait in seconds."""
        wait = self.take(key, now, rate_per_s=rate_per_s, burst=burst)
        if wait > 0:
            raise RateLimited(self.message, retry_after_s=wait, code=self.code)

    def take(
        self, key: str, now: float, *, rate_per_s: float | None = None, burst: int | None = None
    ) -> float:
        """Take one token for ``key``: 0.0 if there was one, else the seconds until there is.
        ``rate_per_s`` and ``burst``, when given, replace the limiter's own for this key (a
        bucket left fuller by a larger burst is cut down to the new one)."""
        rate = self.rate if rate_per_s is None else rate_per_s
        capacity = self.burst if burst is None else float(burst)
        if rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(capacity, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) / rate
        bucket.tokens -= 1.0
        return 0.0

    def __len__(self) -> int:
        return len(self._buckets)


class Slots:
    """At most ``per_key`` holders at once per key; one more raises ``RateLimited`` (asking to
    come back after ``retry_after_s``). Only keys holding a slot are in the table."""

    def __init__(self, per_key: int, *, message: str, code: str, retry_after_s: float = 1.0):
        if per_key < 1:
            raise ValueError("per_key must be at least 1")
        self.per_key = per_key
        self.message = message
        self.code = code
        self.retry_after_s = retry_after_s
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, key: str) -> Iterator[None]:
        held = self._held.get(key, 0)
        if held >= self.per_key:
            raise RateLimited(self.message, retry_after_s=self.retry_after_s, code=self.code)
        self._held[key] = held + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

    def held(self, key: str) -> int:
        return self._held.get(key, 0)


def client_address(host: str | None) -> str:
    """The key failed authentications are counted under: the ASGI client address (behind a
    proxy, the proxy's — unless the server is told to trust its ``X-Forwarded-For``), an IPv6
    address as its /64."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # a unix socket path or a name: one client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)
