"""``POST /v1/callbacks/{provider}/{task_id}?token=…`` through a real server.

A task is held in ``ai_processing`` (the simulator takes 600 s and loses every webhook), so the only
deliveries are the ones built here: signed with the simulator's real webhook secret (fetched from
its Replicate-style ``GET /v1/webhooks/default/secret``), then broken one way at a time. Every
rejection is a JSON error with the right status (never 410) and leaves the task's state and version
as they were; duplicates and late deliveries are answered 2xx and change nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbacks.standard_webhooks import generate_secret, sign_headers
from service.providers import SIM_API_TOKEN
from statemachine import clock
from statemachine.states import State
from statemachine.task import Task
from tests.integration.test_api import assert_error
from tests.support.hookline import Hookline, running_hookline

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
    r = await hl.client.get(
        "/sim/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {SIM_API_TOKEN}"}
    )
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
    [b"this is not json", b"[1, 2, 3]", b'{"status": "succeeded"}', b"", b'{"id": 5, "status": 1}'],
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
