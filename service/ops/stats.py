"""The seed's KPIs (first-try and final success rate, timeout rate, retries, latency) over a window
of tasks (served by ``GET /v1/stats``, service/http/ops.py).

``compute_kpis`` is pure: it reads only Task records (their history and attempt log), so it is
tested with hand-made tasks and reused by nothing that does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from statemachine.states import Event, State
from statemachine.task import Task

DEFAULT_WINDOW_S: Final = 86_400
MAX_WINDOW_S: Final = 90 * 86_400

# Attempt outcomes that count as a timeout: a late success had timed out first.
TIMEOUT_OUTCOMES: Final = frozenset({"timeout", "late_success"})

# The seed's decision rule on the timeout rate: < 5 % keep, 5-10 % tune retries, > 10 % redesign.
ACCEPTABLE_BELOW: Final = 0.05
REDESIGN_ABOVE: Final = 0.10

# The seed's own estimate for the chain of 60 s cloud functions, to compare against.
SEED_BASELINE: Final = {
    "first_try_success_rate": 0.60,
    "final_success_rate": 0.85,
    "mean_latency_s": 120.0,
}

# AI-latency histogram edges in seconds; 40 s and 60 s are the seed's boundaries.
AI_BUCKETS_S: Final = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 90.0, 120.0)


@dataclass(frozen=True, slots=True)
class Interval:
    """A stretch of time a task spent in one state, ended by ``left_by``."""

    state: State
    start: float
    end: float
    left_by: str

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end - self.start)


def state_intervals(task: Task) -> Iterator[Interval]:
    """Every completed stay of ``task`` in a state, oldest first.

    Self-loops (``extend`` in ai_processing, ``retry`` from processing) do not end a stay: the
    task is still in the same state, so the stay runs from entering it to leaving it."""
    entered = task.created_at
    for entry in task.history:
        if entry.source == entry.dest:
            continue
        yield Interval(entry.source, entered, entry.at, entry.event)
        entered = entry.at


def ai_latencies(task: Task) -> list[float]:
    """Durations of ai_processing stays that ended with the provider's success."""
    return [
        i.duration_s
        for i in state_intervals(task)
        if i.state is State.AI_PROCESSING and i.left_by == Event.AI_SUCCEEDED.value
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of ``values``; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"count", "p50", "p95", "mean"}`` of ``values`` (None where there is no data)."""
    return {
        "count": len(values),
        "p50": _round(percentile(values, 0.50)),
        "p95": _round(percentile(values, 0.95)),
        "mean": _round(sum(values) / len(values)) if values else None,
    }


def histogram(values: Sequence[float], edges: Sequence[float] = AI_BUCKETS_S) -> list[Any]:
    """Counts per bucket ``[from, to)``; the last bucket is open (``to`` None)."""
    bounds = [*zip(edges, [*edges[1:], None], strict=True)]
    counts = [0] * len(bounds)
    for v in values:
        for i, (lo, hi) in enumerate(bounds):
            if v >= lo and (hi is None or v < hi):
                counts[i] += 1
                break
    return [{"from": lo, "to": hi, "count": n} for (lo, hi), n in zip(bounds, counts, strict=True)]


def verdict(timeout_rate: float | None) -> str | None:
    """The seed's decision on a timeout rate: acceptable, tune, or redesign (None: no data)."""
    if timeout_rate is None:
        return None
    if timeout_rate < ACCEPTABLE_BELOW:
        return "acceptable"
    if timeout_rate <= REDESIGN_ABOVE:
        return "tune"
    return "redesign"


def timed_out(task: Task) -> bool:
    """True if at least one of the task's provider attempts timed out."""
    return any(a.outcome in TIMEOUT_OUTCOMES for a in task.attempt_log)


def compute_kpis(tasks: Sequence[Task], window_s: float) -> dict[str, Any]:
    """The seed's KPIs over ``tasks`` (those created in the window).

    Rates are fractions 0-1 over the *settled* tasks: completed or failed. Cancelled tasks are left
    out of every rate (a user's choice says nothing about the pipeline); tasks still running are
    counted in ``in_flight`` only. With no settled task every rate is None.

    - ``first_try_success_rate``: completed with exactly one attempt (``attempts == 1``) / settled.
    - ``final_success_rate``: completed / settled.
    - ``timeout_rate``: settled tasks with at least one attempt whose outcome is ``timeout`` (or
      ``late_success``: it timed out, then its result was adopted) / settled.
    - ``retries_per_task``: mean of ``max(attempts - 1, 0)`` over settled tasks.
    - ``latency_s``: created → completed, over completed tasks.
    - ``ai_latency_s``: ai_processing stays ended by ``ai_succeeded``, with a histogram and the
      seed's bands (< 40 s, 40-60 s, > 60 s).
    - ``state_latency_s``: per state, the stays that ended (self-loops do not end a stay).
    - ``verdict``: the seed's rule on ``timeout_rate``: < 5 % acceptable, 5-10 % tune, > 10 %
      redesign.
    """
    by_state = {s: [t for t in tasks if t.state is s] for s in State}
    completed, failed = by_state[State.COMPLETED], by_state[State.FAILED]
    settled = completed + failed
    n = len(settled)

    def rate(count: int) -> float | None:
        return _round(count / n) if n else None

    first_try = sum(1 for t in completed if t.attempts == 1)
    timeouts = sum(1 for t in settled if timed_out(t))
    timeout_rate = rate(timeouts)
    end_to_end = [_completed_at(t) - t.created_at for t in completed]
    ai = [d for t in tasks for d in ai_latencies(t)]
    per_state: dict[str, list[float]] = {}
    for t in tasks:
        for i in state_intervals(t):
            per_state.setdefault(i.state.value, []).append(i.duration_s)
    return {
        "window_s": window_s,
        "tasks": len(tasks),
        "settled": n,
        "completed": len(completed),
        "failed": len(failed),
        "cancelled": len(by_state[State.CANCELLED]),
        "in_flight": len(tasks) - n - len(by_state[State.CANCELLED]),
        "first_try_success_rate": rate(first_try),
        "final_success_rate": rate(len(completed)),
        "timeout_rate": timeout_rate,
        "timeouts": timeouts,
        "retries_per_task": _round(sum(max(t.attempts - 1, 0) for t in settled) / n) if n else None,
        "latency_s": summary(end_to_end),
        "ai_latency_s": {**summary(ai), "bands": _bands(ai), "histogram": histogram(ai)},
        "state_latency_s": {s: summary(v) for s, v in per_state.items()},
        "thresholds": {
            "timeout_rate": {"acceptable_below": ACCEPTABLE_BELOW, "redesign_above": REDESIGN_ABOVE}
        },
        "verdict": verdict(timeout_rate),
        "baseline": SEED_BASELINE,
    }


def _completed_at(task: Task) -> float:
    for entry in reversed(task.history):
        if entry.dest is State.COMPLETED:
            return entry.at
    return task.updated_at


def _bands(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"under_40s": None, "40_to_60s": None, "over_60s": None}
    n = len(values)
    return {
        "under_40s": _round(sum(1 for v in values if v < 40) / n),
        "40_to_60s": _round(sum(1 for v in values if 40 <= v <= 60) / n),
        "over_60s": _round(sum(1 for v in values if v > 60) / n),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
