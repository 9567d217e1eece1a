"""The per-key rate limit on the real app: the defaults let one backend key send a burst of 2,000
requests, and a user's own limits (``users create --rate --burst``) apply to that user's keys
only. The app's clock (``Runtime.now``) is held still, so no token ever refills unless a test
moves it: what passes or is refused does not depend on how fast the machine is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.http.auth import KEY_CACHE_TTL_S, hash_key, new_api_key
from service.settings import Settings
from statemachine import clock
from tests.support.hookline import Hookline, running_hookline

DEFAULT_RATE = Settings.model_fields["rate_limit_per_s"].default
DEFAULT_BURST = Settings.model_fields["rate_limit_burst"].default
BURST_OF_CREATES = 2_000
CONCURRENCY = 50


class StillClock:
    """The app's clock, standing still until ``advance`` moves it."""

    def __init__(self) -> None:
        self.at = clock.now()

    def __call__(self) -> float:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += seconds


@pytest.fixture
def still() -> StillClock:
    return StillClock()


def hold_still(hl: Hookline, still: StillClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hl.runtime, "now", still)


async def user(
    hl: Hookline, name: str, *, rate: float | None = None, burst: int | None = None
) -> str:
    """A new user with its own limits (None: the process's); its API key."""
    key = new_api_key()
    await hl.store.create_user(
        name,
        100,
        is_admin=False,
        key_hash=hash_key(key),
        now=clock.now(),
        rate_limit_per_s=rate,
        rate_limit_burst=burst,
    )
    return key


async def me(hl: Hookline, key: str) -> httpx.Response:
    return await hl.client.get("/v1/me", headers=hl.auth(key))


async def at_once(hl: Hookline, key: str, n: int) -> list[int]:
    """The status codes of ``n`` requests with ``key``, ``CONCURRENCY`` of them in flight."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> int:
        async with gate:
            return (await me(hl, key)).status_code

    return await asyncio.gather(*(one() for _ in range(n)))


def assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited"
    retry_after = r.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1


async def test_a_burst_of_2000_requests_from_one_key_passes_the_default_limit(
    tmp_path: Path, still: StillClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One backend key serving a whole product: 2,000 requests at once, and not one token
    refilled in between (the clock stands still), are all answered."""
    limits = {"rate_limit_per_s": DEFAULT_RATE, "rate_limit_burst": DEFAULT_BURST}
    async with running_hookline(tmp_path, **limits) as hl:
        hold_still(hl, still, monkeypatch)
        key = await user(hl, "backend")
        codes = await at_once(hl, key, BURST_OF_CREATES)
        assert codes.count(200) == BURST_OF_CREATES, sorted(set(codes))
        # and the limit was on all along: the rest of the burst (taken from the limiter itself,
        # not to spend the time of 500 more requests), then the next request is refused
        for _ in range(int(DEFAULT_BURST) - BURST_OF_CREATES):
            assert hl.web.limiter.take(hash_key(key), still()) == 0.0
        assert_rate_limited(await me(hl, key))


async def test_a_users_own_limits_refuse_its_fourth_quick_request_and_no_one_elses(
    tmp_path: Path, still: StillClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hookline(
        tmp_path, rate_limit_per_s=DEFAULT_RATE, rate_limit_burst=DEFAULT_BURST
    ) as hl:
        hold_still(hl, still, monkeypatch)
        slow = await user(hl, "slow", rate=1.0, burst=3)
        other = await user(hl, "other")
        for _ in range(3):
            assert (await me(hl, slow)).status_code == 200
        r = await me(hl, slow)
        assert_rate_limited(r)
        assert r.headers["retry-after"] == "1"  # one token a second, none left
        assert r.json()["error"]["details"]["retry_after_s"] == pytest.approx(1.0)
        assert set(await at_once(hl, other, 20)) == {200}  # another key, on the defaults
        assert_rate_limited(await me(hl, slow))
        still.advance(1.0)  # one second: one token
        assert (await me(hl, slow)).status_code == 200
        assert_rate_limited(await me(hl, slow))


async def test_a_user_with_rate_0_is_not_limited_under_tight_defaults(
    tmp_path: Path, still: StillClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hookline(tmp_path, rate_limit_per_s=1.0, rate_limit_burst=3) as hl:
        hold_still(hl, still, monkeypatch)
        unlimited = await user(hl, "unlimited", rate=0.0)
        wider = await user(hl, "wider", burst=10)  # the default rate, its own burst
        plain = await user(hl, "plain")
        assert set(await at_once(hl, unlimited, 100)) == {200}
        assert set(await at_once(hl, wider, 10)) == {200}
        assert_rate_limited(await me(hl, wider))
        for _ in range(3):
            assert (await me(hl, plain)).status_code == 200
        assert_rate_limited(await me(hl, plain))


async def test_changed_limits_apply_once_the_cached_key_expires(
    tmp_path: Path, still: StillClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hookline(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=2) as hl:
        hold_still(hl, still, monkeypatch)
        key = await user(hl, "alice")
        for _ in range(2):
            assert (await me(hl, key)).status_code == 200
        assert_rate_limited(await me(hl, key))
        await hl.store.set_user_limits("alice", rate_limit_per_s=0.0, rate_limit_burst=None)
        still.advance(KEY_CACHE_TTL_S + 1)  # the key is read again, with its new limits
        assert set(await at_once(hl, key, 20)) == {200}
