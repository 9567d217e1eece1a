"""Settings: per-provider and per-model timings refine the documented defaults; defaults come
from the parts they configure; comma-separated settings read as typed sets and lists."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from callbacks import bfl, fal, replicate
from service.settings import SIM_MODEL, Settings, split_csv
from statemachine.decide import Deadlines


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type, call-arg]


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


def test_timing_defaults_are_the_machines_deadlines() -> None:
    assert settings().deadlines() == Deadlines()


def test_provider_url_defaults_are_the_adapters() -> None:
    s = settings()
    assert (s.replicate_base_url, s.bfl_base_url) == (
        replicate.DEFAULT_BASE_URL,
        bfl.DEFAULT_BASE_URL,
    )
    assert (s.fal_base_url, s.fal_jwks_url) == (fal.DEFAULT_BASE_URL, fal.DEFAULT_JWKS_URL)


def test_default_model_is_the_providers_model_setting_else_the_simulators() -> None:
    s = settings(replicate_model="a/b", fal_model="fal-ai/c", bfl_model="d")
    assert [s.default_model(p) for p in ("replicate", "fal", "bfl")] == ["a/b", "fal-ai/c", "d"]
    assert s.default_model("sim") == SIM_MODEL


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ("", ()),
        (" , ,", ()),
        ("a", ("a",)),
        (" a , b,,c ", ("a", "b", "c")),
        ("b,a,b", ("b", "a", "b")),  # order kept, nothing dropped but blanks
    ],
)
def test_split_csv_strips_items_and_drops_blanks(value: str, items: tuple[str, ...]) -> None:
    assert split_csv(value) == items


def test_comma_separated_settings_read_as_typed_values() -> None:
    s = settings(
        roles=" api, reaper ,",
        input_hosts="img.example.com, cdn.example.com:8443",
        output_hosts="out.example.com,",
        cors_origins="https://b.example, https://a.example",
    )
    assert s.role_set() == {"api", "reaper"}
    assert s.input_host_set() == {"img.example.com", "cdn.example.com:8443"}
    assert s.output_host_set() == frozenset({"out.example.com"})
    assert s.cors_origin_list() == ["https://b.example", "https://a.example"]


def test_unset_output_hosts_means_provider_defaults_but_empty_means_none() -> None:
    assert settings().output_host_set() is None
    assert settings(output_hosts="").output_host_set() == frozenset()
    assert settings().input_host_set() == frozenset()
    assert settings().cors_origin_list() == []
    assert settings().role_set() == {"api", "dispatcher", "reaper"}


def test_comma_separated_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOKLINE_OUTPUT_HOSTS", "a.example, b.example")
    monkeypatch.setenv("HOOKLINE_ROLES", "dispatcher")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.output_host_set() == frozenset({"a.example", "b.example"})
    assert s.role_set() == {"dispatcher"}


def test_env_example_names_real_settings_and_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """.env.example stays true: every variable it shows is a setting, and with every line
    uncommented the settings load."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    pairs = re.findall(r"^# (HOOKLINE_[A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE)
    assert len(pairs) > 40
    fields = set(Settings.model_fields)
    assert [n for n, _ in pairs if n.removeprefix("HOOKLINE_").lower() not in fields] == []
    for provider in ("OPENAI", "DASHSCOPE", "KLING", "HUNYUAN", "SEEDREAM"):
        assert any(n.startswith(f"HOOKLINE_{provider}_") for n, _ in pairs)
    for name, value in pairs:
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.provider_quotas["dashscope"].submits_per_s == 2
    assert settings.openai_webhook_secret is not None
