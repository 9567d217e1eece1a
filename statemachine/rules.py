"""The outcome rules: what news about a job does to a task. Pure: no I/O, no clock, no randomness.

    judge(task, news, now, timings, choices) -> Decision      what to do
    record(task, decision, now, timings)     -> Task | None  the record to compare-and-set

The news is one of

    Outcome      the provider's word on a job: a webhook, or a poll made on a webhook's behalf
    Overdue      the reaper asked the provider about a job past its deadline (an answer, none, or
                 "the provider no longer knows the job")
    StepFailed   a leased step (processing, watermarking) could not finish
    LeaseLost    the worker of a leased step died holding its lease, once too often

and the decision one of

    Adopt    ai_processing → watermarking with the job's outputs (a late success of an earlier
             attempt too: the attempt still running is then superseded and cancelled)
    Defer    keep the outcome on the task: it arrived while the task could not take it (the submit
             is not recorded yet, or the task is backing off before its next attempt)
    Retry    another attempt after an exponential backoff, on the style's fallback provider when
             the failure was the provider's
    Fail     failed, refunded (by the same compare-and-set)
    Extend   ai_processing waits on, with a new deadline within the hard cap
    PollLater  a polled provider's job still runs: the next poll is scheduled (a quiet write: no
             history entry, no feed event, so a job polled a hundred times stays one record)
    Ignore   nothing to change: still running, stale (about a job or a lease that is no longer
             current), after a terminal state, already deferred

The caller (service/steps/outcomes.py) reads the task, judges, persists ``record(...)`` with
compare-and-set, and on a lost race reads again and judges again: a duplicate or racing delivery
then finds its work done. Side effects (cancelling a superseded or timed-out job, deleting the
outputs of a failed task) are named on the decision and started only after the write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from statemachine.attempts import attempt_of, close_attempt
from statemachine.decide import Deadlines, NotAllowed, apply, backoff_s, decide, poll_delay_s
from statemachine.outcome import Outcome
from statemachine.states import Event, State, next_state
from statemachine.task import Task, TaskFailure

DETAIL_CHARS: Final = 300

# --- the news -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overdue:
    """What the reaper learnt about an overdue ``ai_processing`` job it claimed.

    ``answer`` is the provider's answer to a poll (None: the poll failed or could not be made);
    ``gone`` says why the provider refused the poll for good (it no longer knows the job)."""

    job_id: str | None
    answer: Outcome | None = None
    gone: str | None = None


@dataclass(frozen=True, slots=True)
class StepFailed:
    """A leased step could not finish. ``owner`` is the lease that decided: a worker that has lost
    its lease meanwhile decides nothing."""

    code: str
    message: str
    retryable: bool
    owner: str


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """The lease of ``owner`` on the task expired unreleased (its worker died, or hung), and
    another claim would make ``lost_leases`` reach ``limit``: the step is a poison for workers
    (an input that kills the process, say), so it is not run again."""

    owner: str
    limit: int


News = Outcome | Overdue | StepFailed | LeaseLost

# --- the decisions --------------------------------------------------------------------------------

AttemptEnd = Literal["failed", "timeout"]


@dataclass(frozen=True, slots=True)
class Adopt:
    job_id: str
    outputs: tuple[str, ...]
    late: bool = False  # a success of an earlier attempt
    cancel: str | None = None  # the attempt it supersedes, still running at the provider

    @property
    def word(self) -> str:
        return "late_success" if self.late else "succeeded"


@dataclass(frozen=True, slots=True)
class Defer:
    early: dict[str, Any]
    due_now: bool = False  # a success for a task nobody works on: the reaper should take it now
    word: str = "deferred"


@dataclass(frozen=True, slots=True)
class Retry:
    code: str
    message: str
    delay_s: float
    provider: str
    model: str
    ended: AttemptEnd = "failed"  # how the attempt that ends here is counted
    cancel: str | None = None  # a job to give up at the provider
    word: str = "retry"


@dataclass(frozen=True, slots=True)
class Fail:
    code: str
    message: str
    ended: AttemptEnd = "failed"
    cancel: str | None = None
    word: str = "failed"


@dataclass(frozen=True, slots=True)
class Extend:
    delay_s: float
    detail: str
    word: str = "extended"


@dataclass(frozen=True, slots=True)
class PollLater:
    delay_s: float
    word: str = "poll_scheduled"


@dataclass(frozen=True, slots=True)
class Ignore:
    word: Literal["running", "stale", "after_terminal", "already_deferred", "ignored"]


Decision = Adopt | Defer | Retry | Fail | Extend | PollLater | Ignore


@dataclass(frozen=True, slots=True)
class Choices:
    """What the caller chose outside the rules: the random draw that spreads a backoff (in [0, 1))
    and the provider and model a provider-side failure falls back to (None: stay)."""

    jitter: float = 0.5
    fallback: tuple[str, str] | None = None


# --- judging --------------------------------------------------------------------------------------


def judge(
    task: Task, news: News, now: float, timings: Deadlines, choices: Choices = Choices()
) -> Decision:
    """The one decision ``news`` calls for on ``task`` at ``now``. ``timings`` are the task's own
    (its provider's and model's)."""
    if task.terminal:
        return Ignore("after_terminal")
    if isinstance(news, Outcome):
        return _outcome(task, news, now, timings, choices)
    if isinstance(news, Overdue):
        return _overdue(task, news, now, timings, choices)
    if isinstance(news, LeaseLost):
        return _lease_lost(task, news, now)
    return _step_failed(task, news, timings, choices)


def _outcome(
    task: Task, outcome: Outcome, now: float, timings: Deadlines, choices: Choices
) -> Decision:
    if outcome.status == "running":
        return Ignore("running")
    if task.state is State.PROCESSING:
        return _defer(task, outcome, now)
    if task.state is not State.AI_PROCESSING:
        return Ignore("ignored")
    if outcome.job_id == task.provider_job_id:
        if outcome.succeeded:
            return _adopt(task, outcome, timings, choices)
        reason = outcome.reason or f"provider reported {outcome.status}"
        return _retry_or_fail(
            task,
            "provider_failed",
            reason,
            outcome.retryable,
            timings,
            choices,
            provider_fault=True,
        )
    if outcome.succeeded and attempt_of(task, outcome.job_id) is not None:
        return _adopt(task, outcome, timings, choices)
    return Ignore("stale")


def _adopt(task: Task, outcome: Outcome, timings: Deadlines, choices: Choices) -> Decision:
    late = outcome.job_id != task.provider_job_id
    if not outcome.outputs:
        if late:
            return Ignore("stale")  # an earlier attempt's empty success changes nothing
        return _retry_or_fail(
            task, "no_outputs", "provider returned no outputs", True, timings, choices
        )
    if len(outcome.outputs) < task.num_outputs:  # never deliver fewer images than were paid for
        if late:
            return Ignore("stale")
        message = f"provider returned {len(outcome.outputs)} of {task.num_outputs} outputs"
        if outcome.reason:
            message = f"{message}: {outcome.reason}"[:DETAIL_CHARS]
        return _retry_or_fail(task, "too_few_outputs", message, True, timings, choices)
    superseded = task.provider_job_id if late else None
    return Adopt(outcome.job_id, outcome.outputs, late=late, cancel=superseded)


def _defer(task: Task, outcome: Outcome, now: float) -> Decision:
    """An outcome for a task in processing: the submit is not recorded yet (a fast provider), or
    the task backs off before its next attempt. A success is never replaced; a newer job's failure
    replaces an older one; an outcome for an attempt that is already over is stale."""
    prior = attempt_of(task, outcome.job_id)
    if not outcome.succeeded and prior is not None and prior.outcome is not None:
        return Ignore("stale")
    early = task.early_outcome or {}
    if early.get("status") == "succeeded":
        return Ignore("already_deferred")
    if early.get("job_id") == outcome.job_id and not outcome.succeeded:
        return Ignore("already_deferred")
    return Defer(outcome.to_record(), due_now=outcome.succeeded and not task.lease_held(now))


def _overdue(
    task: Task, news: Overdue, now: float, timings: Deadlines, choices: Choices
) -> Decision:
    if news.job_id is None:  # cannot happen through the machine; never leave such a task waiting
        return _retry_or_fail(task, "lost_job", "no provider job recorded", True, timings, choices)
    if news.answer is not None and news.answer.final:
        return _outcome(task, news.answer, now, timings, choices)
    if task.state is not State.AI_PROCESSING or task.provider_job_id != news.job_id:
        return Ignore("stale")  # a webhook (or another reaper) settled the job meanwhile
    if news.gone is not None:
        return _timeout(task, f"provider no longer knows the job: {news.gone}", timings, choices)
    attempt = attempt_of(task, news.job_id)
    started = attempt.submitted_at if attempt and attempt.submitted_at else task.updated_at
    if now - started >= timings.ai_hard_cap_s:
        return _timeout(task, "no result within the hard cap", timings, choices)
    remaining = started + timings.ai_hard_cap_s - now
    if timings.polled:
        return PollLater(min(poll_delay_s(task.polls + 1, timings, choices.jitter), remaining))
    detail = "provider still running" if news.answer is not None else "poll failed; waiting"
    return Extend(min(timings.ai_deadline_s, remaining), detail)


def _timeout(task: Task, message: str, timings: Deadlines, choices: Choices) -> Decision:
    """The attempt is given up: retried (or failed), and its job cancelled at the provider."""
    return _retry_or_fail(
        task,
        "timeout",
        message,
        True,
        timings,
        choices,
        provider_fault=True,
        ended="timeout",
        cancel=task.provider_job_id,
    )


def _step_failed(task: Task, news: StepFailed, timings: Deadlines, choices: Choices) -> Decision:
    if task.lease_owner != news.owner:
        return Ignore("stale")  # the lease was lost: another worker owns the task now
    return _retry_or_fail(task, news.code, news.message, news.retryable, timings, choices)


def _lease_lost(task: Task, news: LeaseLost, now: float) -> Decision:
    if task.lease_owner != news.owner or task.lease_held(now):
        return Ignore("stale")  # released, or claimed again meanwhile
    if task.lost_leases + 1 < news.limit:
        return Ignore("ignored")  # the next claim counts it; the step runs again
    message = f"the {task.state.value} step's worker was lost {task.lost_leases + 1} times"
    return Fail("worker_lost", message)


def _retry_or_fail(
    task: Task,
    code: str,
    message: str,
    retryable: bool,
    timings: Deadlines,
    choices: Choices,
    *,
    provider_fault: bool = False,
    ended: AttemptEnd = "failed",
    cancel: str | None = None,
) -> Decision:
    """Another attempt after a backoff if the failure allows one, else ``failed``."""
    can_retry = next_state(task.state, Event.RETRY) is not None
    if retryable and can_retry and task.attempts < timings.max_attempts:
        delay = backoff_s(task.attempts, timings.retry_backoff_s, choices.jitter)
        provider, model = task.provider, task.model
        if provider_fault and choices.fallback is not None:
            provider, model = choices.fallback
        return Retry(code, message, delay, provider, model, ended=ended, cancel=cancel)
    return Fail(code, message, ended=ended, cancel=cancel)


# --- the record to persist ------------------------------------------------------------------------


def record(task: Task, decision: Decision, now: float, timings: Deadlines) -> Task | None:
    """The task as ``decision`` leaves it (version + 1), or None when nothing is to be written.

    A record whose history grew is a state change (it goes to the change feed); a deferred outcome
    is stored without one."""
    if isinstance(decision, Ignore):
        return None
    if isinstance(decision, PollLater):
        return task.with_changes(
            version=task.version + 1,
            updated_at=now,
            deadline=now + decision.delay_s,
            polls=task.polls + 1,
        )
    if isinstance(decision, Defer):
        changes: dict[str, Any] = {"early_outcome": decision.early}
        if decision.due_now:
            changes["deadline"] = now
        return task.with_changes(version=task.version + 1, updated_at=now, **changes)
    if isinstance(decision, Adopt):
        old = attempt_of(task, decision.job_id)
        detail = f"adopted late success of attempt {old.number}" if decision.late and old else None
        return _moved(
            task,
            Event.AI_SUCCEEDED,
            now,
            timings,
            detail=detail,
            provider_outputs=decision.outputs,
            provider_job_id=decision.job_id,
            attempt_log=close_attempt(task, "succeeded", now, job_id=decision.job_id),
            step_retries=0,  # the watermarking step gets its own budgets
            lost_leases=0,
        )
    if isinstance(decision, Extend):
        return _moved(
            task, Event.EXTEND, now, timings, detail=decision.detail, delay_s=decision.delay_s
        )
    ended_log = (
        close_attempt(task, decision.ended, now) if task.provider_job_id else task.attempt_log
    )
    detail = f"{decision.code}: {decision.message}"[:DETAIL_CHARS]
    failure = TaskFailure(decision.code, decision.message)
    if isinstance(decision, Retry):
        return _moved(
            task,
            Event.RETRY,
            now,
            timings,
            detail=detail,
            delay_s=decision.delay_s,
            attempts=task.attempts + 1,
            provider=decision.provider,
            model=decision.model,
            provider_job_id=None,
            provider_outputs=(),
            early_outcome=None,
            error=failure,
            attempt_log=ended_log,
            lost_leases=0,  # a new attempt is a new processing step
            polls=0,
        )
    return _moved(
        task, Event.FAIL, now, timings, detail=detail, error=failure, attempt_log=ended_log
    )


def _moved(
    task: Task,
    event: Event,
    now: float,
    timings: Deadlines,
    *,
    detail: str | None = None,
    delay_s: float | None = None,
    **changes: Any,
) -> Task | None:
    transition = decide(task, event, now, timings, detail=detail, delay_s=delay_s)
    if isinstance(transition, NotAllowed):
        return None
    return apply(task, transition, **changes)
