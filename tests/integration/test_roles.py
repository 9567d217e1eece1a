"""Who runs steps: a process started with ``--roles api`` builds no step runner, so neither the
tasks it creates nor the outcomes it applies from webhooks ever start a step there; a worker
process (``dispatcher,reaper``) on the same store does that work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from callbacks.provider import Submission
from statemachine import clock, lifecycle
from statemachine.attempts import open_attempt
from statemachine.states import Event, State
from statemachine.task import Task
from tests.support.hookline import Hookline, install_manual_provider, running_hookline
from tests.support.manual_provider import ManualProvider

pytestmark = pytest.mark.asyncio


async def submit_by_hand(hl: Hookline, manual: ManualProvider, task_id: str) -> str:
    """What another process's processing step does: claim, submit, record the job."""
    task = await hl.store.get_task(task_id)
    assert task is not None and task.state is State.PENDING
    claimed = await lifecycle.take_lease(hl.store, task, "elsewhere", clock.now(), 60)
    assert claimed is not None
    callback = f"{hl.base_url}/v1/callbacks/manual/{task_id}?token={claimed.callback_token}"
    job = await manual.submit(Submission(task_id, 1, claimed.model, "p", callback))
    now = clock.now()
    recorded = await lifecycle.advance(
        hl.store,
        task_id,
        Event.SUBMITTED,
        now,
        hl.runtime.timings.base,
        changes=lambda t: {"provider_job_id": job, "attempt_log": open_attempt(t, job, now)},
    )
    assert isinstance(recorded, Task)
    return job


async def test_an_api_only_process_never_runs_a_step(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        assert hl.runtime.runner is None
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        ids = [(await hl.create_task(key, provider="manual"))["id"] for _ in range(2)]
        failed_job = await submit_by_hand(hl, manual, ids[0])
        done_job = await submit_by_hand(hl, manual, ids[1])
        manual.finish(failed_job, "failed", reason="CUDA out of memory")  # retryable
        manual.finish(done_job)
        assert (await manual.deliver(failed_job)).json()["status"] == "retry"
        assert (await manual.deliver(done_job)).json()["status"] == "succeeded"
        # Well past the retry's backoff and a reaper interval: nothing here may act on either.
        settings = hl.settings
        await asyncio.sleep(10 * settings.retry_backoff_s + 2 * settings.reaper_interval_s)
        await hl.runtime.drain()
        retried = await hl.store.get_task(ids[0])
        assert retried is not None and retried.state is State.PROCESSING
        assert retried.attempts == 2 and retried.lease_owner is None
        succeeded = await hl.store.get_task(ids[1])
        assert succeeded is not None and succeeded.state is State.WATERMARKING
        assert succeeded.outputs == () and succeeded.lease_owner is None
        assert list(manual.jobs) == [failed_job, done_job]  # no second submit


async def test_a_worker_process_on_the_same_store_finishes_what_the_api_accepted(
    tmp_path: Path,
) -> None:
    shared = {
        "store_url": f"sqlite:///{tmp_path / 'shared.db'}",
        "blob_url": f"file://{tmp_path / 'blobs'}",
        "var_dir": tmp_path / "var",
    }
    async with (
        running_hookline(tmp_path / "api", roles="api", **shared) as api,
        running_hookline(tmp_path / "worker", roles="dispatcher,reaper", **shared) as worker,
    ):
        assert api.runtime.runner is None and worker.runtime.runner is not None
        key = await api.create_user("alice")
        task = await api.create_task(key)
        done = await api.wait_terminal(key, task["id"])
        assert done["state"] == "completed"
        starts = [h for h in done["history"] if h["event"] == "start"]
        assert len(starts) == 1
