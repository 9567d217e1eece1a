"""``GET /v1/tasks/{id}/events``: a task's state changes as Server-Sent Events.

Every frame is ``id: <feed position>``, ``event: state``, ``data: {"task_id", "state", "event",
"at"}``. A fresh stream starts with the current state; a stream opened with ``Last-Event-ID``
starts with the task's events after that position (``store.task_feed_after``: only this task's
events, through an index, so ``Last-Event-ID: 0`` costs the task's events, not the feed), then both
go live from the process's one ``Broadcaster``. Comments (``: ping``) keep idle connections open;
the stream ends after a terminal state. Where the store cannot give every event after the id
(retention pruned some, or MongoDB without its event log, whose ids are change-stream tokens), the
stream starts from the current state instead, as a fresh one does.

No event is lost or repeated within a stream or across a reconnect: the subscription is made before
anything is read, and live events the opening already covered are skipped by task version (versions
grow by one per stored change, so they order a task's events whatever the feed's positions are).

The task's watch link opens the stream without a key (``?watch=<token>``: ``EventSource`` sends no
headers; service/http/watch.py). Such a stream checks its link again before each ping and ends
once the link has expired or been rotated or revoked, so a revoked link keeps no stream open.

At most ``HOOKLINE_SSE_PER_TASK`` streams of one task and ``HOOKLINE_SSE_MAX_STREAMS`` in all are
open at once in a process; one more is a 429 ``too_many_streams`` (``Retry-After``).

A ``Last-Event-ID`` that is not a feed position is a 400 (``bad_last_event_id``): silently starting
over would hide a client bug. One from another task is harmless: only this task's events follow.

The response is written by hand, not with sse-starlette's ``EventSourceResponse``: that adds
nothing to the resume and ordering guarantees (they are all in ``_frames``) and costs four tasks
and a task group per stream (49 KB per client against 27 KB in bench_sse at 1,000 clients), a
ping task on its own timer, and, on import, a patch of uvicorn's ``Server.handle_exit`` with a
process-wide exit flag nothing resets. Shutdown already ends every stream (``Broadcaster.close``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http import watch
from service.http.errors import MalformedRequest, RateLimited
from service.http.requests import readable_task
from service.http.state import web
from service.runtime import Runtime
from statemachine.clock import iso
from statemachine.errors import BadRequest, StoreError, Unavailable
from statemachine.feed import Broadcaster, Subscription
from statemachine.states import TERMINAL, State
from statemachine.store import FeedEvent
from statemachine.task import Task

RETRY_MS: Final = 2000
GAP_BATCH: Final = 500
MAX_EVENT_ID: Final = 256
SNAPSHOT_TRIES: Final = 5


@dataclass(frozen=True, slots=True)
class Frame:
    """One state event as sent: the feed position, the task's version, and the payload."""

    position: str | None
    version: int
    task_id: str
    state: State
    event: str
    at: float

    @classmethod
    def of(cls, event: FeedEvent) -> Frame:
        return cls(event.position, event.version, event.task_id, event.dest, event.event, event.at)

    def encode(self) -> bytes:
        data = {"task_id": self.task_id, "state": self.state.value, "event": self.event}
        data["at"] = iso(self.at) or ""
        head = f"id: {self.position}\n" if self.position is not None else ""
        return f"{head}event: state\ndata: {json.dumps(data)}\n\n".encode()


def snapshot(task: Task, position: str | None) -> Frame:
    """The task's current state as a frame (its last transition, or its creation)."""
    last = task.history[-1] if task.history else None
    event, at = (last.event, last.at) if last else ("created", task.created_at)
    return Frame(position, task.version, task.id, task.state, event, at)


def last_event_id(request: Request) -> str | None:
    """The ``Last-Event-ID`` header, checked for shape (the store checks it is a position)."""
    raw = request.headers.get("last-event-id")
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if len(raw) > MAX_EVENT_ID or not raw.isprintable():
        raise _bad_event_id(raw)
    return raw


def _bad_event_id(raw: str) -> MalformedRequest:
    shown = raw[:40] + ("…" if len(raw) > 40 else "")
    return MalformedRequest(
        f"Last-Event-ID {shown!r} is not an event id of this stream; "
        "reconnect without it to start from the current state",
        code="bad_last_event_id",
    )


async def _opening_fresh(rt: Runtime, task_id: str) -> tuple[list[Frame], int]:
    """The current state, stamped with a feed position that no later event precedes.

    The head is read before the task, so an event between the two reads is at most repeated on a
    reconnect, never skipped; an unchanged head around the read makes the snapshot exact."""
    before = await _head(rt)
    task = await _read(rt, task_id)
    for _ in range(SNAPSHOT_TRIES):
        head = await _head(rt)
        if head == before:
            break
        before, task = head, await _read(rt, task_id)
    return [snapshot(task, before)], task.version


async def _read(rt: Runtime, task_id: str) -> Task:
    task = await rt.store.get_task(task_id)
    if task is None:
        raise Unavailable("task vanished", code="task_gone")
    return task


async def _head(rt: Runtime) -> str | None:
    try:
        return await rt.store.feed_head()
    except StoreError:
        return None  # a store without an event log: ids are the live feed's only


@dataclass(frozen=True, slots=True)
class Opening:
    """How a stream opens: its first frames (the current state, or the first page of the gap after
    ``Last-Event-ID``), the task version the client has once they are sent (live events at or below
    it are skipped), whether the task was terminal before the gap was read (nothing can follow
    it), and where the next page of the gap starts (None: no more)."""

    frames: list[Frame]
    seen: int
    ended: bool
    more: str | None


async def _opening_resumed(rt: Runtime, task_id: str, after: str) -> Opening:
    # The task is read before the gap: every event of a version above it is then in the gap or
    # still to come live, and one at or below it the client has or gets from the gap.
    task = await _read(rt, task_id)
    try:
        page = await rt.store.task_feed_after(task_id, after, GAP_BATCH)
    except BadRequest as exc:
        raise _bad_event_id(after) from exc
    except StoreError:
        # The gap cannot be replayed in full (pruned by retention, or MongoDB without its event
        # log): resume from the current state instead of failing or skipping silently.
        frames, seen = await _opening_fresh(rt, task_id)
        return Opening(frames, seen, ended=False, more=None)
    frames = [Frame.of(e) for e in page]
    more = page[-1].position if len(page) == GAP_BATCH else None
    return Opening(frames, task.version, task.terminal, more)


async def _rest_of_gap(
    rt: Runtime, task_id: str, after: str | None, sent: int
) -> AsyncIterator[Frame]:
    """The pages of the gap after the opening's (a task with more than ``GAP_BATCH`` events);
    ``sent`` is the version of the last frame sent. Pruned meanwhile: the current state, as a
    resume that starts too late gets, unless the client has it already."""
    while after is not None:
        try:
            page = await rt.store.task_feed_after(task_id, after, GAP_BATCH)
        except StoreError:
            frames, _ = await _opening_fresh(rt, task_id)
            for frame in frames:
                if frame.version > sent:
                    yield frame
            return
        for event in page:
            sent = event.version
            yield Frame.of(event)
        after = page[-1].position if len(page) == GAP_BATCH else None


async def task_events(request: Request) -> Response:
    """``GET /v1/tasks/{id}/events``: Server-Sent Events of one task (see the module docstring)."""
    state = web(request)
    rt = state.runtime
    reading = await readable_task(request)
    task = reading.task
    after = last_event_id(request)
    broadcaster = rt.broadcaster
    _check_room(rt, broadcaster, task.id)
    sub = broadcaster.subscribe(task.id)  # before any read: nothing can slip between
    try:
        if after is None:
            frames, seen = await _opening_fresh(rt, task.id)
            opening = Opening(frames, seen, ended=False, more=None)
        else:
            opening = await _opening_resumed(rt, task.id, after)
    except BaseException:
        broadcaster.unsubscribe(sub)
        raise
    holds = _link_check(rt, task.id, reading.watch_token) if reading.watch_token else None
    stream = _frames(rt, sub, task.id, opening, state.sse_ping_s, holds)
    return EventStream(stream, on_close=lambda: _unsubscribe(broadcaster, sub))


def _check_room(rt: Runtime, broadcaster: Broadcaster, task_id: str) -> None:
    """429 when the task already has ``HOOKLINE_SSE_PER_TASK`` streams open in this process, or
    the process ``HOOKLINE_SSE_MAX_STREAMS``: a watch link passed around (or a script reopening
    streams) cannot hold the process's memory, ~27 KB per stream."""
    settings = rt.settings
    if broadcaster.watching(task_id) >= settings.sse_per_task:
        raise RateLimited(
            f"task {task_id} has {settings.sse_per_task} live streams open; close one first",
            retry_after_s=RETRY_MS / 1000,
            code="too_many_streams",
        )
    if broadcaster.count >= settings.sse_max_streams:
        raise RateLimited(
            "this server has as many live streams open as it takes; retry later",
            retry_after_s=RETRY_MS / 1000,
            code="too_many_streams",
        )


def _link_check(rt: Runtime, task_id: str, token: str) -> Callable[[], Awaitable[bool]]:
    """Whether the watch link that opened a stream still opens its task, asked at each ping:
    a stream ends within one ping interval of its link's expiry, rotation or revocation."""
    links = watch.signer(rt.settings)
    return lambda: watch.link_holds(rt.store, links, task_id, token, rt.now())


async def _frames(
    rt: Runtime,
    sub: Subscription,
    task_id: str,
    opening: Opening,
    ping_s: float,
    link_holds: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[bytes]:
    """The stream's bytes: the opening, the rest of the gap, then live events and pings (before
    each ping, a stream opened by a watch link ends if ``link_holds`` says it no longer does)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    latest = opening.seen
    for frame in opening.frames:
        yield frame.encode()
        latest = max(latest, frame.version)
        if frame.state in TERMINAL:
            return
    sent = opening.frames[-1].version if opening.frames else 0
    async for frame in _rest_of_gap(rt, task_id, opening.more, sent):
        yield frame.encode()
        latest = max(latest, frame.version)
        if frame.state in TERMINAL:
            return
    if opening.ended:
        return  # terminal before the gap was read, and the client had its last event already
    while True:
        try:
            async with asyncio.timeout(ping_s):
                event = await anext(sub)
        except TimeoutError:
            if link_holds is not None and not await link_holds():
                return
            yield b": ping\n\n"
            continue
        except StopAsyncIteration:
            return  # dropped as too slow, or shutting down: the client resumes by its last id
        if event.version <= latest:
            continue
        latest = event.version
        yield Frame.of(event).encode()
        if event.dest in TERMINAL:
            return


class EventStream(Response):
    """An ASGI ``text/event-stream`` response: sends ``frames`` until they end or the client
    leaves, whichever is first, then runs ``on_close`` (which unsubscribes) at once.

    The client's disconnect is watched on ``receive`` rather than found by a failing write, so an
    idle client that leaves is released now, not at the next ping."""

    media_type = "text/event-stream"

    def __init__(
        self, frames: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        # Response.__init__ is not called: it would add a Content-Length to an endless body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache, no-store"),
            (b"x-accel-buffering", b"no"),  # proxies must not hold events back
            (b"x-content-type-options", b"nosniff"),
        ]
        self._frames = frames
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await self._head(send)
            return
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            gone.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self._close_frames()
        if not pump.cancelled() and (error := pump.exception()) is not None:
            raise error

    async def _head(self, send: Send) -> None:
        """Headers and an empty body: Starlette answers HEAD on every GET route, and a stream
        that never ends would hold the connection (and its subscription) until the task does."""
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._close_frames()

    async def _close_frames(self) -> None:
        await self._on_close()
        aclose = getattr(self._frames, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self._frames:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unsubscribe(broadcaster: Broadcaster, sub: Subscription) -> None:
    broadcaster.unsubscribe(sub)
