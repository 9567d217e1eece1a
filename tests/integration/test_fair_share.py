"""Fair share of a provider's slots, through a real server: inputs are fetched and checked before a
task takes a slot (a slow input holds none), and one user holds at most a share of the slots, so
another user's task is not held back by the first user's backlog."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from statemachine.states import State
from tests.integration.test_metrics_stats import scrape
from tests.support.hookline import Hookline, running_hookline
from tests.support.server import serve_app

pytestmark = pytest.mark.asyncio
TIMEOUT_S = 30


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "navy").save(buf, "PNG")
    return buf.getvalue()


class SlowImageHost:
    """An image host that holds every request until the test releases it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def image(self, request: Request) -> Response:
        self.waiting += 1
        await self.release.wait()
        return Response(png(), media_type="image/png")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/img.png", self.image)])


@pytest.fixture
async def slow_host() -> AsyncIterator[tuple[SlowImageHost, str]]:
    host = SlowImageHost()
    async with serve_app(host.app()) as url:
        try:
            yield host, url
        finally:
            host.release.set()


async def states(hl: Hookline, ids: list[str]) -> list[State]:
    found = [await hl.store.get_task(i) for i in ids]
    return [t.state for t in found if t is not None]


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for ``check`` (a generous bound: a hang fails, speed is not tested)."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def test_a_slow_input_holds_no_provider_slot(
    tmp_path: Path, slow_host: tuple[SlowImageHost, str]
) -> None:
    host, url = slow_host
    netloc = url.removeprefix("http://")
    async with running_hookline(
        tmp_path, provider_concurrency=2, user_concurrency=2, input_hosts=netloc
    ) as hl:
        alice = await hl.create_user("alice")
        bob = await hl.create_user("bob")
        slow = [
            (await hl.create_task(alice, inputs=[{"url": f"{url}/img.png"}]))["id"]
            for _ in range(2)
        ]

        async def both_fetching() -> bool:
            return host.waiting >= 2

        await until(both_fetching, "alice's inputs being fetched")
        done = await hl.wait_terminal(bob, (await hl.create_task(bob))["id"], TIMEOUT_S)
        assert done["state"] == "completed"  # bob's task got a slot while alice's fetched
        assert await states(hl, slow) == [State.PROCESSING, State.PROCESSING]
        host.release.set()
        for task_id in slow:
            assert (await hl.wait_terminal(alice, task_id, TIMEOUT_S))["state"] == "completed"


async def test_one_users_backlog_does_not_hold_back_another_users_task(tmp_path: Path) -> None:
    # 4 slots, a quarter of them per user: alice's five tasks take one, bob's task another.
    async with running_hookline(
        tmp_path, provider_concurrency=4, sim_latency="fixed:60", roles="api,dispatcher,reaper"
    ) as hl:
        alice = await hl.create_user("alice")
        bob = await hl.create_user("bob")
        backlog = [(await hl.create_task(alice))["id"] for _ in range(5)]

        async def one_submitted() -> bool:
            return State.AI_PROCESSING in await states(hl, backlog)

        await until(one_submitted, "alice's first task submitted")
        theirs = (await hl.create_task(bob))["id"]

        async def bob_submitted() -> bool:
            return await states(hl, [theirs]) == [State.AI_PROCESSING]

        await until(bob_submitted, "bob's task submitted")
        alices = await states(hl, backlog)
        assert alices.count(State.AI_PROCESSING) == 1
        assert alices.count(State.PENDING) >= 3  # still queued behind alice's own share
        metrics = await scrape(hl)
        for user in ("alice", "bob"):
            assert metrics[("hookline_user_jobs_in_flight", (("user", user),))] == 1
