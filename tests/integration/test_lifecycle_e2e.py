"""The whole lifecycle through a real server: the simulator's signed webhooks and each of its
faults, a webhook that beats the submit, late successes, cancellation, retries and refunds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from statemachine.states import Event, State, is_valid_path
from statemachine.task import Task
from tests.support.hookline import Hookline, install_manual_provider, running_hookline

pytestmark = pytest.mark.asyncio


def path_of(task: dict[str, Any]) -> list[str]:
    return [h["to"] for h in task["history"]]


def valid(task: Task) -> bool:
    return is_valid_path([(h.source, h.dest, Event(h.event)) for h in task.history])


async def sim_stats(hl: Hookline) -> dict[str, Any]:
    r = await hl.client.get("/sim/v1/_sim/stats")
    stats: dict[str, Any] = r.json()
    return stats


async def wait_for(hl: Hookline, task_id: str, state: State, timeout_s: float = 30) -> Task:
    async with asyncio.timeout(timeout_s):
        while True:
            task = await hl.store.get_task(task_id)
            assert task is not None
            if task.state is state:
                return task
            await asyncio.sleep(0.01)


async def test_task_completes_through_the_simulators_signed_webhook(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=100)
        created = await hl.create_task(key, style="anime")
        assert created["state"] == "pending" and created["cost"] == 8
        done = await hl.wait_terminal(key, created["id"])
        assert path_of(done) == ["processing", "ai_processing", "watermarking", "completed"]
        assert done["attempts"] == 1 and not done["refunded"]
        out = done["outputs"][0]
        assert (out["width"], out["height"]) == (1024, 1024)
        image = await hl.client.get(out["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        me = (await hl.client.get("/v1/me", headers=hl.auth(key))).json()
        assert me["balance"] == 92
        stats = await sim_stats(hl)
        assert stats["predictions_created"] == 1


async def test_lost_webhook_is_reconciled_by_polling_without_paying_twice(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, sim_webhook_loss=1.0, ai_deadline_s=0.3) as hl:
        key = await hl.create_user("alice")
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "completed" and done["attempts"] == 1
        assert (await sim_stats(hl))["predictions_created"] == 1


async def test_duplicated_webhooks_make_one_transition(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, sim_webhook_duplicate=1.0) as hl:
        key = await hl.create_user("alice")
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "completed"
        assert [h["event"] for h in done["history"]].count("ai_succeeded") == 1


async def test_reordered_webhooks_never_move_a_task_back(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, sim_webhook_delay_s=0.05) as hl:
        key = await hl.create_user("alice")
        ids = [(await hl.create_task(key))["id"] for _ in range(5)]
        for task_id in ids:
            done = await hl.wait_terminal(key, task_id)
            assert path_of(done) == ["processing", "ai_processing", "watermarking", "completed"]


async def test_wrongly_signed_webhooks_are_refused_and_the_reaper_recovers(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, sim_webhook_bad_signature=1.0, ai_deadline_s=0.3) as hl:
        key = await hl.create_user("alice")
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "completed" and done["attempts"] == 1
        assert (await sim_stats(hl))["webhooks_bad_signature"] >= 1


async def test_output_fetch_failures_are_retried(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, sim_output_5xx=0.6, sim_seed=7) as hl:
        key = await hl.create_user("alice")
        ids = [(await hl.create_task(key))["id"] for _ in range(3)]
        for task_id in ids:
            assert (await hl.wait_terminal(key, task_id))["state"] == "completed"


async def test_provider_failures_retry_then_fail_with_exactly_one_refund(tmp_path: Path) -> None:
    # Seed 0 makes the simulator fail its first three predictions with retryable errors
    # (out of memory, interrupted) rather than a moderation refusal.
    async with running_hookline(tmp_path, sim_failure_rate=1.0, max_attempts=3, sim_seed=0) as hl:
        key = await hl.create_user("alice", credits=20)
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "failed" and done["refunded"]
        assert done["attempts"] == 3
        assert [h["event"] for h in done["history"]].count("retry") == 2
        assert done["error"]["code"] == "provider_failed"
        assert (await hl.client.get("/v1/me", headers=hl.auth(key))).json()["balance"] == 20
        kinds = [e.kind for e in await hl.store.ledger("alice")]
        assert kinds == ["grant", "debit", "refund"]


async def test_a_moderation_refusal_is_not_retried(tmp_path: Path) -> None:
    # Seed 3 makes the simulator refuse its first prediction as NSFW: retrying will not help.
    async with running_hookline(tmp_path, sim_failure_rate=1.0, sim_seed=3) as hl:
        key = await hl.create_user("alice", credits=20)
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "failed" and done["attempts"] == 1 and done["refunded"]
        assert "NSFW" in done["error"]["message"]
        assert (await sim_stats(hl))["predictions_created"] == 1


async def test_webhook_arriving_before_the_submit_is_stored_is_applied_once(
    tmp_path: Path,
) -> None:
    """A fast provider calls back from inside submit(): the outcome is kept on the task and
    applied when the job id is stored — once."""
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        answers: list[httpx.Response] = []

        async def call_back_at_once(job: Any) -> None:
            manual.finish(job.job_id)
            answers.append(await manual.deliver(job.job_id))
            answers.append(await manual.deliver(job.job_id))  # and a duplicate

        manual.on_submit = call_back_at_once
        key = await hl.create_user("alice")
        done = await hl.wait_terminal(key, (await hl.create_task(key, provider="manual"))["id"])
        assert [r.status_code for r in answers] == [200, 200]
        assert answers[0].json()["status"] == "deferred"
        assert done["state"] == "completed"
        assert path_of(done) == ["processing", "ai_processing", "watermarking", "completed"]
        assert len(manual.jobs) == 1


async def test_cancel_refunds_cancels_the_job_and_ignores_its_late_webhook(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice", credits=10)
        task_id = (await hl.create_task(key, provider="manual"))["id"]
        task = await wait_for(hl, task_id, State.AI_PROCESSING)
        r = await hl.client.post(f"/v1/tasks/{task_id}/cancel", headers=hl.auth(key))
        assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["refunded"]
        assert manual.cancels == [task.provider_job_id]
        manual.finish(task.provider_job_id)
        late = await manual.deliver(task.provider_job_id)
        assert late.status_code == 200 and late.json()["status"] == "after_terminal"
        after = await hl.store.get_task(task_id)
        assert after is not None and after.state is State.CANCELLED and after.outputs == ()
        assert (await hl.client.get("/v1/me", headers=hl.auth(key))).json()["balance"] == 10


async def test_late_success_of_a_timed_out_attempt_is_adopted_once(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, ai_deadline_s=0.2, ai_hard_cap_s=0.4) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice", credits=10)
        task_id = (await hl.create_task(key, provider="manual"))["id"]
        first = (await wait_for(hl, task_id, State.AI_PROCESSING)).provider_job_id
        # The first attempt runs past the hard cap: the reaper cancels it and retries.
        async with asyncio.timeout(30):
            while (t := await hl.store.get_task(task_id)) and (
                t.attempts < 2 or t.state is not State.AI_PROCESSING
            ):
                await asyncio.sleep(0.01)
        assert first in manual.cancels
        second = t.provider_job_id
        assert second != first
        # ...and then the first attempt's result arrives after all.
        manual.finish(first)
        r = await manual.deliver(first)
        assert r.json()["status"] == "late_success"
        done = await hl.wait_terminal(key, task_id)
        assert done["state"] == "completed"
        assert second in manual.cancels
        assert [e.kind for e in await hl.store.ledger("alice")] == ["grant", "debit"]
        stored = await hl.store.get_task(task_id)
        assert stored is not None and valid(stored)
        outcomes = {a.job_id: a.outcome for a in stored.attempt_log}
        assert outcomes == {first: "late_success", second: "superseded"}


async def test_tasks_over_the_provider_limit_wait_pending_and_run_as_slots_free(
    tmp_path: Path,
) -> None:
    # one user may take every slot here (user_concurrency): this is about the provider's limit
    async with running_hookline(tmp_path, provider_concurrency=2, user_concurrency=2) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice", credits=100)
        ids = [(await hl.create_task(key, provider="manual"))["id"] for _ in range(4)]
        async with asyncio.timeout(30):
            while len(manual.jobs) < 2:
                await asyncio.sleep(0.01)
        counts = await hl.store.count_by_state(None)
        # the two over the limit wait without a slot: pending, or processing with their inputs
        # checked (issue 13: inputs are checked before a slot is taken)
        assert counts[State.AI_PROCESSING] == 2
        assert counts[State.PENDING] + counts[State.PROCESSING] == 2
        assert await hl.store.count_active("manual") == 2 and len(manual.jobs) == 2
        for job_id in list(manual.jobs):
            manual.finish(job_id)
            await manual.deliver(job_id)
        async with asyncio.timeout(30):
            while len(manual.jobs) < 4:
                await asyncio.sleep(0.01)
        for job_id in list(manual.jobs)[2:]:
            manual.finish(job_id)
            await manual.deliver(job_id)
        for task_id in ids:
            assert (await hl.wait_terminal(key, task_id))["state"] == "completed"


@pytest.mark.parametrize(
    ("path", "why"),
    [("/no/such/output.png", "a 404"), ("/healthz", "JSON where an image should be")],
)
async def test_an_output_that_cannot_be_fetched_fails_the_task_with_a_refund(
    tmp_path: Path, path: str, why: str
) -> None:
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        manual.output_url = hl.base_url + path
        key = await hl.create_user("alice", credits=10)
        task_id = (await hl.create_task(key, provider="manual"))["id"]
        task = await wait_for(hl, task_id, State.AI_PROCESSING)
        manual.finish(task.provider_job_id)
        await manual.deliver(task.provider_job_id)
        done = await hl.wait_terminal(key, task_id)
        assert done["state"] == "failed" and done["refunded"], why
        assert done["error"]["code"] == "output_unavailable"
        assert task.provider_job_id in manual.polls  # asked once for a fresh URL first
        assert (await hl.client.get("/v1/me", headers=hl.auth(key))).json()["balance"] == 10
        assert await hl.runtime.blobs.list_keys(f"outputs/{task_id}/") == []


async def test_outputs_are_stored_in_s3_and_served_by_presigned_urls(tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        async with running_hookline(
            tmp_path,
            blob_url="s3://hookline-e2e",
            s3_endpoint=f"http://{host}:{port}",
            s3_access_key="test",
            s3_secret_key="test",
            s3_region="us-east-1",
        ) as hl:
            key = await hl.create_user("alice")
            done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
            assert done["state"] == "completed"
            url = done["outputs"][0]["url"]
            assert url.startswith(f"http://{host}:{port}/hookline-e2e/outputs/")
            assert "X-Amz-Signature" in url
            async with httpx.AsyncClient() as plain:
                image = await plain.get(url)
            assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    finally:
        server.stop()


async def test_a_flaky_output_host_does_not_throw_a_paid_result_away(tmp_path: Path) -> None:
    """Every output fetch answers 503 up to three times in a row (more than one step's tries):
    the step is handed back with a backoff and the task still completes on its one attempt."""
    async with running_hookline(tmp_path, sim_output_5xx=1.0) as hl:
        key = await hl.create_user("alice")
        done = await hl.wait_terminal(key, (await hl.create_task(key))["id"])
        assert done["state"] == "completed" and done["attempts"] == 1
        stats = await sim_stats(hl)
        assert stats["predictions_created"] == 1 and stats["files_5xx"] >= 3
