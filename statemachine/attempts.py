"""Pure helpers over a task's attempt log (what the KPIs are computed from)."""

from __future__ import annotations

import dataclasses

from statemachine.task import Attempt, Task


def open_attempt(task: Task, job_id: str, now: float) -> tuple[Attempt, ...]:
    """The log with the current attempt (number ``task.attempts``) submitted as ``job_id``."""
    attempt = Attempt(
        number=task.attempts,
        provider=task.provider,
        model=task.model,
        job_id=job_id,
        submitted_at=now,
    )
    return (*[a for a in task.attempt_log if a.number != task.attempts], attempt)


def close_attempt(
    task: Task, outcome: str, now: float, *, job_id: str | None = None
) -> tuple[Attempt, ...]:
    """The log with the attempt of ``job_id`` (default: the current one) ended as ``outcome``.

    Attempts still open are marked ``superseded`` when another one succeeds; an attempt that had
    timed out and succeeds after all becomes ``late_success`` (still a timeout for the KPIs).
    """
    target = job_id or task.provider_job_id
    log: list[Attempt] = []
    for a in task.attempt_log:
        if a.job_id == target and a.outcome is None:
            a = dataclasses.replace(a, outcome=outcome, finished_at=now)
        elif a.job_id == target and outcome == "succeeded" and a.outcome == "timeout":
            a = dataclasses.replace(a, outcome="late_success", finished_at=now)
        elif outcome == "succeeded" and a.outcome is None:
            a = dataclasses.replace(a, outcome="superseded", finished_at=now)
        log.append(a)
    return tuple(log)


def attempt_of(task: Task, job_id: str) -> Attempt | None:
    return next((a for a in task.attempt_log if a.job_id == job_id), None)
