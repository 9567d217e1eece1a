"""Work a process starts and does not wait for: cleanups after a write (cancelling a provider job,
deleting outputs), a poll a webhook asked for, and (through the step runner) the leased steps.

Every piece is an asyncio task kept in one set, so errors are logged (never lost), tests can
``drain`` it, and shutdown can give it a grace period before cancelling what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger()


class Background:
    """A set of background tasks, at most ``concurrency`` running at once (None: no bound)."""

    def __init__(self, name: str, concurrency: int | None = None) -> None:
        self.name = name
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._running: set[asyncio.Task[None]] = set()
        self.closing = False

    @property
    def busy(self) -> int:
        """Tasks started and not finished (waiting for a slot included)."""
        return len(self._running)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; an exception it raises is logged."""

        async def guarded() -> None:
            async with self._slots if self._slots is not None else contextlib.nullcontext():
                try:
                    await coro
                except Exception as exc:
                    log.exception(f"{self.name}_crashed", error=repr(exc))

        job = asyncio.create_task(guarded())
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def drain(self) -> None:
        """Wait until nothing is running (tests; shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def close(self, grace_s: float) -> None:
        """Give running work ``grace_s`` to finish (work it spawns meanwhile included), then
        cancel what is left."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._running:
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait(list(self._running), timeout=left)
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
