"""A per-key token bucket, per process."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from service.http.errors import RateLimited

MAX_KEYS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """``rate_per_s`` requests a second per key with bursts up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, key: str, now: float) -> None:
        """Take one token for ``key`` or raise ``RateLimited`` with the wait in seconds."""
        if self.rate <= 0:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.rate
            raise RateLimited("too many requests for this API key", retry_after_s=wait)
        bucket.tokens -= 1.0
