"""Pacing: what each provider's quota lets this process ask of it.

Every provider publishes limits (``Provider.quota``: submits and polls per second, jobs in
flight), which an operator may override per provider (``HOOKLINE_PROVIDER_QUOTAS``). Here they
become, per provider:

- a rate for submits and one for polls, each a GCRA token bucket (the "generic cell rate"
  form: one timestamp per bucket, requests spaced ``1/rate`` apart, ``burst`` of them at once).
  ``reserve`` takes a token now or within ``max_wait`` seconds, else says how long to wait
  without taking one, so a caller can put the work back in the store (the reaper's poll, a
  submit) instead of holding it in memory; ``take`` waits for one (a trigger's poll, which runs
  in the background anyway);
- ``spaced``: a reserved token is used when its call actually leaves; with a burst of 1 no call
  leaves sooner than one interval (plus 2 %) after the one before it did, however late that
  one was (a slow claim between the token and the call), so any one-second window holds at
  most ``rate`` calls;
- ``pause``: a provider's ``429`` with ``Retry-After`` stops that kind of call until then;
- ``concurrency``: jobs in flight (ai_processing, plus processing tasks holding a slot), the
  smaller of ``HOOKLINE_PROVIDER_CONCURRENCY`` and the provider's own published limit unless an
  override sets it.

The buckets are per process: with N processes each running steps, give each ``1/N`` of the
account's quota (an override per provider) to stay within it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from callbacks.provider import Provider, Quota

Kind = Literal["submit", "poll"]
# calls of a burst-1 bucket leave at least interval × this apart (timers fire a little late)
SPACING_MARGIN = 1.02


def fair_share(slots: int, user_concurrency: int) -> int:
    """Jobs in flight one user may hold of a provider's ``slots``: ``user_concurrency``, or by
    default a quarter of them (at least 1), so one user's backlog cannot take every slot; 0 when
    the provider is unlimited."""
    if slots <= 0:
        return 0
    return user_concurrency or max(1, slots // 4)


@dataclass(slots=True)
class Bucket:
    """``rate`` calls a second, ``burst`` at once (``rate`` 0: no limit). ``tat`` is the
    theoretical arrival time of the next call, as GCRA keeps it."""

    rate: float
    burst: int = 1
    tat: float = 0.0
    last_sent: float = -math.inf  # when the last call left (``Pacing.spaced``)

    @property
    def interval(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else 0.0

    def earliest(self, now: float) -> float:
        """When the next call may be made (``now`` or later)."""
        if self.rate <= 0:
            return now
        return max(now, self.tat - (self.burst - 1) * self.interval)

    def reserve(self, now: float, max_wait: float = 0.0) -> float | None:
        """Take the next token if it is free within ``max_wait`` seconds: the wait (0.0: now), or
        None (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        at = self.earliest(now)
        if at - now > max_wait:
            return None
        self.tat = max(self.tat, at) + self.interval
        return at - now

    def pause(self, until: float) -> None:
        """No call before ``until`` (then one per interval again, no burst)."""
        if self.rate <= 0:
            self.rate, self.burst = math.inf, 1  # a paused unlimited bucket: closed until then
        self.tat = max(self.tat, until + (self.burst - 1) * self.interval)


class Pacing:
    """The buckets and in-flight caps of every provider of a process (module docstring)."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        overrides: Mapping[str, Quota] | None = None,
        concurrency: int,
        burst: int = 1,
        now: Callable[[], float],
    ) -> None:
        self.now = now
        self.default_concurrency = concurrency  # for a provider added later (tests)
        self._quotas: dict[str, Quota] = {}
        self._buckets: dict[tuple[str, Kind], Bucket] = {}
        self._concurrency: dict[str, int] = {}
        for name, provider in providers.items():
            quota = (overrides or {}).get(name) or provider.quota
            self._quotas[name] = quota
            self._buckets[(name, "submit")] = Bucket(quota.submits_per_s, burst)
            self._buckets[(name, "poll")] = Bucket(quota.polls_per_s, burst)
            own = quota.concurrency
            if overrides and name in overrides:
                self._concurrency[name] = own or concurrency
            elif own > 0:
                self._concurrency[name] = min(concurrency, own) if concurrency > 0 else own
            else:
                self._concurrency[name] = concurrency

    def quota(self, provider: str) -> Quota:
        return self._quotas.get(provider, Quota())

    def concurrency(self, provider: str) -> int:
        """Jobs in flight allowed on ``provider`` (0: no limit)."""
        return self._concurrency.get(provider, self.default_concurrency)

    def _bucket(self, provider: str, kind: Kind) -> Bucket:
        bucket = self._buckets.get((provider, kind))
        if bucket is None:
            bucket = self._buckets[(provider, kind)] = Bucket(0.0)
        return bucket

    def reserve(self, provider: str, kind: Kind, max_wait: float = 0.0) -> float | None:
        """A token within ``max_wait`` s: the wait before the call (0.0: now), or None."""
        return self._bucket(provider, kind).reserve(self.now(), max_wait)

    def wait_s(self, provider: str, kind: Kind) -> float:
        """Seconds until a token is free (nothing taken)."""
        now = self.now()
        return self._bucket(provider, kind).earliest(now) - now

    async def take(self, provider: str, kind: Kind) -> None:
        """Wait for a token and take it, then for the call's turn (``spaced``)."""
        now = self.now()
        wait = self._bucket(provider, kind).reserve(now, math.inf) or 0.0
        await self.spaced(provider, kind, now + wait)

    async def spaced(self, provider: str, kind: Kind, at: float) -> None:
        """Wait until ``at`` (a reserved token's time) and, with a burst of 1, until one
        interval (plus ``SPACING_MARGIN``) after the previous call actually left: a token
        reserved on time but used late (a slow claim in between) must not let the next call
        follow it closer than the quota allows. The call leaves on return."""
        bucket = self._bucket(provider, kind)
        target = at
        while True:
            if bucket.burst == 1 and bucket.rate > 0 and not math.isinf(bucket.rate):
                target = max(target, bucket.last_sent + bucket.interval * SPACING_MARGIN)
            delay = target - self.now()
            if delay <= 0:
                break
            await asyncio.sleep(delay)
        bucket.last_sent = self.now()

    def pause(self, provider: str, kind: Kind, seconds: float) -> None:
        """The provider said to come back in ``seconds`` (``Retry-After``)."""
        self._bucket(provider, kind).pause(self.now() + max(0.0, seconds))
