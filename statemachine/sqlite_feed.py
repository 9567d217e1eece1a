"""The ChangeFeed of the SQLite adapter: the store's append-only event table, read in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from statemachine.sqlite_store import SqliteStore
from statemachine.store import FeedEvent

COALESCE_S: Final = 0.002


class SqliteFeed:
    """The ChangeFeed of a SqliteStore: woken at once by this process's writes (the store's
    listeners), polling every ``poll_interval_s`` for other processes' writes.

    A woken subscriber waits ``coalesce_s`` before it reads: under load the database thread
    commits a batch every millisecond or so, and each of a process's watchers (dispatcher,
    metrics, outbound webhooks) would read the feed after every one of them; this way a read
    takes several commits' events, for a few milliseconds more on each hand-over."""

    # the position before the first event: a watcher that starts on an empty feed saves it
    origin: Final = "0"

    def __init__(
        self,
        store: SqliteStore,
        poll_interval_s: float = 0.5,
        batch: int = 500,
        coalesce_s: float = COALESCE_S,
    ) -> None:
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._batch = batch
        self._coalesce_s = coalesce_s

    async def subscribe(self, after: str | None) -> AsyncIterator[FeedEvent]:
        """Every event after ``after``, in order, then new ones as they are written, forever."""
        position = after
        with self._store.listen() as wake:
            while True:
                # Cleared before reading: a commit after the read sets it again, so none is missed.
                wake.clear()
                events = await self._store.feed_after(position, self._batch)
                for event in events:
                    yield event
                    position = event.position
                if len(events) < self._batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self._poll_interval_s)
                        if self._coalesce_s:
                            await asyncio.sleep(self._coalesce_s)
