"""Per-provider and per-model timings refine the documented defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings
from statemachine.decide import Deadlines


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_provider_then_model_timings_refine_the_defaults() -> None:
    s = settings(
        ai_deadline_s=600,
        max_attempts=3,
        provider_timings={
            "replicate": {"ai_deadline_s": 300, "max_attempts": 2},
            "replicate:owner/slow": {"ai_hard_cap_s": 3000},
            "fal": {"expected_latency_s": 20},
        },
    )
    fast = s.deadlines_for("replicate", "owner/fast")
    assert (fast.ai_deadline_s, fast.max_attempts, fast.ai_hard_cap_s) == (300, 2, 1800)
    slow = s.deadlines_for("replicate", "owner/slow")
    assert (slow.ai_deadline_s, slow.ai_hard_cap_s) == (300, 3000)
    assert s.deadlines_for("fal", "m").ai_deadline_s == 40  # twice the expected latency
    assert s.deadlines_for("bfl", "m") == s.deadlines()


def test_timings_refine_a_given_base() -> None:
    base = Deadlines(ai_deadline_s=5)
    s = settings(provider_timings={"sim": {"max_attempts": 1}})
    refined = s.deadlines_for("sim", "x", base=base)
    assert (refined.ai_deadline_s, refined.max_attempts) == (5, 1)


def test_unknown_timing_fields_are_refused_at_start_up() -> None:
    with pytest.raises(ValidationError):
        settings(provider_timings={"sim": {"deadline": 5}})


def test_timings_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLINE_PROVIDER_TIMINGS", '{"sim": {"ai_hard_cap_s": 99}}')
    assert Settings(_env_file=None).deadlines_for("sim", "m").ai_hard_cap_s == 99  # type: ignore[call-arg]
