"""Watch links through a real server: a task's ``watch_url`` reads that task and its event stream
without an API key, and nothing else (another task, the list, cancel, rotation, uploads, a POST);
a malformed, tampered, truncated, oversized, expired, rotated or another task's link, or one of a
cancelled task, is a 401 ``invalid_watch_link`` that changes nothing; rotating revokes every older
link (an open stream included) and cancelling revokes them all; watch responses carry CORS ``*``
(errors and preflights too) while key requests keep the configured CORS; the token never reaches
the logs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.http import watch
from service.settings import Settings
from statemachine.task import Task
from tests.support.hookline import Hookline, running_hookline

TIMEOUT_S = 30
ORIGIN = "https://mini.example"


def token_of(watch_url: str) -> str:
    tokens = parse_qs(urlsplit(watch_url).query)["watch"]
    assert len(tokens) == 1
    return tokens[0]


def events_url(watch_url: str) -> str:
    """The stream a link opens: the task's path + ``/events``, the same ``watch`` parameter."""
    parts = urlsplit(watch_url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}/events?{parts.query}"


async def stored(hl: Hookline, task_id: str) -> Task:
    task = await hl.store.get_task(task_id)
    assert task is not None
    return task


async def state_frames(client: httpx.AsyncClient, url: str, **kw: Any) -> list[dict[str, Any]]:
    """The ``data`` of every state frame of a stream, to its end."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT_S), client.stream("GET", url, **kw) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
    return got


def assert_refused(r: httpx.Response, code: str = "invalid_watch_link") -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == code, r.text


async def test_the_link_reads_the_task_and_its_stream_to_the_end_without_a_key(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        created = await hl.create_task(key)
        link = created["watch_url"]
        assert link.startswith(f"{hl.base_url}/v1/tasks/{created['id']}?watch=")
        expires = datetime.fromisoformat(created["watch_expires_at"])
        assert created["watch_expires_at"].endswith("Z")
        lifetime = expires.timestamp() - datetime.fromisoformat(created["created_at"]).timestamp()
        assert hl.settings.watch_ttl_s - 5 <= lifetime <= hl.settings.watch_ttl_s + 5

        states = [f["state"] for f in await state_frames(hl.client, events_url(link))]
        assert states[-1] == "completed" and "cancelled" not in states

        r = await hl.client.get(link)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == created["id"] and body["state"] == "completed" and body["outputs"]
        # a link never renews itself, and its answers are not for caches
        assert "watch_url" not in body and "watch_expires_at" not in body
        assert r.headers["cache-control"] == "no-store"
        image = await hl.client.get(body["outputs"][0]["url"])
        assert image.status_code == 200 and image.content

        # with the key: a fresh link; a list's items carry none
        mine = (await hl.client.get(f"/v1/tasks/{created['id']}", headers=hl.auth(key))).json()
        assert token_of(mine["watch_url"])
        listed = (await hl.client.get("/v1/tasks", headers=hl.auth(key))).json()
        assert [t["id"] for t in listed["items"]] == [created["id"]]
        assert "watch_url" not in listed["items"][0]


async def test_the_link_opens_nothing_else_and_changes_nothing(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:  # tasks stay pending
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        other = await hl.create_task(key)
        token = token_of(task["watch_url"])
        before = await stored(hl, task["id"])
        q = {"watch": token}

        # another task (its own link works: the token is bound to the path's task)
        assert_refused(await hl.client.get(f"/v1/tasks/{other['id']}", params=q))
        assert_refused(await hl.client.get(f"/v1/tasks/{other['id']}/events", params=q))
        assert (await hl.client.get(other["watch_url"])).status_code == 200
        # the key's routes read the key alone
        tid = task["id"]
        keyed = [
            await hl.client.get("/v1/tasks", params=q),
            await hl.client.post(f"/v1/tasks/{tid}/cancel", params=q),
            await hl.client.post(f"/v1/tasks/{tid}/watch_url", params=q),
            await hl.client.post(
                "/v1/uploads", params=q, content=b"x", headers={"Content-Type": "image/png"}
            ),
            await hl.client.post("/v1/tasks", params=q, json={"inputs": [], "prompt": "x"}),
            await hl.client.get("/v1/me", params=q),
            await hl.client.get("/v1/stats", params=q),
        ]
        for r in keyed:
            assert_refused(r, "missing_key")
        # the task's other reads
        for extra in ("timeline", "deliveries"):
            assert_refused(await hl.client.get(f"/v1/tasks/{tid}/{extra}", params=q), "missing_key")
        assert_refused(await hl.client.get("/v1/webhooks", params=q), "missing_key")
        # a POST on the link's own path is no read
        assert (await hl.client.post(f"/v1/tasks/{tid}", params=q)).status_code == 405

        after = await stored(hl, task["id"])
        assert (after.version, after.state, after.watch_rev) == (
            before.version,
            before.state,
            before.watch_rev,
        )
        assert (await hl.client.get(task["watch_url"])).status_code == 200


async def test_the_key_decides_when_both_are_sent(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        bob = await hl.create_user("bob")
        task = await hl.create_task(key)
        link = task["watch_url"]
        assert_refused(await hl.client.get(link, headers=hl.auth("hk_" + "W" * 43)), "invalid_key")
        assert (await hl.client.get(link, headers=hl.auth(bob))).status_code == 404
        mine = await hl.client.get(link, headers=hl.auth(key))
        assert mine.status_code == 200 and "watch_url" in mine.json()
        # a bad link beside a good key: the key's answer
        r = await hl.client.get(f"/v1/tasks/{task['id']}?watch=junk", headers=hl.auth(key))
        assert r.status_code == 200


async def test_bad_links_are_401_before_any_read_and_change_nothing(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api", auth_failure_rate_per_s=0) as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        tid = task["id"]
        token = token_of(task["watch_url"])
        exp, rev, mac = token.split(".")
        links = watch.signer(hl.settings)
        now = int(hl.runtime.now())
        flipped = mac[:10] + ("A" if mac[10] != "A" else "B") + mac[11:]
        raw_secret = (Path(hl.settings.var_dir) / "secret.key").read_text().strip()
        underived = base64.urlsafe_b64encode(
            hmac.new(
                bytes.fromhex(raw_secret), f"{tid}\n{rev}\n{exp}".encode(), hashlib.sha256
            ).digest()
        )
        file_style = base64.urlsafe_b64encode(  # what a file URL signs: "key\nexp"
            hmac.new(bytes.fromhex(raw_secret), f"{tid}\n{exp}".encode(), hashlib.sha256).digest()
        )
        bad = {
            "tampered": f"{exp}.{rev}.{flipped}",
            "truncated": token[:-5],
            "oversized": token + "A" * 200,
            "huge": "1." * 5000,
            "empty": "",
            "later expiry": f"{int(exp) + 3600}.{rev}.{mac}",
            "another revision": links.token(tid, int(rev) + 1, int(exp)),
            "expired": links.token(tid, int(rev), now - 1),
            "leading zero": f"0{exp}.{rev}.{mac}",
            "not derived": f"{exp}.{rev}.{underived.rstrip(b'=').decode()}",
            "file-URL signature": f"{exp}.{rev}.{file_style.rstrip(b'=').decode()}",
            "other secret": watch.WatchSigner(b"x" * 32, hl.base_url, 60).token(tid, 0, now + 60),
            "non-ascii digits": f"{'١' * 3}.{rev}.{mac}",
        }
        before = await stored(hl, tid)
        reads = 0
        real_get = hl.store.get_task

        async def counting_get(task_id: str) -> Task | None:
            nonlocal reads
            reads += 1
            return await real_get(task_id)

        hl.store.get_task = counting_get  # type: ignore[method-assign]
        try:
            for name, value in bad.items():
                for path in (f"/v1/tasks/{tid}", f"/v1/tasks/{tid}/events"):
                    r = await hl.client.get(path, params={"watch": value})
                    assert r.status_code == 401, (name, path, r.text)
                    assert r.json()["error"]["code"] == "invalid_watch_link", name
                    assert token not in r.text
            # a genuine token of an older revision is the only one that reaches the store
            assert reads == 2
            two = await hl.client.get(f"/v1/tasks/{tid}?watch={token}&watch={token}")
            assert_refused(two)
        finally:
            hl.store.get_task = real_get  # type: ignore[method-assign]
        expired = await hl.client.get(f"/v1/tasks/{tid}", params={"watch": bad["expired"]})
        assert "expired" in expired.json()["error"]["message"]
        after = await stored(hl, tid)
        assert (after.version, after.watch_rev, after.state) == (
            before.version,
            before.watch_rev,
            before.state,
        )
        assert (await hl.client.get(task["watch_url"])).status_code == 200


async def test_refused_links_count_as_failed_authentications(tmp_path: Path) -> None:
    async with running_hookline(
        tmp_path, roles="api", auth_failure_burst=2, auth_failure_rate_per_s=0.001
    ) as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        bogus = f"/v1/tasks/{task['id']}?watch=1.0.{'A' * 43}"
        assert [(await hl.client.get(bogus)).status_code for _ in range(3)] == [401, 401, 429]
        assert (await hl.client.get(task["watch_url"])).status_code == 200  # a real one passes


async def test_rotation_revokes_every_older_link_and_ends_its_streams(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        hl.web.sse_ping_s = 0.05
        key = await hl.create_user("alice")
        root = await hl.create_user("root", credits=0, admin=True)
        bob = await hl.create_user("bob")
        task = await hl.create_task(key)
        tid = task["id"]
        old = task["watch_url"]
        before = await stored(hl, tid)

        async with asyncio.timeout(TIMEOUT_S), hl.client.stream("GET", events_url(old)) as s:
            assert s.status_code == 200
            lines = s.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            r = await hl.client.post(f"/v1/tasks/{tid}/watch_url", headers=hl.auth(key))
            assert r.status_code == 200, r.text
            rest = [line async for line in lines]  # the stream ends at its next ping
        assert not any(line.startswith("data: ") for line in rest)

        new = r.json()["watch_url"]
        assert token_of(new) != token_of(old)
        assert_refused(await hl.client.get(old))
        assert_refused(await hl.client.get(events_url(old)))
        assert (await hl.client.get(new)).status_code == 200
        after = await stored(hl, tid)
        # a quiet write: the revision moved, nothing else (no state, no history, no event)
        assert after.watch_rev == before.watch_rev + 1
        assert after.version == before.version + 1
        assert (after.state, after.history, after.updated_at) == (
            before.state,
            before.history,
            before.updated_at,
        )
        assert len(await hl.store.task_feed_after(tid, "0", 10)) == 1  # the creation alone

        # only the owner or an admin rotates; anyone else finds no task
        r = await hl.client.post(f"/v1/tasks/{tid}/watch_url", headers=hl.auth(bob))
        assert r.status_code == 404
        r = await hl.client.post(f"/v1/tasks/{tid}/watch_url", headers=hl.auth(root))
        assert r.status_code == 200
        assert_refused(await hl.client.get(new))
        assert (await hl.client.get(r.json()["watch_url"])).status_code == 200
        assert_refused(await hl.client.post(f"/v1/tasks/{tid}/watch_url"), "missing_key")


async def test_a_stream_ends_and_the_link_is_refused_once_it_expires(tmp_path: Path) -> None:
    """On the app's injectable clock (roles "api": no loop but the HTTP layer reads it)."""
    async with running_hookline(tmp_path, roles="api") as hl:
        hl.web.sse_ping_s = 0.05
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        link = task["watch_url"]
        later = hl.runtime.now() + hl.settings.watch_ttl_s + 1
        async with asyncio.timeout(TIMEOUT_S), hl.client.stream("GET", events_url(link)) as s:
            lines = s.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            hl.runtime.now = lambda: later
            rest = [line async for line in lines]  # ends at the next ping
        assert not any(line.startswith("data: ") for line in rest)
        r = await hl.client.get(link)
        assert_refused(r)
        expires = datetime.fromisoformat(task["watch_expires_at"]).timestamp()
        assert r.json()["error"]["details"] == {"expired_at": int(expires)}


async def test_concurrent_rotations_each_win_once(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        url = f"/v1/tasks/{task['id']}/watch_url"
        answers = await asyncio.gather(
            *(hl.client.post(url, headers=hl.auth(key)) for _ in range(8))
        )
        assert [r.status_code for r in answers] == [200] * 8
        assert (await stored(hl, task["id"])).watch_rev == 8
        working = [r for r in answers if (await hl.client.get(r.json()["watch_url"])).is_success]
        assert len(working) == 1  # the last rotation's link alone


async def test_cancelling_revokes_the_link(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        link = task["watch_url"]
        assert (await hl.client.get(link)).status_code == 200
        cancelled = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(key))
        assert cancelled.status_code == 200 and "watch_url" not in cancelled.json()
        r = await hl.client.get(link)
        assert_refused(r)
        assert "cancelled" in r.json()["error"]["message"]
        assert_refused(await hl.client.get(events_url(link)))
        mine = (await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(key))).json()
        assert mine["state"] == "cancelled" and "watch_url" not in mine
        r = await hl.client.post(f"/v1/tasks/{task['id']}/watch_url", headers=hl.auth(key))
        assert r.status_code == 409 and r.json()["error"]["code"] == "task_cancelled"


def allows_any_origin(r: httpx.Response) -> bool:
    return (
        r.headers.get_list("access-control-allow-origin") == ["*"]
        and "access-control-allow-credentials" not in r.headers
    )


async def test_watch_responses_carry_cors_and_key_responses_do_not(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        link = task["watch_url"]
        origin = {"Origin": ORIGIN}
        assert allows_any_origin(await hl.client.get(link, headers=origin))
        bad = await hl.client.get(f"/v1/tasks/{task['id']}?watch=nope", headers=origin)
        assert bad.status_code == 401 and allows_any_origin(bad)
        head = await hl.client.head(events_url(link), headers=origin)
        assert head.status_code == 200 and allows_any_origin(head)
        async with hl.client.stream("GET", events_url(link), headers=origin) as stream:
            assert stream.status_code == 200 and allows_any_origin(stream)

        preflight = await hl.client.options(
            events_url(link),
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
        assert preflight.status_code == 204 and allows_any_origin(preflight)
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert "authorization" not in preflight.headers["access-control-allow-headers"].lower()

        # no CORS origins configured: nothing opens for the key, nor for a key's preflight
        keyed = await hl.client.get(f"/v1/tasks/{task['id']}", headers={**origin, **hl.auth(key)})
        assert keyed.status_code == 200 and "access-control-allow-origin" not in keyed.headers
        both = await hl.client.get(link, headers={**origin, **hl.auth(key)})
        assert both.status_code == 200 and "access-control-allow-origin" not in both.headers
        asks_for_key = await hl.client.options(
            link,
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert "access-control-allow-origin" not in asks_for_key.headers
        for path in ("/v1/tasks", f"/v1/tasks/{task['id']}/cancel"):
            r = await hl.client.options(
                path, headers={**origin, "Access-Control-Request-Method": "POST"}
            )
            assert "access-control-allow-origin" not in r.headers
        cancel = await hl.client.post(
            f"/v1/tasks/{task['id']}/cancel", params={"watch": token_of(link)}, headers=origin
        )
        assert cancel.status_code == 401 and "access-control-allow-origin" not in cancel.headers


async def test_configured_cors_and_watch_cors_do_not_fight(tmp_path: Path) -> None:
    app_origin = "https://app.example"
    async with running_hookline(tmp_path, roles="api", cors_origins=app_origin) as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        link = task["watch_url"]
        # a watch request: "*" once, whichever origin, the configured one included
        for origin in (ORIGIN, app_origin):
            r = await hl.client.get(link, headers={"Origin": origin})
            assert r.status_code == 200 and allows_any_origin(r), r.headers
        # a key's request and its preflight: the configured origin, as before
        keyed = await hl.client.get(
            f"/v1/tasks/{task['id']}", headers={"Origin": app_origin, **hl.auth(key)}
        )
        assert keyed.headers["access-control-allow-origin"] == app_origin
        for url in (f"/v1/tasks/{task['id']}", link):
            preflight = await hl.client.options(
                url,
                headers={
                    "Origin": app_origin,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == app_origin
        evil = await hl.client.get(
            f"/v1/tasks/{task['id']}", headers={"Origin": ORIGIN, **hl.auth(key)}
        )
        assert "access-control-allow-origin" not in evil.headers


async def test_the_token_never_reaches_the_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """With debug logs on: the link read, streamed, refused tampered, rotated and cancelled."""
    async with running_hookline(tmp_path, log_level="debug", log_format="json") as hl:
        key = await hl.create_user("alice")
        task = await hl.create_task(key)
        link = task["watch_url"]
        token = token_of(link)
        await state_frames(hl.client, events_url(link))
        assert (await hl.client.get(link)).status_code == 200
        assert (await hl.client.get(link + "x")).status_code == 401
        r = await hl.client.post(f"/v1/tasks/{task['id']}/watch_url", headers=hl.auth(key))
        newer = token_of(r.json()["watch_url"])
        assert (await hl.client.get(link)).status_code == 401
    out, err = capfd.readouterr()
    logs = out + err
    assert "transition" in logs  # the capture does see the service's logs
    for secret in (token, newer, token.rsplit(".", 1)[1], newer.rsplit(".", 1)[1]):
        assert secret not in logs


def test_the_watch_ttl_is_bounded() -> None:
    def load(**values: Any) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    assert load().watch_ttl_s == 86_400
    for wrong in (0, 59, 30 * 86_400 + 1, -1):
        with pytest.raises(ValueError):
            load(watch_ttl_s=wrong)
