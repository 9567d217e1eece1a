"""The media memory budget (service/media/budget.py): bounded, first come first served, a request
that can never fit refused at once, cancellation never leaks bytes, a thread keeps its bytes until
it returns. Ordering is observed through the budget's own counters and events, never timing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.http.errors import http_status
from service.media.budget import MemoryBudget, run_within
from service.media.errors import OverBudget


async def settle() -> None:
    """Let every runnable task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def holder(budget: MemoryBudget, nbytes: int, log: list[str], name: str) -> asyncio.Event:
    """A task that holds ``nbytes`` until the returned event is set."""
    done = asyncio.Event()

    async def run() -> None:
        async with budget.hold(nbytes):
            log.append(name)
            await done.wait()

    asyncio.get_running_loop().create_task(run())
    await settle()
    return done


async def test_holds_within_the_budget_run_at_once_and_are_given_back() -> None:
    budget = MemoryBudget(100)
    async with budget.hold(60), budget.hold(40):
        assert budget.held == 100
    assert (budget.held, budget.waiting) == (0, 0)


async def test_a_hold_waits_until_its_bytes_are_free() -> None:
    budget = MemoryBudget(100)
    log: list[str] = []
    release_a = await holder(budget, 70, log, "a")
    release_b = await holder(budget, 50, log, "b")
    assert (log, budget.held, budget.waiting) == (["a"], 70, 1)
    release_a.set()
    await settle()
    assert (log, budget.held, budget.waiting) == (["a", "b"], 50, 0)
    release_b.set()
    await settle()
    assert budget.held == 0


async def test_first_come_first_served_a_large_request_is_not_overtaken() -> None:
    """10 bytes are free while a 60-byte request waits: a later 10-byte request waits behind it."""
    budget = MemoryBudget(100)
    log: list[str] = []
    release_a = await holder(budget, 90, log, "big-holder")
    release_b = await holder(budget, 60, log, "large")
    release_c = await holder(budget, 10, log, "small")
    assert log == ["big-holder"] and budget.waiting == 2
    release_a.set()
    await settle()
    assert log == ["big-holder", "large", "small"]  # both fit now, in their order
    release_b.set()
    release_c.set()
    await settle()
    assert budget.held == 0


async def test_a_request_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = MemoryBudget(100)
    log: list[str] = []
    await holder(budget, 100, log, "all")
    with pytest.raises(OverBudget) as err:
        await asyncio.wait_for(budget.acquire(101), timeout=5)  # a bound, not a measurement
    assert err.value.code == "over_memory_budget"
    assert err.value.details == {"bytes": 101, "budget_bytes": 100}
    assert http_status(err.value) == 413
    assert budget.waiting == 0


async def test_a_waiter_cancelled_in_line_leaves_nothing_behind_and_unblocks_the_next() -> None:
    budget = MemoryBudget(100)
    log: list[str] = []
    release = await holder(budget, 50, log, "a")
    head = asyncio.get_running_loop().create_task(budget.acquire(80))  # waits: 50 free
    await settle()
    behind = await holder(budget, 40, log, "b")  # fits, but waits behind the head
    assert log == ["a"] and budget.waiting == 2
    head.cancel()
    await settle()
    assert head.cancelled()
    assert log == ["a", "b"] and budget.waiting == 0
    release.set()
    behind.set()
    await settle()
    assert budget.held == 0


async def test_a_grant_that_races_a_cancellation_is_given_back() -> None:
    budget = MemoryBudget(100)
    log: list[str] = []
    release = await holder(budget, 100, log, "a")
    waiter = asyncio.get_running_loop().create_task(budget.acquire(100))
    await settle()
    release.set()  # the holder's exit grants the waiter its bytes...
    await asyncio.sleep(0)
    assert budget.held == 100 and budget.waiting == 0 and not waiter.done()
    waiter.cancel()  # ...and the waiter is cancelled before it runs again
    await settle()
    assert budget.held == 0 and budget.waiting == 0


async def test_a_thread_keeps_its_bytes_until_it_returns_even_if_its_caller_is_cancelled() -> None:
    budget = MemoryBudget(100)
    started, finish = threading.Event(), threading.Event()

    def work() -> str:
        started.set()
        finish.wait(10)
        return "done"

    task = asyncio.get_running_loop().create_task(budget.in_thread(60, work))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await settle()
    assert task.cancelled()
    assert budget.held == 60  # the thread is still running: its memory is still in use
    finish.set()
    for _ in range(200):  # wait for the thread's completion callback (bounded, not timed)
        if budget.held == 0:
            break
        await asyncio.sleep(0.01)
    assert budget.held == 0


async def test_in_thread_returns_the_result_and_gives_the_bytes_back_on_errors() -> None:
    budget = MemoryBudget(100)
    assert await budget.in_thread(30, lambda a, b: a + b, 2, b=3) == 5

    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await budget.in_thread(30, boom)
    assert budget.held == 0


async def test_zero_bytes_never_wait_and_negative_or_empty_budgets_are_errors() -> None:
    budget = MemoryBudget(10)
    log: list[str] = []
    await holder(budget, 10, log, "all")
    await asyncio.wait_for(budget.acquire(0), timeout=5)
    with pytest.raises(ValueError):
        await budget.acquire(-1)
    with pytest.raises(ValueError):
        MemoryBudget(0)


async def test_run_within_holds_the_budget_or_runs_unbounded_without_one() -> None:
    budget = MemoryBudget(100)
    seen: list[int] = []

    def look() -> int:
        seen.append(budget.held)
        return 7

    assert await run_within(budget, 40, look) == 7
    assert await run_within(None, 10**12, look) == 7  # no budget: nothing is refused
    assert seen == [40, 0] and budget.held == 0
