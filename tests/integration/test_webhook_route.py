"""``POST /v1/callbacks/{provider}/{task_id}?token=…`` through a real server.

A task is held in ``ai_processing`` (the simulator takes 600 s and loses every webhook), so the only
deliveries are the ones built here: signed with the simulator's real webhook secret (fetched from
its Replicate-style ``GET /v1/webhooks/default/secret``), then broken one way at a time. Every
rejection is a JSON error with the right status (never 410) and leaves the task's state and version
as they were; duplicates and late deliveries are answered 2xx and change nothing.

Job identity (issue 13): a delivery about a job that is not the task's changes, stores and polls
nothing — for the simulator's signed deliveries, for a provider calling back from inside the
submit, and for BFL's unsigned triggers against the BFL fake (whose recorded requests show every
poll); a flood of triggers for one job costs one poll; a fal delivery signed for another fal
account is refused.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from callbacks.standard_webhooks import generate_secret, sign_headers
from service.media.fetch import SafeFetcher
from statemachine import clock
from statemachine.states import State
from statemachine.task import Task
from tests.fakes.bfl_fake import BflFake, BflTask
from tests.fakes.fal_fake import FalFake
from tests.integration.test_api import assert_error
from tests.support.hookline import Hookline, install_manual_provider, running_hookline
from tests.support.server import serve_app

HOLD = {"sim_latency": "fixed:600", "sim_webhook_loss": 1.0}
REPLICATE_SECRET = generate_secret()


@dataclass
class Held:
    """A task waiting in ai_processing, and what a genuine delivery for it needs."""

    key: str
    task: Task
    secret: str
    output_url: str

    @property
    def job_id(self) -> str:
        assert self.task.provider_job_id is not None
        return self.task.provider_job_id


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    # a second provider (never called: its secret is known) to aim deliveries at the wrong one
    async with running_hookline(
        tmp_path,
        **HOLD,
        replicate_api_token="r8_unused",
        replicate_base_url="http://127.0.0.1:9/v1",
        replicate_webhook_secret=REPLICATE_SECRET,
    ) as running:
        yield running


async def sim_secret(hl: Hookline) -> str:
    r = await hl.client.get("/sim/v1/webhooks/default/secret", headers=hl.sim_auth)
    assert r.status_code == 200, r.text
    secret: str = r.json()["key"]
    return secret


async def stored(hl: Hookline, task_id: str) -> Task:
    task = await hl.store.get_task(task_id)
    assert task is not None
    return task


async def wait_for(hl: Hookline, task_id: str, state: State) -> Task:
    """Poll the store until the task is in ``state`` (a hang fails; speed is not tested)."""
    async with asyncio.timeout(30):
        while (task := await stored(hl, task_id)).state is not state:
            await asyncio.sleep(0.02)
    return task


@pytest.fixture
async def held(hl: Hookline) -> Held:
    key = await hl.create_user("alice", 100)
    created = await hl.create_task(key)
    task = await wait_for(hl, created["id"], State.AI_PROCESSING)
    # The "generated image": the task's own upload, through a signed URL of this server (its
    # host is the simulator's, so the output fetcher allows it).
    output_url = await hl.runtime.blobs.url(task.inputs[0]["upload"], 3600)
    return Held(key, task, await sim_secret(hl), output_url)


def prediction(held: Held, status: str = "succeeded", **extra: Any) -> bytes:
    body: dict[str, Any] = {"id": held.job_id, "status": status, "error": None, **extra}
    if status == "succeeded":
        body.setdefault("output", [held.output_url])
    return json.dumps(body).encode()


async def deliver(
    hl: Hookline,
    held: Held,
    body: bytes,
    *,
    msg_id: str = "msg_1",
    provider: str = "sim",
    task_id: str | None = None,
    token: str | None = None,
    secret: str | None = None,
    age_s: float = 0.0,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a delivery signed like the provider would, with any one part overridden."""
    ts = int(clock.now() - age_s)
    signed = sign_headers(secret or held.secret, msg_id, ts, body)
    return await hl.client.post(
        f"/v1/callbacks/{provider}/{task_id or held.task.id}",
        params={"token": held.task.callback_token if token is None else token},
        content=body,
        headers={**signed, "Content-Type": "application/json", **(headers or {})},
    )


async def assert_unchanged(hl: Hookline, held: Held) -> None:
    now = await stored(hl, held.task.id)
    assert (now.state, now.version) == (State.AI_PROCESSING, held.task.version)
    assert now.history == held.task.history


async def test_a_genuine_delivery_completes_the_task(hl: Hookline, held: Held) -> None:
    """The baseline every rejection below breaks one part of."""
    r = await deliver(hl, held, prediction(held))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "succeeded"}
    done = await hl.wait_terminal(held.key, held.task.id)
    assert done["state"] == "completed", done
    assert len(done["outputs"]) == 1


REJECTIONS: dict[str, tuple[dict[str, Any], int, str]] = {
    # name: (overrides for deliver(), status, code)
    "forged_signature": ({"secret": generate_secret()}, 401, "bad_signature"),
    "signature_of_another_message": (
        {"headers": {"webhook-signature": "v1,bm90IGEgc2lnbmF0dXJlIG9mIHRoaXM="}},
        401,
        "bad_signature",
    ),
    "no_signature_headers": (
        {"headers": {"webhook-signature": "", "webhook-id": ""}},
        401,
        "missing_headers",
    ),
    "timestamp_not_a_number": ({"headers": {"webhook-timestamp": "soon"}}, 401, "missing_headers"),
    "wrong_token": ({"token": "not-the-token"}, 401, "bad_token"),
    "no_token": ({"token": ""}, 401, "bad_token"),
    "stale_timestamp": ({"age_s": 3600}, 401, "stale_timestamp"),
    "future_timestamp": ({"age_s": -3600}, 401, "stale_timestamp"),
    "unknown_task": ({"task_id": "tsk_" + "0" * 24}, 404, "unknown_task"),
    "unknown_provider": ({"provider": "midjourney"}, 404, "unknown_provider"),
    "task_of_another_provider": (
        {"provider": "replicate", "secret": REPLICATE_SECRET},
        401,
        "wrong_provider",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_rejected_delivery_changes_nothing(hl: Hookline, held: Held, case: str) -> None:
    overrides, status, code = REJECTIONS[case]
    r = await deliver(hl, held, prediction(held), **overrides)
    assert_error(r, status, code)
    await assert_unchanged(hl, held)
    # a rejected delivery is not remembered: the genuine one with the same id still applies
    genuine = await deliver(hl, held, prediction(held))
    assert genuine.status_code == 200 and genuine.json() == {"status": "succeeded"}, genuine.text


async def test_body_changed_after_signing_is_401(hl: Hookline, held: Held) -> None:
    body = prediction(held)
    signed = sign_headers(held.secret, "msg_1", int(clock.now()), body)
    tampered = body.replace(b'"succeeded"', b'"failed"   ')
    r = await hl.client.post(
        f"/v1/callbacks/sim/{held.task.id}",
        params={"token": held.task.callback_token},
        content=tampered,
        headers=signed,
    )
    assert_error(r, 401, "bad_signature")
    await assert_unchanged(hl, held)


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b"[1, 2, 3]",
        b'{"status": "succeeded"}',
        b"",
        b'{"id": 5, "status": 1}',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser's recursion: not a 500
    ],
    ids=["text", "list", "no-id", "empty", "wrong-types", "too-deep"],
)
async def test_signed_body_that_is_not_a_prediction_is_400(
    hl: Hookline, held: Held, body: bytes
) -> None:
    """Authentic but unreadable: a malformed request (400), not an authentication failure."""
    assert_error(await deliver(hl, held, body), 400, "malformed_body")
    await assert_unchanged(hl, held)


async def test_oversized_delivery_is_413(hl: Hookline, held: Held) -> None:
    body = prediction(held, logs="x" * 1_000_001)
    assert_error(await deliver(hl, held, body), 413, "body_too_large")
    await assert_unchanged(hl, held)


async def test_get_on_the_webhook_route_is_405(hl: Hookline, held: Held) -> None:
    r = await hl.client.get(
        f"/v1/callbacks/sim/{held.task.id}", params={"token": held.task.callback_token}
    )
    assert_error(r, 405, "method_not_allowed")
    await assert_unchanged(hl, held)


def ai_succeeded_count(task: Task) -> int:
    return sum(1 for h in task.history if h.event == "ai_succeeded")


async def test_duplicate_deliveries_make_one_transition(hl: Hookline, held: Held) -> None:
    """The same delivery (one webhook-id) sent 5 times in a row and 10 times at once, plus the
    same outcome under other ids: one ai_succeeded, every answer 2xx."""
    body = prediction(held)
    answers = [await deliver(hl, held, body) for _ in range(5)]
    answers += await asyncio.gather(*(deliver(hl, held, body) for _ in range(10)))
    answers += await asyncio.gather(*(deliver(hl, held, body, msg_id=f"m{i}") for i in range(5)))
    assert all(200 <= r.status_code < 300 for r in answers), [r.text for r in answers]
    assert answers[0].json() == {"status": "succeeded"}
    assert answers[1].json() == {"status": "duplicate"}
    done = await hl.wait_terminal(held.key, held.task.id)
    assert done["state"] == "completed"
    assert ai_succeeded_count(await stored(hl, held.task.id)) == 1


async def test_late_stale_processing_delivery_after_success_changes_nothing(
    hl: Hookline, held: Held
) -> None:
    assert (await deliver(hl, held, prediction(held))).status_code == 200
    await hl.wait_terminal(held.key, held.task.id)
    before = await stored(hl, held.task.id)
    assert before.state is State.COMPLETED
    r = await deliver(hl, held, prediction(held, "processing"), msg_id="msg_late")
    assert r.status_code == 200, r.text
    after = await stored(hl, held.task.id)
    assert (after.state, after.version, after.history) == (
        before.state,
        before.version,
        before.history,
    )


async def test_stale_processing_delivery_while_waiting_changes_nothing(
    hl: Hookline, held: Held
) -> None:
    r = await deliver(hl, held, prediction(held, "processing"))
    assert r.status_code == 200 and r.json() == {"status": "running"}, r.text
    await assert_unchanged(hl, held)


async def test_delivery_after_a_terminal_state_is_2xx_and_changes_nothing(
    hl: Hookline, held: Held
) -> None:
    cancel = await hl.client.post(f"/v1/tasks/{held.task.id}/cancel", headers=hl.auth(held.key))
    assert cancel.status_code == 200, cancel.text
    before = await stored(hl, held.task.id)
    assert before.state is State.CANCELLED and before.refunded
    balance = (await hl.client.get("/v1/me", headers=hl.auth(held.key))).json()["balance"]
    for status in ("succeeded", "failed", "processing"):
        r = await deliver(hl, held, prediction(held, status), msg_id=f"after-{status}")
        assert 200 <= r.status_code < 300, r.text
    after = await stored(hl, held.task.id)
    assert (after.state, after.version, after.history) == (
        before.state,
        before.version,
        before.history,
    )
    assert (await hl.client.get("/v1/me", headers=hl.auth(held.key))).json()["balance"] == balance


# -- job identity (issue 13, item 8) ------------------------------------------------------------


@pytest.mark.parametrize("whose", ["another_tasks", "unknown"])
async def test_a_delivery_naming_a_job_that_is_not_the_tasks_changes_nothing(
    hl: Hookline, held: Held, whose: str
) -> None:
    """Genuinely signed and sent to the task's own URL with its token, but about another task's
    job (or a job nobody knows): 404 ``unknown_job``; neither task moves, and the delivery id is
    not remembered (the task's genuine delivery under the same id still applies)."""
    other_id = (await hl.create_task(held.key))["id"]
    other = await wait_for(hl, other_id, State.AI_PROCESSING)
    job = other.provider_job_id if whose == "another_tasks" else "nosuchprediction0000000000"
    assert job is not None
    body = json.dumps({"id": job, "status": "succeeded", "output": [held.output_url]}).encode()
    assert_error(await deliver(hl, held, body), 404, "unknown_job")
    await assert_unchanged(hl, held)
    assert (await stored(hl, other_id)).version == other.version
    assert not await hl.store.seen_delivery("sim", "msg_1")
    genuine = await deliver(hl, held, prediction(held))
    assert genuine.status_code == 200 and genuine.json() == {"status": "succeeded"}, genuine.text


async def test_an_early_result_for_another_job_is_not_kept_on_the_task(tmp_path: Path) -> None:
    """A delivery arriving while the task's submit is in flight (the fast-provider window) names
    another task's job: it is answered, but nothing is stored on the task or in the deliveries
    table, and once the task's own job is recorded the stranger is dropped, not adopted."""
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("root", admin=True)
        other_id = (await hl.create_task(key, provider="manual"))["id"]
        other = await wait_for(hl, other_id, State.AI_PROCESSING)
        assert other.provider_job_id is not None
        foreign = manual.finish(other.provider_job_id)
        seen: list[tuple[int, Any, Task]] = []

        async def foreign_result_during_submit(job: Any) -> None:
            if job.submission.task_id == other_id:
                return
            body = {"job_id": foreign.job_id, "status": "succeeded", "outputs": [manual.output_url]}
            r = await hl.client.post(
                job.submission.callback_url, json=body, headers={"X-Delivery-Id": "early-1"}
            )
            seen.append((r.status_code, r.json(), await stored(hl, job.submission.task_id)))

        manual.on_submit = foreign_result_during_submit
        task_id = (await hl.create_task(key, provider="manual"))["id"]
        task = await wait_for(hl, task_id, State.AI_PROCESSING)
        await hl.runtime.drain()
        [(status, answer, during)] = seen
        assert (status, answer) == (200, {"status": "deferred"})
        assert during.state is State.PROCESSING and during.early_outcome is None
        after = await stored(hl, task_id)
        assert after.state is State.AI_PROCESSING and after.provider_job_id != foreign.job_id
        assert after.early_outcome is None and after.version == task.version
        assert not await hl.store.seen_delivery("manual", "early-1")
        assert (await stored(hl, other_id)).version == other.version


# -- BFL: trigger-only deliveries ---------------------------------------------------------------


@dataclass
class BflServer:
    hl: Hookline
    fake: BflFake
    key: str
    sample: str  # a URL the output fetcher accepts: hookline's own signed blob URL

    async def task_in_ai_processing(self) -> Task:
        created = await self.hl.create_task(self.key, provider="bfl", model="flux-pro-1.1")
        return await wait_for(self.hl, created["id"], State.AI_PROCESSING)

    def hook_url(self, task: Task) -> str:
        assert task.provider_job_id is not None
        url = self.fake.tasks[task.provider_job_id].webhook_url
        assert url is not None
        return url


@pytest.fixture
async def bfl(tmp_path: Path) -> AsyncIterator[BflServer]:
    fake = BflFake()
    async with (
        serve_app(fake.app) as bfl_url,
        running_hookline(tmp_path, bfl_api_key=fake.key, bfl_base_url=bfl_url) as hl,
    ):
        rt = hl.runtime
        await rt.blobs.put("fixtures/sample.png", png_bytes(), "image/png")
        sample = await rt.blobs.url("fixtures/sample.png", 3600)
        host = httpx.URL(hl.base_url)
        rt.output_fetchers["bfl"] = SafeFetcher(
            rt.http, allow_hosts={f"{host.host}:{host.port}"}, max_bytes=10_000_000, timeout_s=10
        )
        key = await hl.create_user("root", 100, admin=True)
        yield BflServer(hl, fake, key, sample)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), "orange").save(buf, "PNG")
    return buf.getvalue()


async def test_a_trigger_naming_a_job_that_is_not_the_tasks_polls_nothing(bfl: BflServer) -> None:
    """BFL's trigger body is unsigned: naming another task's job (or any job id) on a task's URL
    must not make hookline poll that job with the operator's key, nor move either task."""
    mine, theirs = await bfl.task_in_ai_processing(), await bfl.task_in_ai_processing()
    assert theirs.provider_job_id is not None
    bfl.fake.tasks[theirs.provider_job_id].status = "Ready"  # a result worth stealing
    for job in (theirs.provider_job_id, str(uuid.uuid4())):
        status = await bfl.fake.send(bfl.hook_url(mine), {"id": job, "status": "Ready"})
        assert status == 404
    await bfl.hl.runtime.drain()
    assert bfl.fake.polls() == []
    for task in (mine, theirs):
        now = await stored(bfl.hl, task.id)
        assert (now.state, now.version) == (State.AI_PROCESSING, task.version)


async def test_a_thousand_triggers_for_one_job_cost_one_poll(bfl: BflServer) -> None:
    """The job's own trigger, then 999 more for the same job — in bursts and one by one, with
    made-up statuses, so their delivery ids all differ: one poll, one transition."""
    task = await bfl.task_in_ai_processing()
    job = task.provider_job_id
    assert job is not None
    await bfl.fake.complete(job, bfl.sample)
    url = bfl.hook_url(task)
    statuses: list[int | None] = []
    for burst in range(9):
        statuses += await asyncio.gather(
            *(bfl.fake.send(url, {"id": job, "status": f"Ready {burst}.{i}"}) for i in range(100))
        )
    for i in range(99):
        statuses.append(await bfl.fake.send(url, {"id": job, "status": f"Pending {i}"}))
    assert len(statuses) == 999 and all(s is not None and 200 <= s < 300 for s in statuses)
    done = await bfl.hl.wait_terminal(bfl.key, task.id)
    await bfl.hl.runtime.drain()
    assert done["state"] == "completed", done
    assert len(bfl.fake.polls(job)) == 1
    assert ai_succeeded_count(await stored(bfl.hl, task.id)) == 1


async def test_a_fast_providers_trigger_from_inside_submit_still_completes_the_task(
    bfl: BflServer,
) -> None:
    """The race kept working: BFL finishes and calls back before answering the submit. The
    trigger is held until the job id is recorded, then polled once."""

    async def finish_at_once(task: BflTask) -> None:
        await bfl.fake.complete(task.id, bfl.sample)

    bfl.fake.on_submit = finish_at_once
    task_id = (await bfl.hl.create_task(bfl.key, provider="bfl", model="flux-pro-1.1"))["id"]
    done = await bfl.hl.wait_terminal(bfl.key, task_id)
    assert done["state"] == "completed", done
    [delivered] = bfl.fake.deliveries
    assert delivered.status == 202
    job = (await stored(bfl.hl, task_id)).provider_job_id
    assert job == delivered.task_id and len(bfl.fake.polls(job)) == 1


async def test_a_trigger_from_inside_submit_naming_another_job_polls_nothing(
    bfl: BflServer,
) -> None:
    """In the fast-provider window a trigger for a job the task does not know yet is held, not
    polled: once the task's own job is recorded, the stranger is dropped."""
    theirs = await bfl.task_in_ai_processing()
    assert theirs.provider_job_id is not None
    answers: list[int | None] = []

    async def foreign_trigger(task: BflTask) -> None:
        body = {"id": theirs.provider_job_id, "status": "Ready"}
        assert task.webhook_url is not None
        answers.append(await bfl.fake.send(task.webhook_url, body))

    bfl.fake.on_submit = foreign_trigger
    mine = await bfl.task_in_ai_processing()
    await bfl.hl.runtime.drain()
    assert answers == [202]
    assert bfl.fake.polls(theirs.provider_job_id) == []
    assert (await stored(bfl.hl, theirs.id)).version == theirs.version
    now = await stored(bfl.hl, mine.id)
    assert (now.state, now.version, now.early_outcome) == (
        State.AI_PROCESSING,
        mine.version,
        None,
    )


# -- fal: our account only ----------------------------------------------------------------------


async def test_a_fal_delivery_signed_for_another_account_is_refused(tmp_path: Path) -> None:
    """fal signs the account's user id with every delivery: one genuinely signed by fal but for
    another account (``HOOKLINE_FAL_USER_ID`` names ours) is 401 ``wrong_account`` and changes
    nothing; the same delivery for our account completes the task."""
    fake = FalFake(user_id="user_someone_else")
    async with (
        serve_app(fake.app) as fal_url,
        running_hookline(
            tmp_path,
            fal_key=fake.key,
            fal_base_url=fal_url,
            fal_jwks_url=f"{fal_url}/.well-known/jwks.json",
            fal_user_id="user_ours",
        ) as hl,
    ):
        rt = hl.runtime
        await rt.blobs.put("fixtures/sample.png", png_bytes(), "image/png")
        sample = await rt.blobs.url("fixtures/sample.png", 3600)
        host = httpx.URL(hl.base_url)
        rt.output_fetchers["fal"] = SafeFetcher(
            rt.http, allow_hosts={f"{host.host}:{host.port}"}, max_bytes=10_000_000, timeout_s=10
        )
        key = await hl.create_user("root", 100, admin=True)
        created = await hl.create_task(key, provider="fal", model="fal-ai/flux/dev")
        task = await wait_for(hl, created["id"], State.AI_PROCESSING)
        assert task.provider_job_id is not None
        await fake.complete(task.provider_job_id, [sample])
        assert fake.deliveries[-1].status == 401
        now = await stored(hl, task.id)
        assert (now.state, now.version) == (State.AI_PROCESSING, task.version)
        fake.user_id = "user_ours"
        assert await fake.deliver(task.provider_job_id) == 200
        assert (await hl.wait_terminal(key, task.id))["state"] == "completed"
