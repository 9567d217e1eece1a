"""``GET /v1/tasks/{id}/events`` through a real server: the current state first, every change after
it exactly once, resumption by Last-Event-ID without loss, clients that leave are unsubscribed, and
bad ids are refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from statemachine.feed import Broadcaster
from tests.support.hookline import Hookline, running_hookline

pytestmark = pytest.mark.asyncio

FULL_PATH = ["pending", "processing", "ai_processing", "watermarking", "completed"]
TIMEOUT_S = 30


@dataclass
class Frame:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None = None


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The frames of an event stream (a comment-only block is a frame with ``comment``)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    comment: str | None = None
    async for line in response.aiter_lines():
        if line == "":
            if fields or data or comment is not None:
                payload = json.loads("\n".join(data)) if data else None
                yield Frame(fields.get("id"), fields.get("event"), payload, comment)
            fields, data, comment = {}, [], None
        elif line.startswith(":"):
            comment = line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


async def state_frames(
    hl: Hookline, key: str, task_id: str, last_id: str | None = None, limit: int | None = None
) -> list[Frame]:
    """The state frames of one stream: to its end, or the first ``limit`` then disconnect."""
    headers = hl.auth(key) | ({"Last-Event-ID": last_id} if last_id else {})
    got: list[Frame] = []
    async with (
        asyncio.timeout(TIMEOUT_S),
        hl.client.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as r,
    ):
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for frame in frames(r):
            if frame.event == "state":
                got.append(frame)
                if limit is not None and len(got) >= limit:
                    break
    return got


async def next_state(reader: AsyncIterator[Frame]) -> Frame:
    async with asyncio.timeout(TIMEOUT_S):
        async for frame in reader:
            if frame.event == "state":
                return frame
    raise AssertionError("the stream ended without a state frame")


def broadcaster(hl: Hookline) -> Broadcaster:
    b: Broadcaster = hl.runtime.broadcaster
    return b


async def until(condition: Any, timeout_s: float = TIMEOUT_S) -> None:
    """Wait for ``condition()`` to hold (a generous bound: a hang fails, speed is not tested)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def states(got: list[Frame]) -> list[str]:
    return [f.data["state"] for f in got if f.data]


async def test_stream_sends_current_state_then_every_change_and_ends_at_terminal(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        got = await state_frames(hl, key, task["id"])
        seen = states(got)
        # Whatever state the task had reached when the stream opened, the rest follows in order.
        assert seen == FULL_PATH[FULL_PATH.index(seen[0]) :]
        for frame in got:
            assert frame.data is not None
            assert set(frame.data) == {"task_id", "state", "event", "at"}
            assert frame.data["task_id"] == task["id"]
        positions = [int(f.id) for f in got if f.id is not None]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        stored = await hl.store.get_task(task["id"])
        assert stored is not None
        events = [h.event for h in stored.history]
        assert [f.data["event"] for f in got[1:] if f.data] == events[len(events) - len(got) + 1 :]
        await until(lambda: broadcaster(hl).count == 0)


async def test_a_reconnect_with_last_event_id_resumes_without_loss_or_repeat(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        first = await state_frames(hl, key, task["id"], limit=1)  # then it hangs up mid-stream
        await hl.wait_terminal(key, task["id"])  # changes happen while nobody listens
        assert first[0].id is not None
        rest = await state_frames(hl, key, task["id"], last_id=first[0].id)
        assert states(first) + states(rest) == FULL_PATH[FULL_PATH.index(states(first)[0]) :]
        assert states(rest)[-1] == "completed"
        await until(lambda: broadcaster(hl).count == 0)


async def test_live_events_reach_a_waiting_client_and_leavers_are_unsubscribed(
    tmp_path: Path,
) -> None:
    # Only the API runs: the task stays pending until the test cancels it.
    async with running_hookline(tmp_path, roles="api") as hl:
        hl.web.sse_ping_s = 0.05
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        url = f"/v1/tasks/{task['id']}/events"
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(hl.client.stream("GET", url, headers=hl.auth(key)))
                for _ in range(5)
            ]
            await until(lambda: broadcaster(hl).count == 5)
            readers = [frames(r) for r in streams]
            first = [await next_state(reader) for reader in readers]
            assert [f.data["state"] for f in first if f.data] == ["pending"] * 5
            assert (await anext(readers[0])).comment == "ping"  # idle streams are kept alive
        # All five hung up mid-stream, without a terminal state: they are gone from the hub.
        await until(lambda: broadcaster(hl).count == 0)

        waiting = asyncio.create_task(state_frames(hl, key, task["id"]))
        await until(lambda: broadcaster(hl).count == 1)
        r = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(key))
        assert r.status_code == 200
        got = await waiting
        assert states(got) == ["pending", "cancelled"]
        assert got[1].data is not None and got[1].data["event"] == "cancel"
        await until(lambda: broadcaster(hl).count == 0)


async def test_garbage_last_event_id_is_a_400_and_subscribes_nobody(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        for garbage in ["not-a-position", "x" * 300, "1.5"]:
            r = await hl.client.get(
                f"/v1/tasks/{task['id']}/events",
                headers=hl.auth(key) | {"Last-Event-ID": garbage},
            )
            assert r.status_code == 400, garbage
            assert r.json()["error"]["code"] == "bad_last_event_id"
        assert broadcaster(hl).count == 0


async def test_a_head_request_answers_at_once_and_holds_no_stream(tmp_path: Path) -> None:
    """Starlette answers HEAD on every GET route: for the stream that must be the headers and an
    empty body, not an endless response holding the connection and a subscription."""
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        async with asyncio.timeout(TIMEOUT_S):
            r = await hl.client.head(f"/v1/tasks/{task['id']}/events", headers=hl.auth(key))
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.content == b""
            # the same connection serves the next request
            assert (await hl.client.get("/healthz")).status_code == 200
        assert broadcaster(hl).count == 0


async def test_another_tasks_last_event_id_yields_only_this_tasks_events(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        a = await hl.create_task(key)
        b = await hl.create_task(key)
        await hl.wait_terminal(key, a["id"])
        await hl.wait_terminal(key, b["id"])
        feed = await hl.store.feed_after(None, 1000)
        a_created = next(e.position for e in feed if e.task_id == a["id"])
        b_done = [e.position for e in feed if e.task_id == b["id"]][-1]

        # From a point before all of b's events: b's whole life, and nothing of a's.
        got = await state_frames(hl, key, b["id"], last_id=a_created)
        assert {f.data["task_id"] for f in got if f.data} == {b["id"]}
        assert states(got) == FULL_PATH[FULL_PATH.index(states(got)[0]) :]
        assert states(got)[-1] == "completed"

        # From a point after everything of a's: a is over and the client has it all: it ends.
        a_after = [f for f in feed if f.task_id == a["id"] and int(f.position) > int(b_done)]
        got = await state_frames(hl, key, a["id"], last_id=b_done)
        assert states(got) == [e.dest.value for e in a_after]


async def test_streams_are_authenticated_and_private(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        alice = await hl.create_user("alice")
        bob = await hl.create_user("bob")
        task = await hl.create_task(alice)
        url = f"/v1/tasks/{task['id']}/events"
        assert (await hl.client.get(url)).status_code == 401
        assert (await hl.client.get(url, headers=hl.auth("hk_wrong"))).status_code == 401
        r = await hl.client.get(url, headers=hl.auth(bob))
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        r = await hl.client.get(f"{url}?key={alice}")  # keys are never taken from URLs
        assert r.status_code == 401
        assert broadcaster(hl).count == 0


async def test_a_resume_from_the_feeds_start_reads_only_this_tasks_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Last-Event-ID: 0`` once paged through the whole feed for one task; now the store reads
    the task's own events through an index. Other tasks' events fill the feed around it."""
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=1000)
        before = [await hl.create_task(key) for _ in range(3)]
        task = await hl.create_task(key)
        after = [await hl.create_task(key) for _ in range(3)]
        for other in [*before, task, *after]:
            await hl.wait_terminal(key, other["id"])
        whole_feed: list[str | None] = []
        per_task: list[tuple[str, str | None]] = []
        store: Any = hl.store
        feed_after, task_feed_after = store.feed_after, store.task_feed_after

        async def spy_feed_after(position: str | None, limit: int) -> Any:
            whole_feed.append(position)
            return await feed_after(position, limit)

        async def spy_task_feed_after(task_id: str, position: str | None, limit: int) -> Any:
            per_task.append((task_id, position))
            return await task_feed_after(task_id, position, limit)

        monkeypatch.setattr(store, "feed_after", spy_feed_after)
        monkeypatch.setattr(store, "task_feed_after", spy_task_feed_after)
        got = await state_frames(hl, key, task["id"], last_id="0")
        assert states(got) == FULL_PATH
        assert {f.data["task_id"] for f in got if f.data} == {task["id"]}
        assert per_task == [(task["id"], "0")]
        assert "0" not in whole_feed  # the watchers poll from the head; nobody read from 0


async def test_a_resume_from_a_pruned_position_starts_from_the_current_state(
    tmp_path: Path,
) -> None:
    """Retention deleted the events after the client's id: rather than an incomplete history
    (here: nothing, and the stream would end without the terminal state), the current state,
    stamped with the feed's head, as a fresh stream gets."""
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        r = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(key))
        assert r.status_code == 200
        await hl.create_task(key)  # the newest event is another task's
        created = (await hl.store.feed_after(None, 10))[0]
        assert created.task_id == task["id"]
        assert await hl.store.prune_feed(hl.runtime.now() + 86_400, 1000) == 2
        head = await hl.store.feed_head()

        got = await state_frames(hl, key, task["id"], last_id=created.position)
        assert states(got) == ["cancelled"]
        assert got[0].id == head
        await until(lambda: broadcaster(hl).count == 0)


async def test_streams_per_task_and_per_process_are_capped(tmp_path: Path) -> None:
    """A watch link passed around, or a script reopening streams, cannot hold the process's
    memory: beyond ``HOOKLINE_SSE_PER_TASK`` streams of a task, or ``HOOKLINE_SSE_MAX_STREAMS``
    in all, a stream is a 429 ``too_many_streams``; a closed stream frees its place."""
    async with running_hookline(tmp_path, roles="api", sse_per_task=2, sse_max_streams=3) as hl:
        key = await hl.create_user("alice")
        a, b, c = [(await hl.create_task(key))["id"] for _ in range(3)]

        def open_stream(task_id: str) -> Any:
            return hl.client.stream("GET", f"/v1/tasks/{task_id}/events", headers=hl.auth(key))

        async def refused(task_id: str) -> dict[str, Any]:
            r = await hl.client.get(f"/v1/tasks/{task_id}/events", headers=hl.auth(key))
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            error: dict[str, Any] = r.json()["error"]
            assert error["code"] == "too_many_streams"
            return error

        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(open_stream(a))
            async with open_stream(a) as second:
                assert first.status_code == second.status_code == 200
                await until(lambda: broadcaster(hl).count == 2)
                assert "live streams open" in (await refused(a))["message"]
                third = await stack.enter_async_context(open_stream(b))
                assert third.status_code == 200
                await until(lambda: broadcaster(hl).count == 3)
                assert "as many live streams" in (await refused(c))["message"]
            await until(lambda: broadcaster(hl).count == 2)  # the second hung up
            async with open_stream(a) as again:
                assert again.status_code == 200
        await until(lambda: broadcaster(hl).count == 0)
