"""The lifecycle as data and the pure decisions over it: no database, no clock but ``now``."""

from __future__ import annotations

import itertools

import pytest

from statemachine.decide import (
    Deadlines,
    NotAllowed,
    Transition,
    apply,
    backoff_s,
    claim,
    decide,
    default_deadline,
    release,
    renew,
)
from statemachine.states import Event, State, is_valid_path, next_state, state_of
from statemachine.task import HistoryEntry, Task
from tests.support.factories import make_task

P, PR, AI, WM = State.PENDING, State.PROCESSING, State.AI_PROCESSING, State.WATERMARKING
DONE, FAILED, CANCELLED = State.COMPLETED, State.FAILED, State.CANCELLED

# Written out by hand from DESIGN.md's lifecycle, not derived from states.TRANSITIONS.
EXPECTED: dict[tuple[State, Event], State] = {
    (P, Event.START): PR,
    (PR, Event.SUBMITTED): AI,
    (AI, Event.AI_SUCCEEDED): WM,
    (WM, Event.FINISHED): DONE,
    (PR, Event.RETRY): PR,
    (AI, Event.RETRY): PR,
    (AI, Event.EXTEND): AI,
    (P, Event.FAIL): FAILED,
    (PR, Event.FAIL): FAILED,
    (AI, Event.FAIL): FAILED,
    (WM, Event.FAIL): FAILED,
    (P, Event.CANCEL): CANCELLED,
    (PR, Event.CANCEL): CANCELLED,
    (AI, Event.CANCEL): CANCELLED,
}

ALL_PAIRS = list(itertools.product(State, Event))
NOW = 1_000.0
D = Deadlines(handoff_s=10, lease_s=60, ai_deadline_s=600, retry_backoff_s=2, max_attempts=3)


def task_in(state: State = P, **changes: object) -> Task:
    """A task in ``state``, at version 3 (so a version bump is seen to give 4)."""
    return make_task(now=0.0, state=state, version=3, **changes)


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_machine_allows_exactly_the_expected_pairs(state: State, event: Event) -> None:
    """Every (state, event) pair: allowed ones lead to the expected state, the rest to None."""
    assert next_state(state, event) == EXPECTED.get((state, event))


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_decide_agrees_with_the_table(state: State, event: Event) -> None:
    """decide() allows what the table allows (attempts left) and explains what it refuses."""
    result = decide(task_in(state), event, NOW, D)
    expected = EXPECTED.get((state, event))
    if expected is None:
        assert isinstance(result, NotAllowed)
        assert event.value in result.reason and state.value in result.reason
    else:
        assert isinstance(result, Transition)
        assert (result.source, result.dest, result.event, result.at) == (
            state,
            expected,
            event,
            NOW,
        )
        assert result.entry == HistoryEntry(state, expected, event.value, NOW, None)


def test_terminal_states_accept_nothing() -> None:
    for state, event in itertools.product((DONE, FAILED, CANCELLED), Event):
        result = decide(task_in(state), event, NOW, D)
        assert isinstance(result, NotAllowed)
        assert "terminal" in result.reason


@pytest.mark.parametrize(
    ("state", "event", "deadline"),
    [
        (P, Event.START, NOW + 60),  # processing: the lease
        (PR, Event.SUBMITTED, NOW + 600),  # ai_processing: until the provider is polled
        (AI, Event.AI_SUCCEEDED, NOW + 10),  # watermarking: hand-off to a worker
        (AI, Event.EXTEND, NOW + 600),
        (WM, Event.FINISHED, None),  # terminal: no deadline
        (AI, Event.FAIL, None),
        (P, Event.CANCEL, None),
    ],
)
def test_decide_sets_the_deadline_of_the_new_state(
    state: State, event: Event, deadline: float | None
) -> None:
    result = decide(task_in(state), event, NOW, D)
    assert isinstance(result, Transition)
    assert result.deadline == deadline


def test_default_deadline_per_state() -> None:
    assert default_deadline(P, NOW, D) == NOW + 10
    assert default_deadline(PR, NOW, D) == NOW + 60
    assert default_deadline(AI, NOW, D) == NOW + 600
    assert default_deadline(WM, NOW, D) == NOW + 10
    for state in (DONE, FAILED, CANCELLED):
        assert default_deadline(state, NOW, D) is None


def test_delay_overrides_the_default_deadline() -> None:
    result = decide(task_in(AI, attempts=1), Event.RETRY, NOW, D, delay_s=4.5, detail="timeout")
    assert isinstance(result, Transition)
    assert result.deadline == NOW + 4.5
    assert result.entry.detail == "timeout"


@pytest.mark.parametrize("state", [PR, AI])
def test_retry_is_refused_once_attempts_are_used_up(state: State) -> None:
    assert isinstance(decide(task_in(state, attempts=2), Event.RETRY, NOW, D), Transition)
    refused = decide(task_in(state, attempts=3), Event.RETRY, NOW, D)
    assert isinstance(refused, NotAllowed)
    assert "no attempts left" in refused.reason
    # Failing stays possible when retrying is not.
    assert isinstance(decide(task_in(state, attempts=3), Event.FAIL, NOW, D), Transition)


def test_apply_bumps_version_appends_history_and_drops_the_lease() -> None:
    task = task_in(PR, lease_owner="w1", lease_expires=NOW + 30, history=())
    transition = decide(task, Event.SUBMITTED, NOW, D)
    assert isinstance(transition, Transition)
    after = apply(task, transition, provider_job_id="job-1")
    assert after.state is AI
    assert after.version == task.version + 1
    assert after.updated_at == NOW
    assert after.deadline == NOW + 600
    assert after.history == (transition.entry,)
    assert (after.lease_owner, after.lease_expires) == (None, None)
    assert after.provider_job_id == "job-1"
    assert not after.refunded
    assert task.state is PR  # the input is untouched


def test_apply_keeps_a_lease_the_changes_set() -> None:
    task = task_in(P)
    transition = decide(task, Event.START, NOW, D)
    assert isinstance(transition, Transition)
    after = apply(task, transition, lease_owner="w1", lease_expires=NOW + 60)
    assert (after.lease_owner, after.lease_expires) == ("w1", NOW + 60)


@pytest.mark.parametrize(("event", "dest"), [(Event.FAIL, FAILED), (Event.CANCEL, CANCELLED)])
def test_apply_marks_failed_and_cancelled_refunded(event: Event, dest: State) -> None:
    task = task_in(AI)
    transition = decide(task, event, NOW, D)
    assert isinstance(transition, Transition)
    after = apply(task, transition)
    assert after.state is dest
    assert after.refunded
    assert after.deadline is None


def test_apply_does_not_refund_a_completed_task() -> None:
    task = task_in(WM)
    transition = decide(task, Event.FINISHED, NOW, D)
    assert isinstance(transition, Transition)
    assert not apply(task, transition).refunded


def test_claim_takes_a_free_task_with_a_lease() -> None:
    claimed = claim(task_in(PR), "w1", NOW, 60)
    assert claimed is not None
    assert (claimed.lease_owner, claimed.lease_expires, claimed.deadline) == (
        "w1",
        NOW + 60,
        NOW + 60,
    )
    assert claimed.version == 4


def test_claim_refuses_a_live_lease_of_another_owner() -> None:
    task = task_in(PR, lease_owner="w1", lease_expires=NOW + 1)
    assert claim(task, "w2", NOW, 60) is None


def test_claim_refuses_a_live_lease_even_to_its_own_owner() -> None:
    """Two coroutines of one process (dispatcher and reaper) must not both run a step."""
    task = task_in(WM, lease_owner="w1", lease_expires=NOW + 1)
    assert claim(task, "w1", NOW, 60) is None


def test_renew_extends_only_the_owners_live_lease() -> None:
    task = task_in(WM, lease_owner="w1", lease_expires=NOW + 1)
    renewed = renew(task, "w1", NOW, 60)
    assert renewed is not None and renewed.lease_expires == NOW + 60
    assert renewed.version == task.version + 1
    assert renew(task, "w2", NOW, 60) is None
    assert renew(task.with_changes(lease_expires=NOW - 1), "w1", NOW, 60) is None


def test_claim_takes_over_an_expired_lease() -> None:
    task = task_in(PR, lease_owner="w1", lease_expires=NOW - 0.001)
    taken = claim(task, "w2", NOW, 60)
    assert taken is not None and taken.lease_owner == "w2"


@pytest.mark.parametrize("state", [AI, DONE, FAILED, CANCELLED])
def test_claim_refuses_states_without_work(state: State) -> None:
    assert claim(task_in(state), "w1", NOW, 60) is None


def test_release_drops_the_lease_and_sets_the_deadline() -> None:
    task = task_in(PR, lease_owner="w1", lease_expires=NOW + 30)
    released = release(task, NOW, NOW + 10)
    assert (released.lease_owner, released.lease_expires, released.deadline) == (
        None,
        None,
        NOW + 10,
    )
    assert released.version == task.version + 1


def test_backoff_grows_exponentially_with_jitter() -> None:
    assert [backoff_s(n, 2.0, 0.5) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_s(0, 2.0, 0.5) == 2.0
    assert backoff_s(3, 2.0, 0.0) == 4.0  # jitter 0 halves
    assert backoff_s(3, 2.0, 0.999) == pytest.approx(8.0 * 1.499)


def test_is_valid_path_accepts_the_lifecycle_and_rejects_jumps() -> None:
    happy = [
        (P, PR, Event.START),
        (PR, AI, Event.SUBMITTED),
        (AI, PR, Event.RETRY),
        (PR, AI, Event.SUBMITTED),
        (AI, AI, Event.EXTEND),
        (AI, WM, Event.AI_SUCCEEDED),
        (WM, DONE, Event.FINISHED),
    ]
    assert is_valid_path(happy)
    assert is_valid_path([])
    assert is_valid_path([(P, CANCELLED, Event.CANCEL)])
    assert not is_valid_path([(PR, AI, Event.SUBMITTED)])  # does not start at pending
    assert not is_valid_path([(P, AI, Event.START)])  # wrong destination
    assert not is_valid_path([(P, PR, Event.START), (AI, WM, Event.AI_SUCCEEDED)])  # a gap
    assert not is_valid_path([(P, PR, Event.START), (PR, PR, Event.FINISHED)])  # not allowed
    assert not is_valid_path([(P, CANCELLED, Event.CANCEL), (CANCELLED, PR, Event.RETRY)])


def test_state_of_reads_every_state_and_refuses_what_is_none() -> None:
    """The stored records' parser (``state_of``, a dict lookup) agrees with ``State(value)``."""
    for state in State:
        assert state_of(state.value) is State(state.value)
    for bad in ("", "Pending", "done", "pending "):
        with pytest.raises(ValueError, match="not a valid State"):
            state_of(bad)
