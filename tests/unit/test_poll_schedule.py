"""The poll schedule of providers whose outcomes must be asked for (issue 15), on a fake clock:
the first poll at the expected latency, then a jittered doubling backoff within the hard cap, each
poll a quiet write (no history entry, no feed event); and the pacing of polls and submits."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from callbacks.provider import Quota
from service.settings import ProviderQuotaSetting, ProviderTiming, Settings
from service.steps.pacing import Bucket, Pacing
from statemachine.decide import Deadlines, Transition, decide, default_deadline, poll_delay_s
from statemachine.outcome import Outcome
from statemachine.rules import Adopt, Extend, Overdue, PollLater, Retry, judge, record
from statemachine.states import Event, State
from statemachine.task import Attempt, HistoryEntry
from tests.support.factories import T0, make_task

POLLED = Deadlines(
    ai_deadline_s=600,
    ai_hard_cap_s=1800,
    first_poll_s=30,
    poll_interval_s=5,
    poll_max_interval_s=60,
)
WEBHOOK = dataclasses.replace(POLLED, first_poll_s=None)
SUBMITTED = T0 + 10
JOB = "job-1"


def waiting(polls: int = 0, now: float = SUBMITTED):
    history = (
        HistoryEntry(State.PENDING, State.PROCESSING, "start", T0 + 1),
        HistoryEntry(State.PROCESSING, State.AI_PROCESSING, "submitted", SUBMITTED),
    )
    return make_task(
        state=State.AI_PROCESSING,
        version=3,
        attempts=1,
        provider_job_id=JOB,
        attempt_log=(Attempt(1, "sim", "m", JOB, submitted_at=SUBMITTED),),
        history=history,
        deadline=now,
        polls=polls,
        updated_at=now,
    )


def test_the_first_poll_comes_at_the_expected_latency() -> None:
    assert default_deadline(State.AI_PROCESSING, SUBMITTED, POLLED) == SUBMITTED + 30
    assert default_deadline(State.AI_PROCESSING, SUBMITTED, WEBHOOK) == SUBMITTED + 600
    processing = waiting().with_changes(state=State.PROCESSING, provider_job_id=None)
    moved = decide(processing, Event.SUBMITTED, SUBMITTED, POLLED)
    assert isinstance(moved, Transition) and moved.deadline == SUBMITTED + 30


@pytest.mark.parametrize(
    ("polls", "jitter", "expected"),
    [
        (1, 0.5, 5.0),  # the first repeat: the base interval
        (2, 0.5, 10.0),
        (3, 0.5, 20.0),
        (4, 0.5, 40.0),
        (5, 0.5, 60.0),  # capped
        (50, 0.5, 60.0),
        (1, 0.0, 2.5),  # jitter spreads ±50 %
        (1, 0.999, 5.0 * 1.499),
    ],
)
def test_the_poll_backoff_doubles_up_to_its_cap(polls: int, jitter: float, expected: float) -> None:
    assert poll_delay_s(polls, POLLED, jitter) == pytest.approx(expected)


def test_a_running_job_of_a_polled_provider_is_polled_again_quietly() -> None:
    """On a fake clock, a job polled four times: each poll schedules the next one later, with
    no history entry (no feed event) and the polls counted."""
    task = waiting(now=SUBMITTED + 30)
    now = SUBMITTED + 30
    delays = []
    for _ in range(4):
        news = Overdue(JOB, answer=Outcome("running", JOB))
        decision = judge(task, news, now, POLLED)
        assert isinstance(decision, PollLater)
        stored = record(task, decision, now, POLLED)
        assert stored is not None
        assert stored.history == task.history  # quiet: nothing for the change feed
        assert stored.state is State.AI_PROCESSING and stored.polls == task.polls + 1
        assert stored.version == task.version + 1
        assert stored.deadline == pytest.approx(now + decision.delay_s)
        delays.append(decision.delay_s)
        task, now = stored, now + decision.delay_s
    assert delays == [5.0, 10.0, 20.0, 40.0]  # the default jitter is the midpoint


def test_a_failed_poll_is_also_retried_on_the_schedule() -> None:
    decision = judge(waiting(polls=2), Overdue(JOB), SUBMITTED + 100, POLLED)
    assert decision == PollLater(20.0)


def test_the_schedule_ends_at_the_hard_cap() -> None:
    near = SUBMITTED + 1800 - 3
    decision = judge(waiting(polls=10), Overdue(JOB, Outcome("running", JOB)), near, POLLED)
    assert decision == PollLater(pytest.approx(3.0))
    over = judge(waiting(), Overdue(JOB, Outcome("running", JOB)), SUBMITTED + 1800, POLLED)
    assert isinstance(over, Retry) and over.code == "timeout"


def test_a_final_answer_settles_a_polled_job() -> None:
    answer = Outcome("succeeded", JOB, outputs=("https://cdn.example/1.png",))
    decision = judge(waiting(polls=3), Overdue(JOB, answer), SUBMITTED + 90, POLLED)
    assert isinstance(decision, Adopt)


def test_a_webhook_provider_keeps_the_extension_with_history() -> None:
    decision = judge(waiting(), Overdue(JOB, Outcome("running", JOB)), SUBMITTED + 700, WEBHOOK)
    assert isinstance(decision, Extend)


def test_a_new_attempt_starts_the_schedule_again() -> None:
    decision = judge(
        waiting(polls=7), Outcome("failed", JOB, reason="boom"), SUBMITTED + 100, POLLED
    )
    assert isinstance(decision, Retry)
    stored = record(waiting(polls=7), decision, SUBMITTED + 100, POLLED)
    assert stored is not None and stored.polls == 0


def test_settings_give_a_polled_provider_its_schedule() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        provider_timings={
            "dashscope": ProviderTiming(expected_latency_s=90, poll_interval_s=3),
            "replicate": ProviderTiming(expected_latency_s=10, poll_interval_s=3),
        },
    )
    polled = settings.deadlines_for("dashscope", "wan", polled=True)
    assert polled.first_poll_s == 90 and polled.poll_interval_s == 3 and polled.polled
    assert polled.ai_deadline_s == 180
    default = settings.deadlines_for("hunyuan", "x", polled=True)
    assert default.first_poll_s == settings.poll_first_s
    webhook = settings.deadlines_for("replicate", "m")
    assert webhook.first_poll_s is None and not webhook.polled
    assert webhook.poll_interval_s == settings.deadlines().poll_interval_s


# --- pacing ---------------------------------------------------------------------------------------


def test_a_bucket_spaces_calls_at_its_rate() -> None:
    bucket = Bucket(rate=2.0)  # one call every 0.5 s
    assert bucket.reserve(100.0) == 0.0
    assert bucket.reserve(100.0) is None  # the next is 0.5 s away
    assert bucket.reserve(100.0, max_wait=0.5) == pytest.approx(0.5)
    assert bucket.reserve(100.0, max_wait=0.5) is None  # 1.0 s away now
    assert bucket.earliest(100.0) == pytest.approx(101.0)
    assert bucket.reserve(101.0) == 0.0


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = Bucket(rate=1.0, burst=3)
    assert [bucket.reserve(10.0) for _ in range(4)] == [0.0, 0.0, 0.0, None]
    assert bucket.reserve(11.0) == 0.0


def test_calls_in_any_second_never_exceed_the_rate() -> None:
    """Reserving as fast as tokens come, over 100 simulated seconds: at most ``rate`` calls in
    each second."""
    bucket = Bucket(rate=7.0)
    now, calls = 0.0, []
    while now < 100.0:
        wait = bucket.reserve(now, max_wait=math.inf)
        assert wait is not None
        calls.append(now + wait)
        now += 0.01
    assert all(b - a >= 1 / 7 - 1e-9 for a, b in itertools.pairwise(calls))
    per_second: dict[int, int] = {}
    for at in calls:
        second = math.floor(at + 1e-9)  # float sums of 1/7 land a hair before the second
        per_second[second] = per_second.get(second, 0) + 1
    assert max(per_second.values()) <= 7


def test_an_unlimited_bucket_never_waits_until_paused() -> None:
    bucket = Bucket(rate=0.0)
    assert all(bucket.reserve(5.0) == 0.0 for _ in range(1000))
    bucket.pause(until=20.0)
    assert bucket.reserve(10.0) is None
    assert bucket.reserve(20.0) == 0.0


def test_retry_after_pauses_then_the_rate_resumes() -> None:
    clock = [100.0]
    pacing = Pacing({}, concurrency=64, now=lambda: clock[0])
    pacing._buckets[("p", "poll")] = Bucket(rate=10.0)
    assert pacing.reserve("p", "poll") == 0.0
    pacing.pause("p", "poll", 30.0)
    assert pacing.reserve("p", "poll", max_wait=5.0) is None
    assert pacing.wait_s("p", "poll") == pytest.approx(30.0)
    clock[0] = 130.0
    assert pacing.reserve("p", "poll") == 0.0
    assert pacing.reserve("p", "poll") is None  # one per 0.1 s again, no burst after the pause


class _P:
    def __init__(self, quota: Quota) -> None:
        self.quota = quota


def test_concurrency_is_the_smaller_of_the_setting_and_the_published_limit() -> None:
    providers = {"hunyuan": _P(Quota(concurrency=1)), "replicate": _P(Quota()), "x": _P(Quota())}
    pacing = Pacing(
        providers,  # type: ignore[arg-type]
        overrides={"x": Quota(concurrency=200, polls_per_s=3)},
        concurrency=64,
        now=lambda: 0.0,
    )
    assert pacing.concurrency("hunyuan") == 1
    assert pacing.concurrency("replicate") == 64
    assert pacing.concurrency("x") == 200  # an operator's override wins
    assert pacing.quota("x").polls_per_s == 3
    unlimited = Pacing(providers, concurrency=0, now=lambda: 0.0)  # type: ignore[arg-type]
    assert unlimited.concurrency("hunyuan") == 1 and unlimited.concurrency("replicate") == 0


def test_quota_settings_parse_and_refuse_nonsense() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        provider_quotas={"dashscope": {"submits_per_s": 2, "polls_per_s": 10, "concurrency": 2}},
    )
    assert settings.provider_quotas["dashscope"] == ProviderQuotaSetting(
        submits_per_s=2, polls_per_s=10, concurrency=2
    )
    with pytest.raises(ValueError):
        Settings(_env_file=None, provider_quotas={"x": {"polls_per_s": -1}})  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Settings(_env_file=None, provider_quotas={"x": {"rate": 1}})  # type: ignore[call-arg]
