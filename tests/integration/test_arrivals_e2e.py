"""One task end to end through the real server for each way an outcome arrives that the webhook
tests (test_lifecycle_e2e, the simulator) do not cover (issue 15): a thin project-level event
confirmed by a poll (OpenAI), poll-only (DashScope: the reaper polls on the schedule), and a
synchronous call (Seedream). Each provider is configured through its settings, as an operator
does, against its faithful fake over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbacks import standard_webhooks
from statemachine.states import State
from tests.fakes.dashscope_fake import DashScopeFake
from tests.fakes.kling_fake import KlingFake
from tests.fakes.openai_fake import OpenAiFake
from tests.fakes.seedream_fake import SeedreamFake
from tests.support.hookline import Hookline, running_hookline
from tests.support.server import serve_app

WAIT_S = 30.0


def host_port(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port}"


async def until(check: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)


async def until_state(hl: Hookline, task_id: str, state: State) -> None:
    async with asyncio.timeout(WAIT_S):
        while (task := await hl.store.get_task(task_id)) is None or task.state is not state:
            await asyncio.sleep(0.01)


# --- OpenAI: a project-level thin event, confirmed by fetching the response -----------------------


@pytest.fixture
async def openai() -> AsyncIterator[tuple[OpenAiFake, str]]:
    fake = OpenAiFake()
    async with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
async def hl_openai(
    tmp_path: Path, openai: tuple[OpenAiFake, str]
) -> AsyncIterator[tuple[Hookline, OpenAiFake]]:
    fake, url = openai
    async with running_hookline(
        tmp_path,
        provider="openai",
        openai_api_key=fake.api_key,
        openai_base_url=url,
        openai_webhook_secret=fake.webhook_secret,
    ) as hl:
        fake.webhook_url = f"{hl.base_url}/v1/callbacks/openai"
        yield hl, fake


async def test_openai_event_is_mapped_by_job_id_and_the_image_bytes_are_stored(
    hl_openai: tuple[Hookline, OpenAiFake],
) -> None:
    hl, fake = hl_openai
    key = await hl.create_user("alice", credits=100)
    task = await hl.create_task(key)
    await until(lambda: fake.responses)
    response = fake.latest()
    await until_state(hl, task["id"], State.AI_PROCESSING)
    await fake.complete(response.id)  # the signed thin event to /v1/callbacks/openai
    done = await hl.wait_terminal(key, task["id"])
    assert done["state"] == "completed" and len(done["outputs"]) == 1
    stored = await hl.store.get_task(task["id"])
    assert stored is not None and stored.provider_job_id == response.id
    (ref,) = stored.provider_outputs
    assert ref.startswith("blob:")  # the bytes, stored at once; the record stays small
    assert fake.fetches(response.id)  # the event was confirmed by fetching the response


async def test_openai_refuses_a_forged_event_and_an_unknown_job(
    hl_openai: tuple[Hookline, OpenAiFake],
) -> None:
    hl, fake = hl_openai
    body = b'{"id":"evt_1","object":"event","created_at":1,"type":"response.completed",'
    body += b'"data":{"id":"resp_unknown"}}'
    ts = int(time.time())
    forged = standard_webhooks.sign_headers("whsec_" + "A" * 44, "wh_1", ts, body)
    r = await hl.client.post("/v1/callbacks/openai", content=body, headers=forged)
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature", r.text
    signed = standard_webhooks.sign_headers(fake.webhook_secret, "wh_2", ts, body)
    r = await hl.client.post("/v1/callbacks/openai", content=body, headers=signed)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_job", r.text
    assert fake.fetches() == []  # neither made hookline ask OpenAI anything
    other = body.replace(b"response.completed", b"batch.completed")
    signed = standard_webhooks.sign_headers(fake.webhook_secret, "wh_3", ts, other)
    r = await hl.client.post("/v1/callbacks/openai", content=other, headers=signed)
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    r = await hl.client.post("/v1/callbacks/replicate", content=body, headers=signed)
    assert r.status_code == 404  # no project-level webhooks for other providers


# --- DashScope: poll-only, the reaper polls on the schedule ---------------------------------------


@pytest.fixture
async def hl_dashscope(tmp_path: Path) -> AsyncIterator[tuple[Hookline, DashScopeFake]]:
    fake = DashScopeFake(auto_complete_after=2)
    async with (
        serve_app(fake.app) as url,
        running_hookline(
            tmp_path,
            provider="dashscope",
            dashscope_api_key=fake.key,
            dashscope_base_url=url,
            output_hosts=host_port(url),
            poll_first_s=0.2,
            poll_interval_s=0.1,
        ) as hl,
    ):
        yield hl, fake


async def test_a_poll_only_task_completes_through_the_reapers_polls(
    hl_dashscope: tuple[Hookline, DashScopeFake],
) -> None:
    hl, fake = hl_dashscope
    key = await hl.create_user("alice", credits=100)
    task = await hl.create_task(key)
    done = await hl.wait_terminal(key, task["id"])
    assert done["state"] == "completed" and len(done["outputs"]) == 1
    stored = await hl.store.get_task(task["id"])
    assert stored is not None and stored.polls >= 1
    events = [h.event for h in stored.history]
    assert "extend" not in events  # each poll was a quiet write
    assert events == ["start", "submitted", "ai_succeeded", "finished"]
    polls = [r for r in fake.requests if r.method == "GET" and r.path.startswith("/tasks/")]
    assert len(polls) >= 2  # asked until it was done; nothing called back
    assert stored.state is State.COMPLETED


# --- Seedream: synchronous ------------------------------------------------------------------------


async def test_a_synchronous_task_completes_from_the_calls_answer(tmp_path: Path) -> None:
    fake = SeedreamFake()
    async with (
        serve_app(fake.app) as url,
        running_hookline(
            tmp_path,
            provider="seedream",
            seedream_api_key=fake.key,
            seedream_base_url=url + "/api/v3",
            output_hosts=host_port(url),
        ) as hl,
    ):
        key = await hl.create_user("alice", credits=100)
        task = await hl.create_task(key)
        done = await hl.wait_terminal(key, task["id"])
        assert done["state"] == "completed" and len(done["outputs"]) == 1
        assert len(fake.calls()) == 1  # one call; no polls, no callback
        stored = await hl.store.get_task(task["id"])
        assert stored is not None
        assert [h.event for h in stored.history] == [
            "start",
            "submitted",
            "ai_succeeded",
            "finished",
        ]


# --- the ink style: DashScope, falling back to Kling ----------------------------------------------


async def test_the_ink_style_falls_back_from_dashscope_to_kling(tmp_path: Path) -> None:
    """A provider-side failure on DashScope: the next attempt runs on Kling (the style's
    fallback), whose callback is lost; its poll schedule finds the result."""
    dashscope, kling = DashScopeFake(), KlingFake(auto_complete_after=1)
    async with (
        serve_app(dashscope.app) as ds_url,
        serve_app(kling.app) as kl_url,
        running_hookline(
            tmp_path,
            provider="sim",
            dashscope_api_key=dashscope.key,
            dashscope_base_url=ds_url,
            kling_access_key=kling.access_key,
            kling_secret_key=kling.secret_key,
            kling_base_url=kl_url,
            output_hosts=f"{host_port(ds_url)},{host_port(kl_url)}",
            poll_first_s=0.2,
            poll_interval_s=0.1,
        ) as hl,
    ):
        key = await hl.create_user("alice", credits=100)
        task = await hl.create_task(key, style="ink")
        assert task["cost"] == 6
        await until(lambda: dashscope.tasks)
        (job,) = dashscope.tasks
        dashscope.fail(job)  # its next poll says FAILED (InternalError: the provider's fault)
        done = await hl.wait_terminal(key, task["id"])
        assert done["state"] == "completed" and len(done["outputs"]) == 1
        stored = await hl.store.get_task(task["id"])
        assert stored is not None and stored.provider == "kling" and stored.attempts == 2
        assert [a.provider for a in stored.attempt_log] == ["dashscope", "kling"]
