"""The outcome rules (statemachine/rules.py) on plain records: no store, no I/O, no clock but now.

One table per kind of news for ``judge`` (a provider's outcome, an overdue job the reaper polled,
a leased step that failed), one table for ``record``, and a property over every row of them: a
record that starts on a valid path through the machine stays on one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from statemachine.decide import Deadlines
from statemachine.outcome import Outcome
from statemachine.rules import (
    DETAIL_CHARS,
    Adopt,
    Choices,
    Decision,
    Defer,
    Extend,
    Fail,
    Ignore,
    LeaseLost,
    News,
    Overdue,
    Retry,
    StepFailed,
    judge,
    record,
)
from statemachine.states import Event, State, is_valid_path
from statemachine.task import Attempt, HistoryEntry, Task, TaskFailure
from tests.support.factories import T0, make_task

P, PR, AI, WM = State.PENDING, State.PROCESSING, State.AI_PROCESSING, State.WATERMARKING
DONE, FAILED, CANCELLED = State.COMPLETED, State.FAILED, State.CANCELLED

D = Deadlines(
    handoff_s=10,
    lease_s=60,
    ai_deadline_s=600,
    ai_hard_cap_s=1800,
    retry_backoff_s=2,
    max_attempts=3,
)
JOB, JOB2 = "job-1", "job-2"
SUBMITTED_AT = T0 + 100.0  # the current attempt's job was submitted then
NOW = SUBMITTED_AT + 700.0  # past the AI deadline (600 s), well within the hard cap (1800 s)
CAP = SUBMITTED_AT + D.ai_hard_cap_s  # the current attempt's hard cap
OUTPUTS = ("https://cdn.example/out/1.png",)
FALLBACK = ("fal", "fal-dev")
JITTER = 0.25
CHOICES = Choices(jitter=JITTER, fallback=FALLBACK)
STAY = Choices(jitter=JITTER)  # the style has no fallback provider
# backoff_s(attempts, 2 s, 0.25) = 2 * 2 ** (attempts - 1) * (0.5 + 0.25), written out.
BACKOFF_1, BACKOFF_2 = 1.5, 3.0
OWNER, OTHER = "worker-a", "worker-b"
LEASED = {"lease_owner": OWNER, "lease_expires": NOW + 30}

# --- records on valid paths through the machine ---------------------------------------------------

ATTEMPT_1 = Attempt(1, "sim", "m", JOB, submitted_at=SUBMITTED_AT)
# A first attempt that timed out early (the provider forgot it), then a second one on job-2.
TIMED_OUT_1 = Attempt(1, "sim", "m", JOB, T0 + 10, finished_at=T0 + 60, outcome="timeout")
FAILED_1 = Attempt(1, "sim", "m", JOB, T0 + 10, finished_at=T0 + 60, outcome="failed")
ATTEMPT_2 = Attempt(2, "sim", "m", JOB2, submitted_at=SUBMITTED_AT)

H_PROCESSING = (HistoryEntry(P, PR, "start", T0 + 1),)
H_AI = (*H_PROCESSING, HistoryEntry(PR, AI, "submitted", SUBMITTED_AT, f"sim job {JOB}"))
H_FIRST_AI = (*H_PROCESSING, HistoryEntry(PR, AI, "submitted", T0 + 10, f"sim job {JOB}"))
H_RETRIED = (*H_FIRST_AI, HistoryEntry(AI, PR, "retry", T0 + 60, "timeout: gone"))
H_AI_2 = (*H_RETRIED, HistoryEntry(PR, AI, "submitted", SUBMITTED_AT, f"sim job {JOB2}"))
H_WM = (*H_AI, HistoryEntry(AI, WM, "ai_succeeded", T0 + 300))
H_TERMINAL = {
    DONE: (*H_WM, HistoryEntry(WM, DONE, "finished", T0 + 400)),
    FAILED: (*H_AI, HistoryEntry(AI, FAILED, "fail", T0 + 400, "provider_failed: no")),
    CANCELLED: (*H_PROCESSING, HistoryEntry(PR, CANCELLED, "cancel", T0 + 400)),
}


def _task(defaults: dict[str, Any], changes: dict[str, Any]) -> Task:
    return make_task(now=T0, **{**defaults, **changes})


def pending(**changes: Any) -> Task:
    """A task the API has just stored."""
    return _task({}, changes)


def processing(**changes: Any) -> Task:
    """The first attempt's processing step: started, nothing submitted yet, nobody holding it."""
    defaults = {"state": PR, "version": 2, "attempts": 1, "updated_at": T0 + 1}
    return _task({**defaults, "history": H_PROCESSING, "deadline": T0 + 61}, changes)


def backing_off(**changes: Any) -> Task:
    """Processing, waiting out the backoff before attempt 2; attempt 1 (job-1) timed out."""
    defaults = {"state": PR, "version": 5, "attempts": 2, "updated_at": T0 + 60}
    fields = {"history": H_RETRIED, "attempt_log": (TIMED_OUT_1,), "deadline": NOW + 5}
    return _task({**defaults, **fields, "error": TaskFailure("timeout", "gone")}, changes)


def waiting(**changes: Any) -> Task:
    """ai_processing on attempt 1 (job-1), overdue at ``NOW``."""
    defaults = {"state": AI, "version": 3, "attempts": 1, "updated_at": SUBMITTED_AT}
    fields = {"provider_job_id": JOB, "attempt_log": (ATTEMPT_1,), "history": H_AI}
    return _task({**defaults, **fields, "deadline": SUBMITTED_AT + 600}, changes)


def waiting_second(**changes: Any) -> Task:
    """ai_processing on attempt 2 (job-2); attempt 1 (job-1) timed out."""
    defaults = {"state": AI, "version": 6, "attempts": 2, "updated_at": SUBMITTED_AT}
    fields = {"provider_job_id": JOB2, "attempt_log": (TIMED_OUT_1, ATTEMPT_2), "history": H_AI_2}
    return _task({**defaults, **fields, "deadline": SUBMITTED_AT + 600}, changes)


def watermarking(**changes: Any) -> Task:
    """A worker holds the watermarking step of job-1's outputs."""
    succeeded = Attempt(1, "sim", "m", JOB, SUBMITTED_AT, T0 + 300, "succeeded")
    defaults = {"state": WM, "version": 5, "attempts": 1, "updated_at": T0 + 300, **LEASED}
    fields = {"provider_job_id": JOB, "provider_outputs": OUTPUTS, "attempt_log": (succeeded,)}
    return _task({**defaults, **fields, "history": H_WM, "deadline": NOW + 30}, changes)


def terminal(state: State, **changes: Any) -> Task:
    fields = {"state": state, "version": 6, "attempts": 1, "history": H_TERMINAL[state]}
    return _task({**fields, "deadline": None, "refunded": state is not DONE}, changes)


def early(
    status: str, job_id: str, outputs: tuple[str, ...] = (), reason: str | None = None
) -> dict[str, Any]:
    """An outcome in its stored form (``Task.early_outcome``), written out."""
    return {
        "status": status,
        "job_id": job_id,
        "outputs": list(outputs),
        "reason": reason,
        "retryable": True,
    }


def ok(job_id: str = JOB, outputs: tuple[str, ...] = OUTPUTS) -> Outcome:
    return Outcome("succeeded", job_id, outputs)


def bad(job_id: str = JOB, reason: str | None = "nsfw filter", retryable: bool = True) -> Outcome:
    return Outcome("failed", job_id, reason=reason, retryable=retryable)


def running(job_id: str = JOB) -> Outcome:
    return Outcome("running", job_id)


# --- judge ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """``judge(task, news, now, D, choices)`` is ``expected``; ``name`` says the situation."""

    name: str
    task: Task
    news: News
    expected: Decision
    now: float = NOW
    choices: Choices = CHOICES


def fallback_retry(code: str, message: str, delay_s: float = BACKOFF_1, **kw: Any) -> Retry:
    """A retry on the style's fallback provider (the failure was the provider's)."""
    return Retry(code, message, delay_s, *FALLBACK, **kw)


def same_retry(code: str, message: str, delay_s: float = BACKOFF_1, **kw: Any) -> Retry:
    """A retry on the same provider and model."""
    return Retry(code, message, delay_s, "sim", "m", **kw)


NO_OUTPUTS = "provider returned no outputs"

OUTCOME_ROWS = [
    Row("a running report changes nothing", waiting(), running(), Ignore("running")),
    Row(
        "a running report of another job changes nothing",
        waiting(),
        running(JOB2),
        Ignore("running"),
    ),
    Row(
        "a running report while processing changes nothing",
        processing(**LEASED),
        running(),
        Ignore("running"),
    ),
    Row("a success after completed is ignored", terminal(DONE), ok(), Ignore("after_terminal")),
    Row("a success after failed is ignored", terminal(FAILED), ok(), Ignore("after_terminal")),
    Row(
        "a failure after cancelled is ignored", terminal(CANCELLED), bad(), Ignore("after_terminal")
    ),
    Row("terminal wins over a running report", terminal(DONE), running(), Ignore("after_terminal")),
    # processing: kept on the task for the step that holds it (or the reaper) to apply
    Row(
        "processing: success racing the submit while the lease is held is deferred, not due now",
        processing(**LEASED),
        ok(),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=False),
    ),
    Row(
        "processing: success while backing off with no lease is deferred and due now",
        backing_off(),
        ok(),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=True),
    ),
    Row(
        "processing: success while the lease has lapsed is due now",
        processing(lease_owner=OWNER, lease_expires=NOW),
        ok(),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=True),
    ),
    Row(
        "processing: a failure is deferred but never due now",
        processing(),
        bad(),
        Defer(early("failed", JOB, reason="nsfw filter"), due_now=False),
    ),
    Row(
        "processing: a later failure of a job whose attempt already ended is stale",
        backing_off(),
        bad(JOB),
        Ignore("stale"),
    ),
    Row(
        "processing: a success of a job whose attempt already failed is still kept",
        backing_off(attempt_log=(FAILED_1,)),
        ok(JOB),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=True),
    ),
    Row(
        "processing: a failure after an early success already deferred is dropped",
        processing(**LEASED, early_outcome=early("succeeded", JOB, OUTPUTS)),
        bad(JOB2),
        Ignore("already_deferred"),
    ),
    Row(
        "processing: a second success after an early success already deferred is dropped",
        processing(early_outcome=early("succeeded", JOB, OUTPUTS)),
        ok(JOB2),
        Ignore("already_deferred"),
    ),
    Row(
        "processing: the same job's failure twice is already deferred",
        processing(**LEASED, early_outcome=early("failed", JOB2, reason="first")),
        bad(JOB2, reason="second"),
        Ignore("already_deferred"),
    ),
    Row(
        "processing: a newer job's failure replaces an older deferred failure",
        processing(**LEASED, early_outcome=early("failed", JOB, reason="old")),
        bad(JOB2, reason="new"),
        Defer(early("failed", JOB2, reason="new")),
    ),
    Row(
        "processing: a success replaces the same job's deferred failure",
        processing(early_outcome=early("failed", JOB2, reason="flaky")),
        ok(JOB2),
        Defer(early("succeeded", JOB2, OUTPUTS), due_now=True),
    ),
    # neither processing nor ai_processing: nothing to take an outcome
    Row("watermarking: a duplicate success is ignored", watermarking(), ok(), Ignore("ignored")),
    Row("watermarking: a failure is ignored", watermarking(), bad(), Ignore("ignored")),
    Row("pending: an outcome is ignored", pending(), ok(), Ignore("ignored")),
    # ai_processing, the current job
    Row("current job: success with outputs is adopted", waiting(), ok(), Adopt(JOB, OUTPUTS)),
    Row(
        "current job: success without outputs is retried on the same provider",
        waiting(),
        ok(outputs=()),
        same_retry("no_outputs", NO_OUTPUTS),
    ),
    Row(
        "current job: success without outputs on the last attempt fails",
        waiting(attempts=3),
        ok(outputs=()),
        Fail("no_outputs", NO_OUTPUTS),
    ),
    Row(
        "current job: fewer outputs than were paid for are retried, never delivered",
        waiting(num_outputs=3),
        Outcome("succeeded", JOB, OUTPUTS * 2, reason="1 image(s) not made: moderated"),
        same_retry(
            "too_few_outputs", "provider returned 2 of 3 outputs: 1 image(s) not made: moderated"
        ),
    ),
    Row(
        "current job: fewer outputs on the last attempt fail (refunded)",
        waiting(num_outputs=2, attempts=3),
        ok(),
        Fail("too_few_outputs", "provider returned 1 of 2 outputs"),
    ),
    Row(
        "current job: as many outputs as were paid for, or more, are adopted",
        waiting(num_outputs=2),
        ok(outputs=OUTPUTS * 3),
        Adopt(JOB, OUTPUTS * 3),
    ),
    Row(
        "current job: retryable failure is retried after the backoff on the fallback provider",
        waiting(),
        bad(),
        fallback_retry("provider_failed", "nsfw filter"),
    ),
    Row(
        "current job: the backoff doubles with the attempts used",
        waiting_second(),
        bad(JOB2),
        fallback_retry("provider_failed", "nsfw filter", BACKOFF_2),
    ),
    Row(
        "current job: retryable failure stays on the provider when the style has no fallback",
        waiting(),
        bad(),
        same_retry("provider_failed", "nsfw filter"),
        choices=STAY,
    ),
    Row(
        "current job: a failure without a reason says what the provider reported",
        waiting(),
        bad(reason=None),
        fallback_retry("provider_failed", "provider reported failed"),
    ),
    Row(
        "current job: a cancellation by the provider is a provider failure",
        waiting(),
        Outcome("cancelled", JOB),
        fallback_retry("provider_failed", "provider reported cancelled"),
    ),
    Row(
        "current job: a failure that is not retryable fails the task",
        waiting(),
        bad(reason="bad prompt", retryable=False),
        Fail("provider_failed", "bad prompt"),
    ),
    Row(
        "current job: a retryable failure with the attempts used up fails the task",
        waiting(attempts=3),
        bad(),
        Fail("provider_failed", "nsfw filter"),
    ),
    # ai_processing, another job
    Row(
        "earlier attempt: a late success is adopted and the current job cancelled",
        waiting_second(),
        ok(JOB),
        Adopt(JOB, OUTPUTS, late=True, cancel=JOB2),
    ),
    Row(
        "earlier attempt: a late success without outputs is stale",
        waiting_second(),
        ok(JOB, outputs=()),
        Ignore("stale"),
    ),
    Row(
        "earlier attempt: a late success with too few outputs is stale",
        waiting_second(num_outputs=2),
        ok(JOB),
        Ignore("stale"),
    ),
    Row("earlier attempt: a late failure is stale", waiting_second(), bad(JOB), Ignore("stale")),
    Row("unknown job: a success is stale", waiting(), ok("job-x"), Ignore("stale")),
    Row("unknown job: a failure is stale", waiting(), bad("job-x"), Ignore("stale")),
]

HARD_CAP = "no result within the hard cap"
GONE = "provider no longer knows the job: 404 prediction not found"


def timeout(message: str, job: str = JOB, **kw: Any) -> Retry:
    return fallback_retry("timeout", message, ended="timeout", cancel=job, **kw)


OVERDUE_ROWS = [
    Row(
        "no job recorded: retried on the same provider",
        waiting(provider_job_id=None, attempt_log=()),
        Overdue(None),
        same_retry("lost_job", "no provider job recorded"),
    ),
    Row(
        "no job recorded on the last attempt: failed",
        waiting(provider_job_id=None, attempt_log=(), attempts=3),
        Overdue(None),
        Fail("lost_job", "no provider job recorded"),
    ),
    Row(
        "terminal task: ignored",
        terminal(FAILED),
        Overdue(JOB, answer=ok()),
        Ignore("after_terminal"),
    ),
    # a final answer is judged like the webhook it stands for
    Row(
        "final answer: a success is adopted",
        waiting(),
        Overdue(JOB, answer=ok()),
        Adopt(JOB, OUTPUTS),
    ),
    Row(
        "final answer: a retryable failure is retried on the fallback provider",
        waiting(),
        Overdue(JOB, answer=bad()),
        fallback_retry("provider_failed", "nsfw filter"),
    ),
    Row(
        "final answer: an empty success is retried",
        waiting(),
        Overdue(JOB, answer=ok(outputs=())),
        same_retry("no_outputs", NO_OUTPUTS),
    ),
    Row(
        "final answer past the hard cap: a success still wins",
        waiting(),
        Overdue(JOB, answer=ok()),
        Adopt(JOB, OUTPUTS),
        now=CAP + 60,
    ),
    Row(
        "final answer after the task moved on to processing: deferred like a webhook",
        backing_off(),
        Overdue(JOB, answer=ok()),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=True),
    ),
    Row(
        "final answer about a job no longer current: stale",
        waiting_second(),
        Overdue(JOB, answer=bad(JOB)),
        Ignore("stale"),
    ),
    # no final answer, and the task moved on meanwhile
    Row(
        "still running, task moved on to processing: stale",
        backing_off(),
        Overdue(JOB, answer=running()),
        Ignore("stale"),
    ),
    Row(
        "still running, task moved on to watermarking: stale",
        watermarking(),
        Overdue(JOB, answer=running()),
        Ignore("stale"),
    ),
    Row(
        "still running, another job current: stale",
        waiting_second(),
        Overdue(JOB, answer=running()),
        Ignore("stale"),
    ),
    Row("poll failed, another job current: stale", waiting_second(), Overdue(JOB), Ignore("stale")),
    Row(
        "provider forgot the job, another job current: stale",
        waiting_second(),
        Overdue(JOB, gone="x"),
        Ignore("stale"),
    ),
    Row(
        "past the hard cap, task moved on: stale",
        backing_off(),
        Overdue(JOB),
        Ignore("stale"),
        now=CAP + 60,
    ),
    # the provider no longer knows the job: a timeout, whatever the clock says
    Row(
        "provider forgot the job: timeout retry on the fallback, job cancelled",
        waiting(),
        Overdue(JOB, gone="404 prediction not found"),
        timeout(GONE),
    ),
    Row(
        "provider forgot the job on the last attempt: timeout failure, job cancelled",
        waiting(attempts=3),
        Overdue(JOB, gone="404 prediction not found"),
        Fail("timeout", GONE, ended="timeout", cancel=JOB),
    ),
    Row(
        "provider forgot the job, no fallback: timeout retry on the same provider",
        waiting(),
        Overdue(JOB, gone="404 prediction not found"),
        same_retry("timeout", GONE, ended="timeout", cancel=JOB),
        choices=STAY,
    ),
    # within the hard cap: wait on, never past the cap
    Row(
        "still running within the hard cap: extended by the AI deadline",
        waiting(),
        Overdue(JOB, answer=running()),
        Extend(600.0, "provider still running"),
    ),
    Row(
        "still running near the hard cap: extended only up to the cap",
        waiting(),
        Overdue(JOB, answer=running()),
        Extend(300.0, "provider still running"),
        now=CAP - 300,
    ),
    Row(
        "still running one second before the cap: extended by one second",
        waiting(),
        Overdue(JOB, answer=running()),
        Extend(1.0, "provider still running"),
        now=CAP - 1,
    ),
    Row(
        "poll failed within the hard cap: extended",
        waiting(),
        Overdue(JOB),
        Extend(600.0, "poll failed; waiting"),
    ),
    Row(
        "poll failed near the hard cap: extended only up to the cap",
        waiting(),
        Overdue(JOB),
        Extend(300.0, "poll failed; waiting"),
        now=CAP - 300,
    ),
    # past the hard cap
    Row(
        "still running at the hard cap exactly: timeout retry",
        waiting(),
        Overdue(JOB, answer=running()),
        timeout(HARD_CAP),
        now=CAP,
    ),
    Row(
        "still running past the hard cap: timeout retry on the fallback, job cancelled",
        waiting(),
        Overdue(JOB, answer=running()),
        timeout(HARD_CAP),
        now=CAP + 60,
    ),
    Row(
        "poll failed past the hard cap: timeout retry",
        waiting(),
        Overdue(JOB),
        timeout(HARD_CAP),
        now=CAP + 60,
    ),
    Row(
        "past the hard cap on the last attempt: timeout failure, job cancelled",
        waiting(attempts=3),
        Overdue(JOB, answer=running()),
        Fail("timeout", HARD_CAP, ended="timeout", cancel=JOB),
        now=CAP + 60,
    ),
    Row(
        "past the hard cap on attempt 2: the current job is the one cancelled",
        waiting_second(),
        Overdue(JOB2, answer=running()),
        timeout(HARD_CAP, job=JOB2, delay_s=BACKOFF_2),
        now=CAP + 60,
    ),
    # where the hard cap is measured from
    Row(
        "hard cap from submitted_at: a recent extension does not restart it",
        waiting(updated_at=NOW - 10),
        Overdue(JOB, answer=running()),
        timeout(HARD_CAP),
        now=CAP,
    ),
    Row(
        "hard cap from submitted_at: the extension's remaining time counts from it",
        waiting(updated_at=CAP - 400),
        Overdue(JOB, answer=running()),
        Extend(300.0, "provider still running"),
        now=CAP - 300,
    ),
    Row(
        "hard cap from updated_at when the attempt has no submitted_at: extended up to it",
        waiting(attempt_log=(Attempt(1, "sim", "m", JOB),), updated_at=NOW - 1500),
        Overdue(JOB, answer=running()),
        Extend(300.0, "provider still running"),
    ),
    Row(
        "hard cap from updated_at when the attempt has no submitted_at: past it",
        waiting(attempt_log=(Attempt(1, "sim", "m", JOB),), updated_at=NOW - 1800),
        Overdue(JOB, answer=running()),
        timeout(HARD_CAP),
    ),
    Row(
        "hard cap from updated_at when no attempt is logged: past it",
        waiting(attempt_log=(), updated_at=NOW - 1800),
        Overdue(JOB),
        timeout(HARD_CAP),
    ),
]

STEP_ROWS = [
    Row(
        "another owner holds the lease: stale",
        processing(lease_owner=OTHER, lease_expires=NOW + 30),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        Ignore("stale"),
    ),
    Row(
        "nobody holds the lease any more: stale",
        processing(),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        Ignore("stale"),
    ),
    Row(
        "the task is terminal: ignored",
        terminal(CANCELLED),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        Ignore("after_terminal"),
    ),
    Row(
        "processing, retryable, attempts left: retried on the same provider despite a fallback",
        processing(**LEASED),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        same_retry("input_unavailable", "upload missing"),
    ),
    Row(
        "processing on attempt 2, retryable: the backoff doubles",
        backing_off(**LEASED),
        StepFailed("provider_unavailable", "503 from provider", True, OWNER),
        same_retry("provider_unavailable", "503 from provider", BACKOFF_2),
    ),
    Row(
        "processing, retryable, lease recorded but lapsed: still the owner's to decide",
        processing(lease_owner=OWNER, lease_expires=NOW - 1),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        same_retry("input_unavailable", "upload missing"),
    ),
    Row(
        "processing, retryable, attempts used up: failed",
        processing(**LEASED, attempts=3),
        StepFailed("input_unavailable", "upload missing", True, OWNER),
        Fail("input_unavailable", "upload missing"),
    ),
    Row(
        "processing, not retryable: failed",
        processing(**LEASED),
        StepFailed("unknown_provider", "provider x is not configured", False, OWNER),
        Fail("unknown_provider", "provider x is not configured"),
    ),
    Row(
        "watermarking, retryable: failed (the machine has no retry from watermarking)",
        watermarking(),
        StepFailed("output_unavailable", "404 on output", True, OWNER),
        Fail("output_unavailable", "404 on output"),
    ),
    Row(
        "watermarking, not retryable: failed",
        watermarking(),
        StepFailed("bad_image", "not an image", False, OWNER),
        Fail("bad_image", "not an image"),
    ),
]


EXPIRED = {"lease_owner": OWNER, "lease_expires": NOW - 1}

LEASE_LOST_ROWS: list[Row] = [
    Row(
        "processing, the worker died for the third time: failed, worker_lost",
        processing(**EXPIRED, lost_leases=2),
        LeaseLost(OWNER, 3),
        Fail("worker_lost", "the processing step's worker was lost 3 times"),
    ),
    Row(
        "watermarking, died for the third time: failed (a paid result, but a poison input)",
        watermarking(**EXPIRED, lost_leases=2),
        LeaseLost(OWNER, 3),
        Fail("worker_lost", "the watermarking step's worker was lost 3 times"),
    ),
    Row(
        "below the limit: nothing now, the next claim counts it",
        processing(**EXPIRED, lost_leases=1),
        LeaseLost(OWNER, 3),
        Ignore("ignored"),
    ),
    Row(
        "the lease is live again (claimed meanwhile): stale",
        processing(**LEASED, lost_leases=2),
        LeaseLost(OWNER, 3),
        Ignore("stale"),
    ),
    Row(
        "another worker's lease now: stale",
        processing(lease_owner=OTHER, lease_expires=NOW - 1, lost_leases=2),
        LeaseLost(OWNER, 3),
        Ignore("stale"),
    ),
    Row(
        "terminal: after_terminal",
        terminal(FAILED),
        LeaseLost(OWNER, 3),
        Ignore("after_terminal"),
    ),
]


def names(rows: list[Row]) -> list[str]:
    return [r.name for r in rows]


@pytest.mark.parametrize("row", OUTCOME_ROWS, ids=names(OUTCOME_ROWS))
def test_judge_outcome(row: Row) -> None:
    """A provider's outcome (webhook, or a poll on its behalf) gives the decision in the row."""
    assert isinstance(row.news, Outcome)
    assert judge(row.task, row.news, row.now, D, row.choices) == row.expected


@pytest.mark.parametrize("row", OVERDUE_ROWS, ids=names(OVERDUE_ROWS))
def test_judge_overdue(row: Row) -> None:
    """What the reaper learnt about an overdue job gives the decision in the row."""
    assert isinstance(row.news, Overdue)
    assert judge(row.task, row.news, row.now, D, row.choices) == row.expected


@pytest.mark.parametrize("row", LEASE_LOST_ROWS, ids=names(LEASE_LOST_ROWS))
def test_judge_lease_lost(row: Row) -> None:
    """A step whose worker keeps dying fails at the limit, and only if nobody holds it now."""
    assert isinstance(row.news, LeaseLost)
    assert judge(row.task, row.news, row.now, D, row.choices) == row.expected


@pytest.mark.parametrize("row", STEP_ROWS, ids=names(STEP_ROWS))
def test_judge_step_failed(row: Row) -> None:
    """A leased step's failure gives the decision in the row; never a fallback provider."""
    assert isinstance(row.news, StepFailed)
    assert judge(row.task, row.news, row.now, D, row.choices) == row.expected


def test_judge_uses_the_default_choices() -> None:
    """Without choices: the middle of the jitter range, and no fallback."""
    assert judge(waiting(), bad(), NOW, D) == Retry(
        "provider_failed", "nsfw filter", 2.0, "sim", "m"
    )


WORDS = [
    (Adopt(JOB, OUTPUTS), "succeeded"),
    (Adopt(JOB, OUTPUTS, late=True, cancel=JOB2), "late_success"),
    (Defer(early("failed", JOB)), "deferred"),
    (same_retry("x", "y"), "retry"),
    (Fail("x", "y"), "failed"),
    (Extend(1.0, "x"), "extended"),
    (Ignore("stale"), "stale"),
]


@pytest.mark.parametrize(("decision", "word"), WORDS, ids=[w for _, w in WORDS])
def test_decision_word(decision: Decision, word: str) -> None:
    """Each decision names itself in the word the service answers with (a late adoption apart)."""
    assert decision.word == word


# --- record ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    """``record(task, decision, NOW, D)`` is ``task`` with ``changes``, version + 1, updated at
    ``NOW`` and ``entry`` appended to its history (``changes`` None: nothing is written)."""

    name: str
    task: Task
    decision: Decision
    changes: dict[str, Any] | None
    entry: HistoryEntry | None = None


def closed(attempt: Attempt, outcome: str, at: float = NOW) -> Attempt:
    """``attempt`` ended as ``outcome`` at ``at``."""
    return dataclasses.replace(attempt, finished_at=at, outcome=outcome)


LONG = "x" * 400

REC_ROWS = [
    *[
        Rec(f"ignore {ignore.word}: nothing is written", waiting(), ignore, None)
        for ignore in (
            Ignore("running"),
            Ignore("stale"),
            Ignore("after_terminal"),
            Ignore("already_deferred"),
            Ignore("ignored"),
        )
    ],
    Rec(
        "defer a due success: outcome kept, deadline now, no transition",
        backing_off(),
        Defer(early("succeeded", JOB, OUTPUTS), due_now=True),
        {"early_outcome": early("succeeded", JOB, OUTPUTS), "deadline": NOW},
    ),
    Rec(
        "defer while the lease is held: outcome kept, lease and deadline unchanged",
        processing(**LEASED, deadline=NOW + 30),
        Defer(early("succeeded", JOB, OUTPUTS)),
        {"early_outcome": early("succeeded", JOB, OUTPUTS)},
    ),
    Rec(
        "defer a newer failure: it replaces the older one, deadline unchanged",
        processing(early_outcome=early("failed", JOB, reason="old")),
        Defer(early("failed", JOB2, reason="new")),
        {"early_outcome": early("failed", JOB2, reason="new")},
    ),
    Rec(
        "adopt the current job: watermarking, attempt succeeded, step budget reset",
        waiting(step_retries=2),
        Adopt(JOB, OUTPUTS),
        {
            "state": WM,
            "deadline": NOW + D.handoff_s,
            "provider_outputs": OUTPUTS,
            "attempt_log": (closed(ATTEMPT_1, "succeeded"),),
            "step_retries": 0,
        },
        HistoryEntry(AI, WM, "ai_succeeded", NOW),
    ),
    Rec(
        "adopt a late success of a timed-out attempt: late_success, the running one superseded",
        waiting_second(step_retries=1),
        Adopt(JOB, OUTPUTS, late=True, cancel=JOB2),
        {
            "state": WM,
            "deadline": NOW + D.handoff_s,
            "provider_job_id": JOB,
            "provider_outputs": OUTPUTS,
            "attempt_log": (closed(TIMED_OUT_1, "late_success"), closed(ATTEMPT_2, "superseded")),
            "step_retries": 0,
        },
        HistoryEntry(AI, WM, "ai_succeeded", NOW, "adopted late success of attempt 1"),
    ),
    Rec(
        "retry a provider failure: processing after the backoff, on the fallback, job cleared",
        waiting(provider_outputs=("left-over",)),  # none in practice; shows they are cleared
        fallback_retry("provider_failed", "nsfw filter"),
        {
            "state": PR,
            "deadline": NOW + BACKOFF_1,
            "attempts": 2,
            "provider": "fal",
            "model": "fal-dev",
            "provider_job_id": None,
            "provider_outputs": (),
            "error": TaskFailure("provider_failed", "nsfw filter"),
            "attempt_log": (closed(ATTEMPT_1, "failed"),),
        },
        HistoryEntry(AI, PR, "retry", NOW, "provider_failed: nsfw filter"),
    ),
    Rec(
        "retry a timeout: the attempt is closed as timeout, provider kept",
        waiting_second(),
        same_retry("timeout", HARD_CAP, BACKOFF_2, ended="timeout", cancel=JOB2),
        {
            "state": PR,
            "deadline": NOW + BACKOFF_2,
            "attempts": 3,
            "provider_job_id": None,
            "error": TaskFailure("timeout", HARD_CAP),
            "attempt_log": (TIMED_OUT_1, closed(ATTEMPT_2, "timeout")),
        },
        HistoryEntry(AI, PR, "retry", NOW, f"timeout: {HARD_CAP}"),
    ),
    Rec(
        "retry a step failure: no job to close, lease dropped, deferred outcome dropped",
        processing(**LEASED, early_outcome=early("failed", "job-0")),
        same_retry("input_unavailable", "upload missing"),
        {
            "deadline": NOW + BACKOFF_1,
            "attempts": 2,
            "lease_owner": None,
            "lease_expires": None,
            "early_outcome": None,
            "error": TaskFailure("input_unavailable", "upload missing"),
        },
        HistoryEntry(PR, PR, "retry", NOW, "input_unavailable: upload missing"),
    ),
    Rec(
        "fail a provider failure: failed, refunded, no deadline, attempt closed as failed",
        waiting(),
        Fail("provider_failed", "bad prompt"),
        {
            "state": FAILED,
            "deadline": None,
            "refunded": True,
            "error": TaskFailure("provider_failed", "bad prompt"),
            "attempt_log": (closed(ATTEMPT_1, "failed"),),
        },
        HistoryEntry(AI, FAILED, "fail", NOW, "provider_failed: bad prompt"),
    ),
    Rec(
        "fail a timeout: the attempt is closed as timeout",
        waiting(attempts=3),
        Fail("timeout", HARD_CAP, ended="timeout", cancel=JOB),
        {
            "state": FAILED,
            "deadline": None,
            "refunded": True,
            "error": TaskFailure("timeout", HARD_CAP),
            "attempt_log": (closed(ATTEMPT_1, "timeout"),),
        },
        HistoryEntry(AI, FAILED, "fail", NOW, f"timeout: {HARD_CAP}"),
    ),
    Rec(
        "fail in watermarking: refunded, lease dropped, the succeeded attempt left as it was",
        watermarking(),
        Fail("output_unavailable", "404 on output"),
        {
            "state": FAILED,
            "deadline": None,
            "refunded": True,
            "lease_owner": None,
            "lease_expires": None,
            "error": TaskFailure("output_unavailable", "404 on output"),
        },
        HistoryEntry(WM, FAILED, "fail", NOW, "output_unavailable: 404 on output"),
    ),
    Rec(
        "fail with a long message: the history detail is cut, the error keeps it whole",
        processing(**LEASED),
        Fail("bad_input", LONG),
        {
            "state": FAILED,
            "deadline": None,
            "refunded": True,
            "lease_owner": None,
            "lease_expires": None,
            "error": TaskFailure("bad_input", LONG),
        },
        HistoryEntry(PR, FAILED, "fail", NOW, f"bad_input: {LONG}"[:DETAIL_CHARS]),
    ),
    Rec(
        "extend: ai_processing again, deadline delay_s from now",
        waiting(),
        Extend(300.0, "provider still running"),
        {"deadline": NOW + 300.0},
        HistoryEntry(AI, AI, "extend", NOW, "provider still running"),
    ),
    # decisions the machine refuses write nothing (a decision judged on another record)
    Rec(
        "retry with no attempts left: nothing is written",
        waiting(attempts=3),
        same_retry("timeout", HARD_CAP),
        None,
    ),
    Rec("retry from watermarking: nothing is written", watermarking(), same_retry("x", "y"), None),
    Rec("adopt while processing: nothing is written", processing(), Adopt(JOB, OUTPUTS), None),
    Rec("extend while processing: nothing is written", processing(), Extend(60.0, "x"), None),
    Rec("fail after completed: nothing is written", terminal(DONE), Fail("x", "y"), None),
]


@pytest.mark.parametrize("rec", REC_ROWS, ids=[r.name for r in REC_ROWS])
def test_record(rec: Rec) -> None:
    """The record a decision leaves: exactly the row's changes, version + 1, updated at now."""
    new = record(rec.task, rec.decision, NOW, D)
    if rec.changes is None:
        assert new is None
        return
    history = (*rec.task.history, rec.entry) if rec.entry else rec.task.history
    expected = rec.task.with_changes(
        version=rec.task.version + 1, updated_at=NOW, history=history, **rec.changes
    )
    assert new == expected


WRITTEN = [r for r in REC_ROWS if r.changes is not None]


@pytest.mark.parametrize("rec", WRITTEN, ids=[r.name for r in WRITTEN])
def test_record_emits_for_everything_but_a_deferral(rec: Rec) -> None:
    """The history grows by one entry (a change-feed event) for every written decision except a
    deferral, which is stored without a state change."""
    new = record(rec.task, rec.decision, NOW, D)
    assert new is not None
    grown = len(new.history) - len(rec.task.history)
    assert grown == (0 if isinstance(rec.decision, Defer) else 1)


# --- the property over every row ------------------------------------------------------------------


def path(task: Task) -> list[tuple[State, State, Event]]:
    return [(h.source, h.dest, Event(h.event)) for h in task.history]


ALL_JUDGED = [
    pytest.param(row, id=f"{table}: {row.name}")
    for table, rows in (
        ("outcome", OUTCOME_ROWS),
        ("overdue", OVERDUE_ROWS),
        ("step", STEP_ROWS),
        ("lease lost", LEASE_LOST_ROWS),
    )
    for row in rows
]


@pytest.mark.parametrize("row", ALL_JUDGED)
def test_judged_then_recorded_stays_on_a_valid_path(row: Row) -> None:
    """Whatever ``judge`` decides, the record it gives is still a path through the machine."""
    assert is_valid_path(path(row.task))
    new = record(row.task, judge(row.task, row.news, row.now, D, row.choices), row.now, D)
    if new is not None:
        assert is_valid_path(path(new))
        assert new.version == row.task.version + 1


@pytest.mark.parametrize("rec", REC_ROWS, ids=[r.name for r in REC_ROWS])
def test_recorded_stays_on_a_valid_path(rec: Rec) -> None:
    """Every decision of the record table, written, leaves a path through the machine."""
    assert is_valid_path(path(rec.task))
    new = record(rec.task, rec.decision, NOW, D)
    if new is not None:
        assert is_valid_path(path(new))
