"""Providers whose outcomes must be asked for, driven through the real runtime on a fake clock
(issue 15): the reaper polls a poll-only job on its schedule with quiet writes; polls and submits
beyond a provider's quota wait in the store, not in memory; a 429 pauses that provider's polls;
a synchronous provider is called by the processing step; an image sent as bytes is stored and
watermarked from the blob."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from callbacks.errors import ProviderRateLimited
from callbacks.provider import Arrival, Outcome, Quota, Submission
from service.steps.outcomes import BLOB_REF
from statemachine.states import State
from tests.support.manual_provider import ManualProvider
from tests.unit.test_reaper import World, history, make_world, png, valid

FIRST_POLL_S = 30.0
POLL_INTERVAL_S = 5.0


@contextlib.asynccontextmanager
async def polled_world(
    tmp_path: Path,
    *,
    arrival: Arrival = "poll",
    quota: Quota | None = None,
    provider: ManualProvider | None = None,
    **overrides: Any,
) -> AsyncIterator[World]:
    manual = provider or ManualProvider(
        http=httpx.AsyncClient(), output_url="https://outputs.example/1.png"
    )
    manual.arrival = arrival
    manual.quota = quota or Quota()
    settings = {"poll_first_s": FIRST_POLL_S, "poll_interval_s": POLL_INTERVAL_S, **overrides}
    async with make_world(tmp_path, provider=manual, **settings) as world:
        yield world


async def submitted(world: World, name: str) -> Any:
    """A task of its own id, submitted (ai_processing with a job at the provider)."""
    task = await world.task(id=f"tsk_{name}")
    await world.runner.run(task.id)
    task = await world.get(task.id)
    assert task.state is State.AI_PROCESSING
    return task


async def feed_events(world: World, task_id: str) -> int:
    return len([e for e in await world.store.feed_after(None, 10_000) if e.task_id == task_id])


async def test_a_poll_only_job_is_polled_on_its_schedule_with_quiet_writes(
    tmp_path: Path,
) -> None:
    async with polled_world(tmp_path) as world:
        task = await world.submitted()
        assert task.deadline == world.clock() + FIRST_POLL_S  # the expected latency
        events = await feed_events(world, task.id)
        world.clock.advance(FIRST_POLL_S - 1)
        await world.reap()
        assert world.provider.polls == []  # nothing runs for a waiting task in between
        world.clock.advance(1)
        await world.reap()
        polled = await world.get(task.id)
        assert world.provider.polls == [task.provider_job_id]
        assert polled.state is State.AI_PROCESSING and polled.polls == 1
        assert polled.history == task.history  # a quiet write: no history entry
        assert await feed_events(world, task.id) == events  # and no feed event
        assert polled.deadline is not None
        assert world.clock() + 0.5 * POLL_INTERVAL_S <= polled.deadline
        assert polled.deadline <= world.clock() + 1.5 * POLL_INTERVAL_S
        # the job finishes; the next poll, at its time, settles the task
        assert polled.provider_job_id is not None
        world.provider.finish(polled.provider_job_id)
        world.clock.t = polled.deadline
        await world.reap()
        done = await world.get(task.id)
        assert done.state in (State.WATERMARKING, State.COMPLETED)
        assert world.provider.polls == [task.provider_job_id] * 2
        assert valid(done) and "extend" not in history(done)


async def test_a_trigger_provider_is_polled_on_the_schedule_too(tmp_path: Path) -> None:
    """Its trigger may be lost: the schedule is the backstop."""
    async with polled_world(tmp_path, arrival="trigger") as world:
        task = await world.submitted()
        assert task.deadline == world.clock() + FIRST_POLL_S


async def test_a_webhook_provider_is_looked_at_only_at_its_ai_deadline(tmp_path: Path) -> None:
    async with polled_world(tmp_path, arrival="webhook") as world:
        task = await world.submitted()
        assert task.deadline == world.clock() + world.runtime.timings.base.ai_deadline_s


async def test_polls_beyond_the_quota_are_put_off_in_the_store(tmp_path: Path) -> None:
    """One poll a second: of three jobs due at once, one is polled; the others' next look is put
    off to when there will be a token, without a poll and without a history entry."""
    async with polled_world(tmp_path, quota=Quota(polls_per_s=1.0)) as world:
        tasks = [await submitted(world, str(i)) for i in range(3)]
        world.clock.advance(FIRST_POLL_S)
        now = world.clock()
        await world.reap()
        assert len(world.provider.polls) == 1
        after = [await world.get(t.id) for t in tasks]
        put_off = [t for t in after if t.polls == 0]
        assert len(put_off) == 2
        before = {t.id: t for t in tasks}
        for task in put_off:
            assert task.history == before[task.id].history and task.state is State.AI_PROCESSING
            assert task.deadline is not None and task.deadline >= now + 1.0
        world.clock.advance(2.0)  # both put-off tasks are due again (a token's wait + jitter < 1 s)
        await world.reap()
        assert len(world.provider.polls) == 2  # one more token, not two


async def test_a_429_on_a_poll_pauses_that_providers_polls(tmp_path: Path) -> None:
    async with polled_world(tmp_path) as world:
        first, second = await submitted(world, "a"), await submitted(world, "b")
        world.provider.poll_error = ProviderRateLimited("slow down", retry_after_s=120)
        world.clock.advance(FIRST_POLL_S)
        await world.store.transition(  # only the first is due now
            second.with_changes(version=second.version + 1, deadline=world.clock() + 60),
            State.AI_PROCESSING,
            second.version,
            emit=False,
        )
        await world.reap()
        assert len(world.provider.polls) == 1
        assert world.runtime.pacing.wait_s("manual", "poll") == 120
        world.provider.poll_error = None
        world.clock.advance(60)  # the second is due; the pause has 60 s to run
        await world.reap()
        assert len(world.provider.polls) == 1  # not polled during the pause
        paused = await world.get(second.id)
        assert paused.deadline is not None and paused.deadline >= world.clock() + 60
        assert (await world.get(first.id)).state is State.AI_PROCESSING


async def test_submits_beyond_the_quota_wait_in_the_store_uncounted(tmp_path: Path) -> None:
    """One submit every 4 s: the second task's step hands it back until then (no sleep in
    memory, no retry counted)."""
    async with polled_world(tmp_path, quota=Quota(submits_per_s=0.25)) as world:
        first, second = await world.task(id="tsk_a"), await world.task(id="tsk_b")
        await world.runner.run(first.id)
        await world.runner.run(second.id)
        assert len(world.provider.jobs) == 1
        waiting = await world.get(second.id)
        assert waiting.state is State.PROCESSING and waiting.step_retries == 0
        assert waiting.deadline is not None and waiting.deadline >= world.clock() + 4.0
        assert waiting.lease_owner is None and not waiting.holds_slot


@dataclass
class SyncManual(ManualProvider):
    """A synchronous provider: ``generate`` answers with the images."""

    answer: Outcome | None = None
    calls: int = 0

    async def generate(self, submission: Submission) -> Outcome:
        self.calls += 1
        assert self.answer is not None
        return self.answer


async def test_a_synchronous_provider_is_called_by_the_processing_step(tmp_path: Path) -> None:
    sync = SyncManual(http=httpx.AsyncClient(), output_url="https://outputs.example/1.png")
    sync.answer = Outcome("succeeded", "req-1", ("https://outputs.example/1.png",))
    async with polled_world(tmp_path, arrival="sync", provider=sync) as world:
        task = await world.task()
        await world.runner.run(task.id)
        answered = await world.get(task.id)
        assert sync.calls == 1 and sync.jobs == {}  # generate, not submit
        assert answered.state is State.WATERMARKING
        assert answered.provider_job_id == "req-1"
        assert answered.provider_outputs == ("https://outputs.example/1.png",)
        assert [a.job_id for a in answered.attempt_log] == ["req-1"]
        assert valid(answered)


async def test_a_synchronous_failure_is_retried_like_any_attempt(tmp_path: Path) -> None:
    sync = SyncManual(http=httpx.AsyncClient(), output_url="https://outputs.example/1.png")
    sync.answer = Outcome("failed", "req-1", reason="engine busy")
    async with polled_world(tmp_path, arrival="sync", provider=sync) as world:
        task = await world.task()
        await world.runner.run(task.id)
        retried = await world.get(task.id)
        assert retried.state is State.PROCESSING and retried.attempts == 2
        assert retried.error is not None and "engine busy" in retried.error.message


async def test_an_image_sent_as_bytes_is_stored_then_watermarked(tmp_path: Path) -> None:
    """OpenAI answers with base64: the outcome keeps a blob reference, not the bytes, and the
    watermarking step reads the blob."""
    async with polled_world(tmp_path, arrival="trigger") as world:
        task = await world.submitted()
        assert task.provider_job_id is not None
        data_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
        word = await world.runtime.outcomes.apply(
            task.id, Outcome("succeeded", task.provider_job_id, (data_uri,))
        )
        assert word == "succeeded"
        adopted = await world.get(task.id)
        (ref,) = adopted.provider_outputs
        assert ref.startswith(BLOB_REF) and ref.startswith(f"{BLOB_REF}outputs/{task.id}/")
        assert await world.runtime.blobs.get(ref.removeprefix(BLOB_REF)) == png()
        await world.runner.run(task.id)
        done = await world.get(task.id)
        assert done.state is State.COMPLETED and len(done.outputs) == 1


async def test_bytes_that_are_not_an_image_fail_the_attempt(tmp_path: Path) -> None:
    async with polled_world(tmp_path, arrival="trigger") as world:
        task = await world.submitted()
        assert task.provider_job_id is not None
        junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
        await world.runtime.outcomes.apply(
            task.id, Outcome("succeeded", task.provider_job_id, (junk,))
        )
        failed = await world.get(task.id)
        assert failed.state is State.PROCESSING and failed.attempts == 2  # retried
        assert failed.error is not None and "not a JPEG, PNG or WebP" in failed.error.message
