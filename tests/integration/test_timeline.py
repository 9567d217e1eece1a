"""``GET /v1/tasks/{id}/timeline`` through the real server: a task run on the simulator shows its
transitions, its submit (job id, HTTP status, latency) and the verified webhook with its secrets
redacted; a submit tried twice shows the failed try with its status and code; a forged delivery
to the task's callback URL shows up unverified with its reason, one with a wrong token not at
all; a poll-only provider's task (the DashScope fake) shows its polls; OpenAI's project-level
trigger and the poll it made, and a synchronous call (Seedream) as a submit with its outcome, are
noted too; another user gets the task's 404; the bound per task holds; a timeline that cannot be
written fails neither the task nor the webhook. Every answer conforms to the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from callbacks.errors import RetryableProviderError
from callbacks.standard_webhooks import generate_secret, sign_headers
from statemachine import clock
from statemachine.errors import StoreError
from statemachine.states import State
from statemachine.task import Task
from statemachine.timeline import REDACTED, Note
from tests.fakes.dashscope_fake import DashScopeFake
from tests.fakes.openai_fake import OpenAiFake
from tests.fakes.seedream_fake import SeedreamFake
from tests.integration.test_api import assert_error
from tests.support.hookline import Hookline, install_manual_provider, running_hookline
from tests.support.logs import captured_logs
from tests.support.server import serve_app

HOLD = {"sim_latency": "fixed:600", "sim_webhook_loss": 1.0}  # the task waits in ai_processing
WAIT_S = 30.0

Entries = list[dict[str, Any]]


async def timeline(hl: Hookline, key: str, task_id: str) -> httpx.Response:
    return await hl.client.get(f"/v1/tasks/{task_id}/timeline", headers=hl.auth(key))


async def entries_until(
    hl: Hookline, key: str, task_id: str, done: Callable[[Entries], bool]
) -> Entries:
    """The timeline's entries once ``done`` holds for them (notes are written in the background,
    just after what they describe; a generous bound, no timing is tested)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            r = await timeline(hl, key, task_id)
            assert r.status_code == 200, r.text
            entries: Entries = r.json()["entries"]
            if done(entries):
                await assert_conforms(hl, r)
                return entries
            await asyncio.sleep(0.02)


async def assert_conforms(hl: Hookline, response: httpx.Response) -> None:
    doc = (await hl.client.get("/openapi.json")).json()
    root = {"$ref": "#/components/schemas/TaskTimeline", "components": doc["components"]}
    errors = [
        e.message for e in jsonschema_rs.Draft202012Validator(root).iter_errors(response.json())
    ]
    assert not errors, errors


def of_kind(entries: Entries, kind: str) -> Entries:
    return [e for e in entries if e["kind"] == kind]


async def stored(hl: Hookline, task_id: str) -> Task:
    task = await hl.store.get_task(task_id)
    assert task is not None
    return task


async def until_state(hl: Hookline, task_id: str, state: State) -> Task:
    async with asyncio.timeout(WAIT_S):
        while (task := await stored(hl, task_id)).state is not state:
            await asyncio.sleep(0.02)
    return task


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    async with running_hookline(tmp_path) as running:
        yield running


# --- a task on the simulator ----------------------------------------------------------------------


async def test_a_simulated_task_shows_transitions_submit_and_verified_webhook(
    hl: Hookline,
) -> None:
    key = await hl.create_user("alice", 100)
    created = await hl.create_task(key)
    done = await hl.wait_terminal(key, created["id"])
    assert done["state"] == "completed"
    entries = await entries_until(
        hl, key, created["id"], lambda es: bool(of_kind(es, "webhook") and of_kind(es, "submit"))
    )
    task = await stored(hl, created["id"])

    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    moves = [(e["from"], e["to"], e["event"]) for e in of_kind(entries, "transition")]
    assert moves == [
        (None, "pending", "created"),
        ("pending", "processing", "start"),
        ("processing", "ai_processing", "submitted"),
        ("ai_processing", "watermarking", "ai_succeeded"),
        ("watermarking", "completed", "finished"),
    ]
    (submit,) = of_kind(entries, "submit")
    assert submit["job_id"] == task.provider_job_id is not None
    assert submit["status_code"] in (200, 201)  # the simulator's answer, as the adapter got it
    assert submit["latency_ms"] >= 0 and submit["error"] is None
    assert (submit["provider"], submit["attempt"], submit["try"]) == ("sim", 1, 1)
    assert submit["sync"] is False

    (webhook,) = of_kind(entries, "webhook")
    assert webhook["verified"] is True and webhook["reason"] is None
    assert webhook["job_id"] == task.provider_job_id
    assert webhook["status"] == "succeeded" and webhook["result"]
    headers = webhook["headers"]
    assert webhook["delivery_id"] == headers["webhook-id"]
    assert headers["webhook-signature"] == REDACTED
    assert headers["content-type"].startswith("application/json")
    # the submit came before the submitted transition, the webhook before ai_succeeded
    kinds = [e["kind"] if e["kind"] != "transition" else e["event"] for e in entries]
    assert kinds.index("submit") < kinds.index("submitted")
    assert kinds.index("webhook") < kinds.index("finished")
    raw = json.dumps(entries)
    assert task.callback_token not in raw


# --- forged and unauthenticated deliveries --------------------------------------------------------


async def test_a_forged_webhook_shows_unverified_with_its_reason(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, **HOLD) as hl:
        key = await hl.create_user("alice", 100)
        created = await hl.create_task(key)
        task = await until_state(hl, created["id"], State.AI_PROCESSING)
        body = json.dumps({"id": task.provider_job_id, "status": "succeeded"}).encode()
        forged = sign_headers(generate_secret(), "msg_forged", int(clock.now()), body)
        extra = {
            "Authorization": "Bearer hk_should_not_be_kept",
            "X-Api-Key": "key-should-not-be-kept",
            "Cookie": "session=should-not-be-kept",
            "X-Request-Note": "kept as sent",
        }
        url = f"/v1/callbacks/sim/{task.id}"
        r = await hl.client.post(
            url, params={"token": task.callback_token}, content=body, headers={**forged, **extra}
        )
        assert_error(r, 401, "bad_signature")
        # a wrong token proves nothing about the sender: no note at all
        r = await hl.client.post(url, params={"token": "guess"}, content=body, headers=forged)
        assert_error(r, 401, "bad_token")

        await hl.runtime.background.drain()  # every note the two deliveries left is written
        entries = await entries_until(hl, key, task.id, lambda es: bool(of_kind(es, "webhook")))
        (webhook,) = of_kind(entries, "webhook")
        assert webhook["verified"] is False
        assert webhook["reason"] == "bad_signature" and webhook["message"]
        assert webhook["delivery_id"] is None and webhook["result"] is None
        headers = webhook["headers"]
        for name in ("authorization", "x-api-key", "cookie", "webhook-signature"):
            assert headers[name] == REDACTED, name
        assert headers["x-request-note"] == "kept as sent"
        assert headers["webhook-id"] == "msg_forged"
        assert "should-not-be-kept" not in json.dumps(entries)
        now = await stored(hl, task.id)
        assert (now.state, now.version) == (State.AI_PROCESSING, task.version)


# --- a polled provider ----------------------------------------------------------------------------


async def test_a_poll_only_tasks_timeline_shows_its_polls(tmp_path: Path) -> None:
    fake = DashScopeFake(auto_complete_after=2)
    async with (
        serve_app(fake.app) as url,
        running_hookline(
            tmp_path,
            provider="dashscope",
            dashscope_api_key=fake.key,
            dashscope_base_url=url,
            output_hosts=f"{httpx.URL(url).host}:{httpx.URL(url).port}",
            poll_first_s=0.2,
            poll_interval_s=0.1,
        ) as hl,
    ):
        key = await hl.create_user("alice", 100)
        created = await hl.create_task(key)
        done = await hl.wait_terminal(key, created["id"])
        assert done["state"] == "completed"
        task = await stored(hl, created["id"])

        def settled(es: Entries) -> bool:
            return any(p["status"] == "succeeded" for p in of_kind(es, "poll"))

        entries = await entries_until(hl, key, task.id, settled)
        polls = of_kind(entries, "poll")
        assert len(polls) >= 2
        assert {p["by"] for p in polls} == {"reaper"}
        assert {p["job_id"] for p in polls} == {task.provider_job_id}
        assert {p["provider"] for p in polls} == {"dashscope"}
        assert [p["status"] for p in polls][-1] == "succeeded"
        assert "running" in [p["status"] for p in polls]
        assert all(p["error"] is None and p["latency_ms"] >= 0 for p in polls)
        assert of_kind(entries, "webhook") == []  # nothing called back
        (submit,) = of_kind(entries, "submit")
        assert submit["job_id"] == task.provider_job_id and submit["status_code"] == 200


async def test_a_failed_submit_try_is_noted_with_its_status_and_code(hl: Hookline) -> None:
    """A transient failure is tried again within the step: both tries are on the timeline."""
    manual = await install_manual_provider(hl)
    manual.submit_errors.append(
        RetryableProviderError("manual: HTTP 503: busy", details={"status": 503})
    )
    key = await hl.create_user("root", 100, admin=True)  # may run any configured provider
    created = await hl.create_task(key, provider="manual")
    task = await until_state(hl, created["id"], State.AI_PROCESSING)
    entries = await entries_until(hl, key, task.id, lambda es: len(of_kind(es, "submit")) == 2)
    failed, ok = of_kind(entries, "submit")
    assert (failed["try"], failed["status_code"], failed["job_id"]) == (1, 503, None)
    assert failed["error"] == {"code": "provider_unavailable", "message": "manual: HTTP 503: busy"}
    assert (ok["try"], ok["job_id"], ok["error"]) == (2, task.provider_job_id, None)
    assert ok["status_code"] is None  # the manual provider answers without HTTP
    assert failed["attempt"] == ok["attempt"] == 1


async def test_a_project_webhooks_trigger_shows_the_webhook_and_the_poll_it_made(
    tmp_path: Path,
) -> None:
    """OpenAI's thin project-level event names only the job: it is noted on the job's task, and
    so is the poll that fetched the outcome (``by`` trigger)."""
    fake = OpenAiFake()
    async with (
        serve_app(fake.app) as url,
        running_hookline(
            tmp_path,
            provider="openai",
            openai_api_key=fake.api_key,
            openai_base_url=url,
            openai_webhook_secret=fake.webhook_secret,
        ) as hl,
    ):
        fake.webhook_url = f"{hl.base_url}/v1/callbacks/openai"
        key = await hl.create_user("alice", 100)
        created = await hl.create_task(key)
        task = await until_state(hl, created["id"], State.AI_PROCESSING)
        await fake.complete(fake.latest().id)
        assert (await hl.wait_terminal(key, task.id))["state"] == "completed"

        def polled(es: Entries) -> bool:
            return bool(of_kind(es, "webhook")) and bool(of_kind(es, "poll"))

        entries = await entries_until(hl, key, task.id, polled)
        (webhook,) = of_kind(entries, "webhook")
        assert webhook["verified"] is True and webhook["status"] == "trigger"
        assert webhook["job_id"] == task.provider_job_id and webhook["result"] == "polling"
        assert webhook["headers"]["webhook-signature"] == REDACTED
        (poll,) = of_kind(entries, "poll")
        assert (poll["by"], poll["status"], poll["job_id"]) == (
            "trigger",
            "succeeded",
            task.provider_job_id,
        )


async def test_a_synchronous_call_is_noted_as_a_submit_with_its_outcome(tmp_path: Path) -> None:
    fake = SeedreamFake()
    async with (
        serve_app(fake.app) as url,
        running_hookline(
            tmp_path,
            provider="seedream",
            seedream_api_key=fake.key,
            seedream_base_url=url + "/api/v3",
            output_hosts=f"{httpx.URL(url).host}:{httpx.URL(url).port}",
        ) as hl,
    ):
        key = await hl.create_user("alice", 100)
        created = await hl.create_task(key)
        assert (await hl.wait_terminal(key, created["id"]))["state"] == "completed"
        task = await stored(hl, created["id"])
        entries = await entries_until(hl, key, task.id, lambda es: bool(of_kind(es, "submit")))
        (submit,) = of_kind(entries, "submit")
        assert submit["sync"] is True and submit["outcome"] == "succeeded"
        assert submit["job_id"] == task.provider_job_id and submit["status_code"] == 200
        assert of_kind(entries, "webhook") == of_kind(entries, "poll") == []


# --- who may read it ------------------------------------------------------------------------------


async def test_only_the_owner_and_an_admin_read_a_timeline(hl: Hookline) -> None:
    alice = await hl.create_user("alice", 100)
    bob = await hl.create_user("bob", 100)
    root = await hl.create_user("root", 0, admin=True)
    created = await hl.create_task(alice)
    await hl.wait_terminal(alice, created["id"])
    assert_error(await timeline(hl, bob, created["id"]), 404, "task_not_found")
    assert_error(await timeline(hl, bob, "tsk_" + "0" * 24), 404, "task_not_found")
    assert_error(await hl.client.get(f"/v1/tasks/{created['id']}/timeline"), 401, "missing_key")
    for who in (alice, root):
        r = await timeline(hl, who, created["id"])
        assert r.status_code == 200 and r.json()["task_id"] == created["id"]


# --- the bound, and a timeline that fails ---------------------------------------------------------


async def test_a_note_cut_to_its_size_cap_says_so(hl: Hookline) -> None:
    key = await hl.create_user("alice", 100)
    created = await hl.create_task(key)
    await hl.wait_terminal(key, created["id"])
    assert hl.runtime.timeline is not None
    huge = {"provider": "sim", "job_id": "j" * 20_000, "status_code": 201}
    await hl.runtime.timeline.note(created["id"], "submit", clock.now(), huge)
    entries = (await timeline(hl, key, created["id"])).json()["entries"]
    cut = [e for e in entries if e["kind"] == "submit" and e.get("truncated")]
    assert len(cut) == 1 and len(cut[0]["job_id"] or "") < 20_000
    assert not any(e.get("truncated") for e in entries if e is not cut[0])


async def test_the_bound_per_task_holds_and_the_newest_notes_stay(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, timeline_max_notes=3, **HOLD) as hl:
        key = await hl.create_user("alice", 100)
        created = await hl.create_task(key)
        task = await until_state(hl, created["id"], State.AI_PROCESSING)
        body = b'{"id": "x", "status": "succeeded"}'
        for n in range(6):
            forged = sign_headers(generate_secret(), f"msg_{n}", int(clock.now()), body)
            r = await hl.client.post(
                f"/v1/callbacks/sim/{task.id}",
                params={"token": task.callback_token},
                content=body,
                headers={**forged, "X-N": str(n)},
            )
            assert r.status_code == 401

        def newest_in(es: Entries) -> bool:
            return any(w["headers"].get("x-n") == "5" for w in of_kind(es, "webhook"))

        entries = await entries_until(hl, key, task.id, newest_in)
        notes = [e for e in entries if e["kind"] != "transition"]
        assert [w["headers"]["x-n"] for w in notes] == ["3", "4", "5"]  # the submit went first
        assert len(of_kind(entries, "transition")) == len(task.history) + 1  # not counted


class BrokenTimeline:
    """A timeline whose every write fails, as a store that is down would."""

    def __init__(self) -> None:
        self.tried = 0

    async def open(self) -> None:
        return None

    async def note(self, task_id: str, kind: str, at: float, data: Mapping[str, Any]) -> None:
        self.tried += 1
        raise StoreError("the timeline is down")

    async def notes(self, task_id: str, limit: int) -> list[Note]:
        return []


async def test_a_timeline_that_cannot_be_written_fails_neither_task_nor_webhook(
    hl: Hookline,
) -> None:
    broken = BrokenTimeline()
    hl.runtime.receiver.timeline = broken
    hl.runtime.outcomes.timeline = broken
    key = await hl.create_user("alice", 100)
    with captured_logs() as logs:
        created = await hl.create_task(key)
        done = await hl.wait_terminal(key, created["id"])
        await hl.runtime.drain()
    assert done["state"] == "completed"  # the webhook was answered and applied
    assert broken.tried >= 2  # the submit and the webhook were noted, and failed
    failed = [line for line in logs if line["event"] == "timeline_note_failed"]
    assert {line["kind"] for line in failed} >= {"submit", "webhook"}
    assert all(line["log_level"] == "warning" for line in failed)
