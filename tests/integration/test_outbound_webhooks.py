"""Outbound webhooks through the real server: a loopback receiver verifying with the
``standardwebhooks`` library gets each event once per ``webhook-id``; failures are retried with
growing gaps; a redirect is not followed; 410 disables the endpoint; loopback and private
destinations are refused unless listed; rotation signs with both secrets for the overlap; a task's
own destination is signed with its owner's secret; deliveries are listed and replayed; another
user sees none of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.hookline import Hookline, running_hookline
from tests.support.server import serve_app

pytestmark = pytest.mark.asyncio

BOUND_S = 30.0


@dataclass
class Received:
    webhook_id: str
    timestamp: str
    signature: str
    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Receiver:
    """A loopback webhook receiver: records every request; ``answers`` gives each one's status
    (then 204 when it runs out); ``secrets`` is set by the test to verify with."""

    url: str = ""
    secrets: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    verified: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def endpoint(self, request: Request) -> Response:
        raw = await request.body()
        headers = {k: v for k, v in request.headers.items()}
        item = Received(
            headers.get("webhook-id", ""),
            headers.get("webhook-timestamp", ""),
            headers.get("webhook-signature", ""),
            json.loads(raw) if raw else {},
            raw,
            headers,
            asyncio.get_running_loop().time(),
        )
        self.got.append(item)
        for secret in self.secrets:
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(raw, headers)
                self.verified.append(item)
                break
        self.arrived.set()
        status = self.answers.pop(0) if self.answers else 204
        extra = {"location": self.url + "elsewhere"} if 300 <= status < 400 else {}
        return Response(status_code=status, headers=extra)

    async def wait_for(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(BOUND_S):
            while not done():
                self.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), 0.5)


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/{path:path}", receiver.endpoint, methods=["POST", "GET"])])
    async with serve_app(app) as url:
        receiver.url = url + "/hook/"
        yield receiver


@contextlib.asynccontextmanager
async def world(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Hookline, Receiver]]:
    async with receiving() as receiver:
        values: dict[str, Any] = {
            "webhook_hosts": "127.0.0.1",
            "webhook_retry_base_s": 0.2,
            "webhook_poll_s": 0.05,
            **overrides,
        }
        async with running_hookline(tmp_path, **values) as hl:
            yield hl, receiver


async def register(hl: Hookline, key: str, url: str, **body: Any) -> dict[str, Any]:
    r = await hl.client.post("/v1/webhooks", json={"url": url, **body}, headers=hl.auth(key))
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


async def deliveries(hl: Hookline, key: str, task_id: str) -> list[dict[str, Any]]:
    r = await hl.client.get(f"/v1/tasks/{task_id}/deliveries", headers=hl.auth(key))
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def settled(hl: Hookline, key: str, task_id: str, n: int = 1) -> list[dict[str, Any]]:
    async with asyncio.timeout(BOUND_S):
        while True:
            items = await deliveries(hl, key, task_id)
            if len(items) >= n and all(i["state"] != "pending" for i in items):
                return items
            await asyncio.sleep(0.05)


async def tried(hl: Hookline, key: str, task_id: str, n: int) -> dict[str, Any]:
    """The task's one delivery, once it has had ``n`` tries."""
    async with asyncio.timeout(BOUND_S):
        while True:
            (item,) = await deliveries(hl, key, task_id) or [None]
            if item is not None and len(item["attempts"]) >= n:
                return item
            await asyncio.sleep(0.05)


async def test_a_completed_task_is_told_once_signed_with_the_task_as_data(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url)
        assert made["secret"].startswith("whsec_")
        assert made["events"] == ["task.cancelled", "task.completed", "task.failed"]
        receiver.secrets.append(made["secret"])
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert [r.webhook_id for r in receiver.verified] == [item["id"]]
        got = receiver.verified[0]
        assert got.body["type"] == "task.completed"
        assert got.body["created_at"].endswith("Z")
        data = got.body["data"]
        assert (data["id"], data["state"]) == (task["id"], "completed")
        shown = (await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(key))).json()
        assert data["outputs"][0]["width"] == shown["outputs"][0]["width"]
        assert set(data) == set(shown)  # the task as GET /v1/tasks/{id} shows it
        assert got.headers["content-type"] == "application/json"
        assert item["state"] == "delivered" and item["endpoint_id"] == made["id"]
        (attempt,) = item["attempts"]
        assert attempt["status_code"] == 204 and attempt["next_retry_at"] is None
        # the secret is shown only when made
        listed = (await hl.client.get("/v1/webhooks", headers=hl.auth(key))).json()["items"]
        assert [e["id"] for e in listed] == [made["id"]]
        assert "secret" not in listed[0]


async def test_every_change_reaches_an_endpoint_subscribed_to_all(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url, events=["task.*"])
        receiver.secrets.append(made["secret"])
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        await receiver.wait_for(lambda: any(r.body["type"] == "task.completed"
                                            for r in receiver.verified))  # fmt: skip
        await settled(hl, key, task["id"], n=5)
        types = [r.body["type"] for r in receiver.verified]
        assert set(types) >= {"task.processing", "task.ai_processing", "task.watermarking"}
        assert types.count("task.completed") == 1
        assert len({r.webhook_id for r in receiver.verified}) == len(types)


async def test_a_failing_receiver_sees_three_tries_with_growing_gaps(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url)
        receiver.secrets.append(made["secret"])
        receiver.answers = [500, 500, 200]
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["state"] == "delivered"
        assert len(receiver.verified) == 3
        assert len({r.webhook_id for r in receiver.verified}) == 1  # stable across retries
        first, second, third = item["attempts"]
        assert [a["status_code"] for a in item["attempts"]] == [500, 500, 200]
        assert first["error"] == "HTTP 500" and third["next_retry_at"] is None

        def gap(a: dict[str, Any]) -> float:
            # the schedule counts from the try's end: its latency is not part of the backoff
            return iso_s(a["next_retry_at"]) - iso_s(a["at"]) - a["latency_ms"] / 1000

        base = 0.2
        assert 0.75 * base - 0.002 <= gap(first) <= base + 0.002  # ISO times are to the µs
        assert 1.5 * base - 0.002 <= gap(second) <= 2 * base + 0.002
        assert gap(second) > gap(first)
        # the receiver saw nothing early: each try came no sooner than its schedule allowed
        t1, t2, t3 = (r.at for r in receiver.verified)
        assert t2 - t1 >= 0.75 * base - 0.02 and t3 - t2 >= 1.5 * base - 0.02


def iso_s(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_a_message_fails_after_the_horizon(tmp_path: Path) -> None:
    # 0.2 s, then 0.4 s, 0.8 s: the second try is due within the horizon however late the
    # first one started, and the fourth gap is past it
    async with world(tmp_path, webhook_retry_horizon_s=1.5) as (hl, receiver):
        key = await hl.create_user("alice")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        receiver.answers = [503] * 50
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["state"] == "failed"
        assert item["attempts"][-1]["next_retry_at"] is None
        assert 2 <= len(item["attempts"]) == len(receiver.got)


async def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    async with world(tmp_path, webhook_retry_horizon_s=0.3) as (hl, receiver):
        key = await hl.create_user("alice")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        receiver.answers = [302] * 50
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["state"] == "failed"
        assert {a["status_code"] for a in item["attempts"]} == {302}
        assert all(r.headers.get("webhook-id") for r in receiver.got)
        assert not any("elsewhere" in r.headers.get("host", "") for r in receiver.got)
        assert len(receiver.got) == len(item["attempts"])  # never the redirect's target


async def test_gone_disables_the_endpoint(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url)
        receiver.secrets.append(made["secret"])
        receiver.answers = [410]
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["state"] == "failed" and item["attempts"][0]["error"] == "gone"
        (endpoint,) = (await hl.client.get("/v1/webhooks", headers=hl.auth(key))).json()["items"]
        assert endpoint["disabled_reason"] == "410 Gone" and endpoint["disabled_at"]
        second = await hl.create_task(key)
        await hl.wait_terminal(key, second["id"])
        await asyncio.sleep(0.3)  # the feeder had its chance to queue one
        for later in await deliveries(hl, key, second["id"]):
            # queued before the feeder heard: it fails without a request
            assert later["attempts"][0]["error"] == "endpoint_disabled"
        assert len(receiver.got) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",  # loopback, plain http
        "https://127.0.0.1/hook",  # loopback over https
        "https://10.1.2.3/hook",  # private
        "https://169.254.169.254/latest",  # cloud metadata
        "https://[::1]/hook",  # IPv6 loopback
        "https://user:pw@hooks.example.com/x",  # credentials
        "http://hooks.example.com/x",  # plain http to a public host
    ],
)
async def test_unlisted_loopback_private_or_plain_destinations_are_refused(
    tmp_path: Path, url: str
) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        r = await hl.client.post("/v1/webhooks", json={"url": url}, headers=hl.auth(key))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] in {"webhook_url_forbidden", "webhook_url_invalid"}
        assert (await hl.client.get("/v1/webhooks", headers=hl.auth(key))).json()["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"url": "https://hooks.example.com/x", "events": ["task.exploded"]},
        {"url": "https://hooks.example.com/x", "events": []},
        {"url": "ftp://hooks.example.com/x"},
        {"url": "https://hooks.example.com/x", "extra": 1},
        {"events": ["task.completed"]},
        {"url": "https://" + "a" * 3000 + ".com/"},
        {"url": "https://a..com/x"},  # an empty label
        {"url": "https://" + "b" * 64 + ".com/x"},  # a label over 63 characters
        {"url": "https://xn--a.com/x"},  # not IDNA
    ],
)
async def test_bad_registrations_get_a_clear_error(tmp_path: Path, body: dict[str, Any]) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        r = await hl.client.post("/v1/webhooks", json=body, headers=hl.auth(key))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"]
        assert (await hl.client.get("/v1/webhooks", headers=hl.auth(key))).json()["items"] == []


async def test_endpoints_need_a_key_and_are_limited_per_user(tmp_path: Path) -> None:
    async with world(tmp_path, webhook_max_endpoints=2) as (hl, receiver):
        key = await hl.create_user("alice")
        assert (await hl.client.post("/v1/webhooks", json={"url": receiver.url})).status_code == 401
        await register(hl, key, receiver.url)
        await register(hl, key, receiver.url + "2")
        r = await hl.client.post(
            "/v1/webhooks", json={"url": receiver.url + "3"}, headers=hl.auth(key)
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_webhooks"


async def test_rotation_signs_with_both_secrets_during_the_overlap(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url)
        r = await hl.client.post(f"/v1/webhooks/{made['id']}/rotate", headers=hl.auth(key))
        assert r.status_code == 200, r.text
        rotated = r.json()
        assert rotated["secret"] != made["secret"] and rotated["previous_secret_expires_at"]
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        await settled(hl, key, task["id"])
        (got,) = receiver.got
        assert len(got.signature.split(" ")) == 2
        for secret in (made["secret"], rotated["secret"]):
            Webhook(secret).verify(got.raw, got.headers)  # either secret verifies


async def test_rotation_without_overlap_drops_the_old_secret(tmp_path: Path) -> None:
    async with world(tmp_path, webhook_secret_overlap_s=0) as (hl, receiver):
        key = await hl.create_user("alice")
        made = await register(hl, key, receiver.url)
        rotated = (
            await hl.client.post(f"/v1/webhooks/{made['id']}/rotate", headers=hl.auth(key))
        ).json()
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        await settled(hl, key, task["id"])
        (got,) = receiver.got
        Webhook(rotated["secret"]).verify(got.raw, got.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(made["secret"]).verify(got.raw, got.headers)


async def test_a_tasks_own_destination_is_signed_with_the_owners_secret(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        upload = await hl.upload(key)
        body = {"inputs": [{"upload": upload}], "prompt": "p", "webhook": receiver.url}
        r = await hl.client.post("/v1/tasks", json=body, headers=hl.auth(key))
        assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_secret_missing"
        assert (await hl.client.get("/v1/tasks", headers=hl.auth(key))).json()["items"] == []
        r = await hl.client.post("/v1/webhooks/secret", headers=hl.auth(key))
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        receiver.secrets.append(secret)
        r = await hl.client.post("/v1/tasks", json=body, headers=hl.auth(key))
        assert r.status_code == 202, r.text
        task = r.json()
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["endpoint_id"] == "task" and item["state"] == "delivered"
        (got,) = receiver.verified
        assert got.body["type"] == "task.completed" and got.body["data"]["id"] == task["id"]
        # a task's own destination follows the same rules
        body["webhook"] = "https://10.0.0.1/hook"
        r = await hl.client.post("/v1/tasks", json=body, headers=hl.auth(key))
        assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_url_forbidden"
        # rotating the owner's secret: the new one is shown, the old one still signs a while
        r = await hl.client.post("/v1/webhooks/secret", headers=hl.auth(key))
        assert r.status_code == 200 and r.json()["previous_secret_expires_at"]


async def test_a_delivery_is_replayed_with_its_id_and_hidden_from_others(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        other = await hl.create_user("mallory")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        r = await hl.client.get(f"/v1/tasks/{task['id']}/deliveries", headers=hl.auth(other))
        assert r.status_code == 404
        r = await hl.client.post(f"/v1/deliveries/{item['id']}/replay", headers=hl.auth(other))
        assert r.status_code == 404 and r.json()["error"]["code"] == "delivery_not_found"
        assert len(receiver.got) == 1
        r = await hl.client.post(f"/v1/deliveries/{item['id']}/replay", headers=hl.auth(key))
        assert r.status_code == 202, r.text
        await receiver.wait_for(lambda: len(receiver.verified) == 2)
        assert receiver.verified[0].webhook_id == receiver.verified[1].webhook_id == item["id"]
        assert receiver.verified[0].raw == receiver.verified[1].raw
        r = await hl.client.delete(f"/v1/webhooks/{item['endpoint_id']}", headers=hl.auth(other))
        assert r.status_code == 404
        r = await hl.client.delete(f"/v1/webhooks/{item['endpoint_id']}", headers=hl.auth(key))
        assert r.status_code == 204


async def test_metrics_count_deliveries_and_show_the_outbox(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        receiver.answers = [500]
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        await settled(hl, key, task["id"])
        text = (await hl.client.get("/metrics")).text
        assert 'hookline_outbound_deliveries_total{outcome="delivered"} 1.0' in text
        assert 'hookline_outbound_deliveries_total{outcome="retried"} 1.0' in text
        assert "hookline_outbox_depth 0.0" in text
        assert "hookline_outbox_oldest_pending_seconds 0.0" in text


async def test_an_unreachable_receiver_is_retried_not_lost(tmp_path: Path) -> None:
    async with receiving() as receiver:
        dead = httpx.URL(receiver.url).copy_with(port=1)  # nothing listens on port 1
        async with running_hookline(
            tmp_path, webhook_hosts="127.0.0.1", webhook_retry_base_s=0.1, webhook_poll_s=0.05
        ) as hl:
            key = await hl.create_user("alice")
            await register(hl, key, str(dead))
            task = await hl.create_task(key)
            await hl.wait_terminal(key, task["id"])
            item = await tried(hl, key, task["id"], 2)
            assert item["state"] == "pending"
            assert item["attempts"][0]["status_code"] is None
            assert item["attempts"][0]["error"].startswith("url_unreachable")


async def test_a_receiver_answering_malformed_http_is_a_failed_try(tmp_path: Path) -> None:
    """A header line without a colon: the try is recorded as failed and retried (an error the
    client did not translate left the message unrecorded, sent again after every lease)."""

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nNo Colon Here\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        async with running_hookline(
            tmp_path, webhook_hosts="127.0.0.1", webhook_retry_base_s=0.1, webhook_poll_s=0.05
        ) as hl:
            key = await hl.create_user("alice")
            await register(hl, key, url)
            task = await hl.create_task(key)
            await hl.wait_terminal(key, task["id"])
            item = await tried(hl, key, task["id"], 2)
    finally:
        server.close()
    assert item["state"] == "pending"
    assert [a["status_code"] for a in item["attempts"][:2]] == [None, None]
    assert all(a["error"].startswith("url_unreachable") for a in item["attempts"][:2])


async def test_each_try_is_on_the_tasks_timeline(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        receiver.answers = [500]
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        async with asyncio.timeout(BOUND_S):
            while True:
                r = await hl.client.get(f"/v1/tasks/{task['id']}/timeline", headers=hl.auth(key))
                assert r.status_code == 200, r.text
                tries = [e for e in r.json()["entries"] if e["kind"] == "delivery"]
                if len(tries) == 2:
                    break
                await asyncio.sleep(0.05)
        assert [t["status_code"] for t in tries] == [500, 204]
        assert {t["webhook_id"] for t in tries} == {item["id"]}
        assert tries[0]["next_retry_at"] is not None


async def test_a_message_being_sent_cannot_be_replayed_into_a_second_send(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        receiver.secrets.append((await register(hl, key, receiver.url))["secret"])
        task = await hl.create_task(key)
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        outbox = hl.runtime.outbox
        assert outbox is not None
        # another worker is sending it: replayed for later, then claimed with a live lease
        later = hl.runtime.now() + 30
        await outbox.replay(item["id"], later)
        (held,) = await outbox.claim(later, "elsewhere", 60, 1, per_destination=9)
        assert held.id == item["id"]
        r = await hl.client.post(f"/v1/deliveries/{item['id']}/replay", headers=hl.auth(key))
        assert r.status_code == 409 and r.json()["error"]["code"] == "delivery_in_flight"
        assert len(receiver.got) == 1


async def test_a_hanging_receiver_does_not_hold_up_another_users_deliveries(
    tmp_path: Path,
) -> None:
    hang = asyncio.Event()

    async def stuck(request: Request) -> Response:
        await hang.wait()
        return Response(status_code=204)

    stuck_app = Starlette(routes=[Route("/{path:path}", stuck, methods=["POST"])])
    async with (
        serve_app(stuck_app) as stuck_url,
        world(tmp_path, webhook_concurrency=4, webhook_per_destination=2) as (hl, receiver),
    ):
        mallory = await hl.create_user("mallory")
        alice = await hl.create_user("alice")
        await register(hl, mallory, stuck_url + "/a", events=["task.*"])
        receiver.secrets.append((await register(hl, alice, receiver.url))["secret"])
        for _ in range(3):  # 15 messages to a receiver that never answers
            await hl.wait_terminal(mallory, (await hl.create_task(mallory))["id"])
        task = await hl.create_task(alice)
        await hl.wait_terminal(alice, task["id"])
        await receiver.wait_for(lambda: len(receiver.verified) == 1)
        assert receiver.verified[0].body["data"]["id"] == task["id"]
        hang.set()


async def test_a_task_destination_answering_gone_is_not_retried(tmp_path: Path) -> None:
    async with world(tmp_path) as (hl, receiver):
        key = await hl.create_user("alice")
        await hl.client.post("/v1/webhooks/secret", headers=hl.auth(key))
        receiver.answers = [410]
        upload = await hl.upload(key)
        body = {"inputs": [{"upload": upload}], "prompt": "p", "webhook": receiver.url}
        task = (await hl.client.post("/v1/tasks", json=body, headers=hl.auth(key))).json()
        await hl.wait_terminal(key, task["id"])
        (item,) = await settled(hl, key, task["id"])
        assert item["state"] == "failed" and item["attempts"][-1]["error"] == "gone"
        assert len(receiver.got) == 1
