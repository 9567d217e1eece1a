"""A reserved poll token is spent when the call leaves: a call that left late (a slow claim
between its token and its send) does not let the next one follow it closer than the quota, so
no one-second window holds more than ``rate`` calls (the 100,000-task poll bench found 52 in a
window at 50/s before this)."""

from __future__ import annotations

import pytest

from service.steps import pacing as pacing_module
from service.steps.pacing import SPACING_MARGIN, Pacing

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_a_late_call_pushes_the_next_one_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()

    async def sleep(seconds: float) -> None:
        clock.t += seconds

    monkeypatch.setattr(pacing_module.asyncio, "sleep", sleep)
    pacing = Pacing({}, concurrency=0, now=clock)
    pacing._buckets[("p", "poll")] = pacing_module.Bucket(50.0)  # 20 ms apart, burst 1
    first_at = clock.t + (pacing.reserve("p", "poll", 1.0) or 0.0)
    second_at = clock.t + (pacing.reserve("p", "poll", 1.0) or 0.0)
    assert second_at - first_at == pytest.approx(0.02)
    clock.t += 0.015  # the first call's claim was slow: it leaves 15 ms after its token
    await pacing.spaced("p", "poll", first_at)
    left_first = clock.t
    await pacing.spaced("p", "poll", second_at)
    assert clock.t - left_first >= 0.02 * SPACING_MARGIN - 1e-9  # not 5 ms after it


async def test_sends_in_any_second_stay_within_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    import random

    rng = random.Random(7)

    async def sleep(seconds: float) -> None:
        clock.t += seconds

    monkeypatch.setattr(pacing_module.asyncio, "sleep", sleep)
    pacing = Pacing({}, concurrency=0, now=clock)
    pacing._buckets[("p", "poll")] = pacing_module.Bucket(50.0)
    sent: list[float] = []
    for _ in range(500):
        at = clock.t + (pacing.reserve("p", "poll", 10.0) or 0.0)
        clock.t += rng.random() * 0.03  # a claim of 0–30 ms before the call
        await pacing.spaced("p", "poll", at)
        sent.append(clock.t)
    most = max(sum(1 for s in sent if t <= s < t + 1.0) for t in sent)
    assert most <= 50
