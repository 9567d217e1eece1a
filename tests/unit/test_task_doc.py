"""The stored form of a task round-trips exactly, and the hand-written encoders of its parts
cover every field (adding a field without encoding it fails here)."""

from __future__ import annotations

import dataclasses

from statemachine.states import State
from statemachine.task import (
    Attempt,
    HistoryEntry,
    Output,
    Task,
    TaskFailure,
    _attempt_doc,
    _output_doc,
    from_doc,
    to_doc,
)
from tests.support.factories import make_task


def full_task() -> Task:
    """A task with every optional field set, so that a field the encoder forgets shows."""
    return make_task(
        id="tsk_1",
        now=1.5,
        state=State.COMPLETED,
        version=7,
        provider="replicate",
        model="o/m",
        prompt="a cat",
        updated_at=2.5,
        style="anime",
        params={"width": 512, "seed": 3},
        inputs=({"upload": "uploads/alice/x.jpg"}, {"url": "https://h/x.png"}),
        num_outputs=2,
        attempts=2,
        refunded=False,
        deadline=None,
        lease_owner="w1",
        lease_expires=9.0,
        provider_job_id="j2",
        provider_outputs=("https://o/1.png",),
        outputs=(Output("outputs/tsk_1/0.jpeg", 10, 20, "image/jpeg"),),
        error=TaskFailure("timeout", "slow"),
        history=(HistoryEntry(State.PENDING, State.PROCESSING, "start", 1.6, "d"),),
        attempt_log=(Attempt(1, "replicate", "o/m", "j1", 1.7, 1.8, "timeout"),),
        idempotency_key="k",
        request_hash="h",
        early_outcome={"status": "succeeded", "job_id": "j1"},
        step_retries=1,
        lost_leases=2,
    )


def test_a_task_round_trips_through_its_stored_form() -> None:
    task = full_task()
    assert from_doc(to_doc(task)) == task


def test_every_field_of_a_task_is_stored() -> None:
    assert set(to_doc(full_task())) == {f.name for f in dataclasses.fields(Task)}


def test_part_encoders_match_their_dataclasses() -> None:
    attempt = Attempt(1, "p", "m", "j", 1.0, 2.0, "succeeded")
    output = Output("k", 1, 2, "image/png")
    assert _attempt_doc(attempt) == dataclasses.asdict(attempt)
    assert _output_doc(output) == dataclasses.asdict(output)
