"""Consuming the change feed: a resumable Watcher and an in-process Broadcaster.

Both know only the ``ChangeFeed`` and ``TaskStore`` ports, so every adapter's feed
(``sqlite_feed.SqliteFeed``, ``mongo_feed.MongoChangeFeed``) reuses them::

    feed ──▶ Watcher("sse", feed, store, broadcaster.publish) ──▶ Broadcaster ──▶ SSE clients
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import structlog

from statemachine.errors import StoreError
from statemachine.store import ChangeFeed, FeedEvent, TaskStore

log = structlog.get_logger(__name__)

Handler = Callable[[FeedEvent], Awaitable[None]]


class Watcher:
    """A named, resumable consumer of a ChangeFeed: at-least-once delivery to ``handler``.

    The position is loaded from the store at start, saved every ``save_every`` events, every
    ``save_interval_s`` while it moves, and on stop (``stop()`` or cancellation of ``run``);
    ``persist=False`` saves nothing, and ``start_at_head`` starts a watcher with no saved position
    at the feed's newest event instead of its beginning. With ``concurrency`` above 1 up to that
    many events are handled at once (for a handler whose events are independent of each other's
    order); the position still moves only over events whose handling is done. A
    handler that raises is logged and skipped; a feed that fails is re-subscribed from the last
    handled position after an exponential backoff.
    """

    def __init__(
        self,
        name: str,
        feed: ChangeFeed,
        store: TaskStore,
        handler: Handler,
        *,
        save_every: int = 100,
        save_interval_s: float = 1.0,
        retry_base_s: float = 0.1,
        retry_max_s: float = 10.0,
        start_at_head: bool = False,
        persist: bool = True,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self._start_at_head = start_at_head
        self._persist = persist
        self._feed = feed
        self._store = store
        self._handler = handler
        self._save_every = save_every
        self._save_interval_s = save_interval_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._concurrency = concurrency
        self._position: str | None = None
        self._saved: str | None = None
        self._unsaved = 0
        self._stopping = asyncio.Event()
        self._save_lock = asyncio.Lock()

    @property
    def position(self) -> str | None:
        """The position of the last event handed to the handler."""
        return self._position

    def stop(self) -> None:
        """Ask ``run`` to save its position and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume the feed until ``stop()`` or cancellation; the position is saved either way."""
        self._stopping.clear()
        self._position = self._saved = await self._start_position()
        log.info("watcher.started", watcher=self.name, position=self._position)
        consumer = asyncio.create_task(self._consume(), name=f"watcher-{self.name}")
        saver = asyncio.create_task(self._save_periodically(), name=f"watcher-{self.name}-save")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({consumer, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consumer, saver, stopping):
                task.cancel()
            await asyncio.gather(consumer, saver, stopping, return_exceptions=True)
            # Shielded: a cancelled run still records how far it got.
            await asyncio.shield(self._save())
            log.info("watcher.stopped", watcher=self.name, position=self._position)

    async def _start_position(self) -> str | None:
        """The saved position; with ``start_at_head`` and none saved (or ``persist`` off), the
        feed's head: what happened before is not this watcher's to replay.

        A persistent watcher starting at the head saves that start before it reads anything
        (an empty feed's start is its ``origin``, where the feed has one): otherwise a process
        killed before its first periodic save would start the next one at the head again, and
        every event between the two heads would never be handled (the outbox's messages of
        those events lost)."""
        if self._persist:
            saved = await self._store.load_position(self.name)
            if saved is not None or not self._start_at_head:
                return saved
        elif not self._start_at_head:
            return None
        head = await self._head()
        start = head if head is not None else getattr(self._feed, "origin", None)
        if self._persist and start is not None:
            try:
                await self._store.save_position(self.name, start)
            except Exception as exc:  # the periodic save tries again once events move it
                log.warning("watcher.save_failed", watcher=self.name, error=repr(exc))
        return head

    async def _head(self) -> str | None:
        delay_s = self._retry_base_s
        while True:
            try:
                return await self._store.feed_head()
            except StoreError:
                return None  # a feed without positions of its own (change streams start "now")
            except Exception as exc:  # the store is not reachable yet
                log.warning("watcher.feed_head_failed", watcher=self.name, error=repr(exc))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._retry_max_s)

    async def _consume(self) -> None:
        failures = 0
        while True:
            events = self._feed.subscribe(self._position)
            window: collections.deque[tuple[str, asyncio.Task[None]]] = collections.deque()
            try:
                async for event in events:
                    failures = 0
                    if self._concurrency == 1:
                        await self._handle(event)
                        await self._passed(event.position)
                        continue
                    handling = asyncio.create_task(self._handle(event))
                    window.append((event.position, handling))
                    # the position moves as soon as the front is done, even with no next event
                    handling.add_done_callback(functools.partial(self._pass_done, window))
                    if len(window) >= self._concurrency:
                        await asyncio.wait({window[0][1]})
                    if self._unsaved >= self._save_every:
                        await self._save()
                while window:
                    await asyncio.wait({window[0][1]})
                return  # a feed that ends (a test's finite feed) ends the watcher
            except Exception as exc:
                failures += 1
                delay_s = min(self._retry_base_s * 2 ** (failures - 1), self._retry_max_s)
                log.warning(
                    "watcher.feed_failed",
                    watcher=self.name,
                    position=self._position,
                    error=repr(exc),
                    retry_in_s=delay_s,
                )
                await asyncio.sleep(delay_s)
            finally:
                # handlers still running finish (or are cancelled with the watcher); their events
                # lie after the position, so a re-subscription hands them over again
                await asyncio.gather(*(t for _, t in window), return_exceptions=True)
                await _close(events)

    async def _passed(self, position: str) -> None:
        self._position = position
        self._unsaved += 1
        if self._unsaved >= self._save_every:
            await self._save()

    def _pass_done(
        self, window: collections.deque[tuple[str, asyncio.Task[None]]], _: object = None
    ) -> None:
        """Move the position over the handled events at the window's front: never past one
        still being handled, so a saved position is one every earlier event was handled by
        (the periodic save, or the next event, stores it)."""
        while window and window[0][1].done():
            position, _ = window.popleft()
            self._position = position
            self._unsaved += 1

    async def _handle(self, event: FeedEvent) -> None:
        fields = {"watcher": self.name, "task_id": event.task_id, "position": event.position}
        # bind + reset rather than ``bound_contextvars``, which reads the whole context first:
        # this runs for every event of every watcher
        tokens = structlog.contextvars.bind_contextvars(**fields)
        try:
            await self._handler(event)
        except Exception:
            # At-least-once means a failing handler must not stall everyone behind it: the
            # handler records failures as task state itself; here it is logged and skipped.
            log.exception(
                "watcher.handler_failed", **fields, feed_event=event.event, dest=event.dest
            )
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._save_interval_s)
            await self._save()

    async def _save(self) -> None:
        if not self._persist:
            return
        async with self._save_lock:
            position = self._position
            if position is None or position == self._saved:
                return
            try:
                await self._store.save_position(self.name, position)
            except Exception as exc:
                log.warning("watcher.save_failed", watcher=self.name, error=repr(exc))
                return
            self._saved = position
            self._unsaved = 0


async def _close(events: AsyncIterator[FeedEvent]) -> None:
    """Finish an async generator at once (its cleanup, e.g. leaving the store's listeners)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


DROPPED: Final = object()


class Subscription:
    """One subscriber of a Broadcaster: an async iterator of events, ended when dropped."""

    def __init__(self, broadcaster: Broadcaster, task_id: str | None, maxsize: int) -> None:
        self.task_id = task_id
        self.dropped = False
        self._broadcaster = broadcaster
        self._queue: asyncio.Queue[FeedEvent | object] = asyncio.Queue(maxsize)

    def _offer(self, event: FeedEvent) -> bool:
        """Queue ``event``; False if the subscriber is too slow (its queue is full)."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def _end(self, *, dropped: bool) -> None:
        self.dropped = self.dropped or dropped
        # Emptied first so the end marker always fits; a dropped subscriber resumes by position.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(DROPPED)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FeedEvent:
        item = await self._queue.get()
        if isinstance(item, FeedEvent):
            return item
        # Keep the marker so later calls end as well.
        self._queue.put_nowait(item)
        raise StopAsyncIteration

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._broadcaster.unsubscribe(self)


class Broadcaster:
    """In-process fan-out of one feed to many subscribers, each with a bounded queue.

    ``publish`` is a Watcher handler. A subscriber whose queue is full is dropped (its iteration
    ends, ``dropped`` is True) instead of slowing the others; it may resubscribe from the position
    of the last event it saw.
    """

    def __init__(self, queue_size: int = 256) -> None:
        self._queue_size = queue_size
        self._by_task: dict[str | None, set[Subscription]] = {}
        self._count = 0  # kept, not summed: every stream opened asks (service/http/sse.py)

    @property
    def count(self) -> int:
        """Live subscribers."""
        return self._count

    def watching(self, task_id: str | None) -> int:
        """Live subscribers of ``task_id`` (None: of every event)."""
        return len(self._by_task.get(task_id, ()))

    def subscribe(self, task_id: str | None = None) -> Subscription:
        """Events of ``task_id`` (None: every event). Use as ``async with`` to unsubscribe."""
        sub = Subscription(self, task_id, self._queue_size)
        self._by_task.setdefault(task_id, set()).add(sub)
        self._count += 1
        return sub

    async def publish(self, event: FeedEvent) -> None:
        """Hand ``event`` to its task's subscribers and to everyone's; drop the slow ones."""
        for key in (event.task_id, None):
            for sub in list(self._by_task.get(key, ())):
                if not sub._offer(event):
                    log.warning("broadcaster.dropped_slow", task_id=sub.task_id)
                    self.unsubscribe(sub)
                    sub._end(dropped=True)

    def close(self) -> None:
        """End every subscription (shutdown)."""
        for subs in list(self._by_task.values()):
            for sub in list(subs):
                self.unsubscribe(sub)
                sub._end(dropped=False)

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub`` (what leaving its ``async with`` does); idempotent."""
        subs = self._by_task.get(sub.task_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._count -= 1
        if not subs:
            del self._by_task[sub.task_id]
