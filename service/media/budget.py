"""A byte budget that concurrent fetches and image decodes share, so that together they never hold
more than a bounded amount of memory, however many run at once.

    budget = MemoryBudget(256_000_000)             # one per process (service/runtime.py)
    async with budget.hold(nbytes):                # waits until nbytes are free
        ...
    out = await budget.in_thread(nbytes, fn, data)  # held until the thread has returned
    out = await run_within(budget, nbytes, fn, data)  # the same; budget None: no limit

- **Fair.** Requests are granted strictly in arrival order: a large request at the head of the
  queue is not overtaken by smaller ones behind it, so it cannot starve.
- **No deadlock on a request that can never fit.** A request for more than the whole budget
  raises ``OverBudget`` at once instead of waiting forever.
- **Threads.** ``in_thread`` keeps the bytes reserved until the thread returns, even when the
  awaiting task is cancelled: a thread cannot be stopped, and its memory is in use until it ends.
- A holder must not ask for more while it holds (two holders each waiting for the other's bytes
  would wait forever): reserve what a piece of work needs once, up front.

Amounts are estimates the callers compute (a body's length, an image's decoded size from its
header: service/media/images.py ``plan_decode``); the budget does not measure memory itself.
Per process and per event loop; not thread-safe (call it from the loop only).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from service.media.errors import OverBudget

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Waiter:
    nbytes: int
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MemoryBudget:
    """``total_bytes`` shared by every holder; see the module docstring."""

    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError("a memory budget needs at least one byte")
        self.total_bytes = total_bytes
        self._free = total_bytes
        self._queue: deque[_Waiter] = deque()

    @property
    def held(self) -> int:
        """Bytes reserved right now."""
        return self.total_bytes - self._free

    @property
    def waiting(self) -> int:
        """Requests queued for their bytes."""
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Reserve ``nbytes`` for the block (waiting in line for them); released on exit."""
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    async def in_thread(
        self, nbytes: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``fn(*args, **kwargs)`` in a thread with ``nbytes`` reserved until it returns."""
        await self.acquire(nbytes)
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                self.release(nbytes)
            else:  # the thread runs on: its bytes are in use until it ends
                work.add_done_callback(lambda done: self._release_after(done, nbytes))
            raise
        except BaseException:
            self.release(nbytes)
            raise
        self.release(nbytes)
        return result

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` are free and no earlier request is waiting, then take them.
        ``OverBudget`` if they never could be."""
        if nbytes < 0:
            raise ValueError("cannot reserve a negative number of bytes")
        if nbytes > self.total_bytes:
            raise OverBudget(
                f"this needs {nbytes} bytes of memory, more than the {self.total_bytes} this "
                "process allows for media at once",
                details={"bytes": nbytes, "budget_bytes": self.total_bytes},
            )
        if nbytes == 0:
            return
        if not self._queue and nbytes <= self._free:
            self._free -= nbytes
            return
        waiter = _Waiter(nbytes)
        self._queue.append(waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(nbytes)  # granted just as the cancellation arrived
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(waiter)
                self._grant()  # it may have been the head that held the others back
            raise

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken by ``acquire``, and grant the waiters they now satisfy."""
        self._free += nbytes
        if self._free > self.total_bytes:
            self._free = self.total_bytes
            raise RuntimeError("released more bytes than were held")
        self._grant()

    def _grant(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.granted.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if head.nbytes > self._free:
                return  # first come, first served: nobody overtakes the head
            self._queue.popleft()
            self._free -= head.nbytes
            head.granted.set_result(None)

    def _release_after(self, work: asyncio.Future[T], nbytes: int) -> None:
        if not work.cancelled():
            work.exception()  # retrieved: nobody awaits it any more
        self.release(nbytes)


async def run_within(
    budget: MemoryBudget | None,
    nbytes: int,
    fn: Callable[P, T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(*args, **kwargs)`` in a thread, holding ``nbytes`` of ``budget`` (``in_thread``);
    with no budget, simply in a thread."""
    if budget is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return await budget.in_thread(nbytes, fn, *args, **kwargs)
