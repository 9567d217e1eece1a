"""The simulator's latency models: the seed write-up's mix, bounds, determinism, bad specs; and its
configuration: a random token per instance, the webhook hosts it may call, and how hookline's
settings become a SimConfig."""

from __future__ import annotations

import random

import pytest

from callbacks.simulator.config import SimConfig, parse_latency
from callbacks.simulator.latency import Fixed, LogNormal, Uniform

N = 20_000
TOLERANCE = 0.015  # ~4.5 standard deviations of a 25 % share over 20,000 samples


def test_seed_mix_proportions_match_the_seed_write_up() -> None:
    model = parse_latency("seed")
    rng = random.Random(1234)
    samples = [model.sample(rng) for _ in range(N)]

    under_40 = sum(10 <= s < 40 for s in samples) / N
    from_40_to_60 = sum(40 <= s < 60 for s in samples) / N
    over_60 = sum(60 <= s <= 120 for s in samples) / N

    assert under_40 == pytest.approx(0.60, abs=TOLERANCE)
    assert from_40_to_60 == pytest.approx(0.25, abs=TOLERANCE)
    assert over_60 == pytest.approx(0.15, abs=TOLERANCE)
    assert under_40 + from_40_to_60 + over_60 == 1.0  # nothing outside [10, 120]


def test_seed_mix_stays_within_bounds() -> None:
    model = parse_latency("seed")
    rng = random.Random(7)
    samples = [model.sample(rng) for _ in range(N)]
    assert min(samples) >= 10.0
    assert max(samples) <= 120.0


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("fixed:2.5", 2.5, 2.5), ("uniform:1:3", 1.0, 3.0), ("lognormal:0:0.5", 0.0, float("inf"))],
)
def test_each_model_respects_its_bounds(spec: str, low: float, high: float) -> None:
    model = parse_latency(spec)
    rng = random.Random(99)
    for _ in range(2_000):
        assert low <= model.sample(rng) <= high


def test_parse_builds_the_named_models() -> None:
    assert parse_latency("fixed:1") == Fixed(1.0)
    assert parse_latency(" Uniform:0.5:2 ") == Uniform(0.5, 2.0)
    assert parse_latency("lognormal:3.2:0.4") == LogNormal(3.2, 0.4)


@pytest.mark.parametrize("spec", ["seed", "uniform:1:90", "lognormal:3:0.6", "fixed:4"])
def test_sampling_is_deterministic_for_a_fixed_seed(spec: str) -> None:
    model = parse_latency(spec)
    first, second = random.Random(42), random.Random(42)
    assert [model.sample(first) for _ in range(500)] == [model.sample(second) for _ in range(500)]


def test_different_seeds_give_different_samples() -> None:
    model = parse_latency("seed")
    a, b = random.Random(1), random.Random(2)
    assert [model.sample(a) for _ in range(50)] != [model.sample(b) for _ in range(50)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown model"),
        ("gaussian:1:2", "unknown model"),
        ("fixed", "wrong arguments"),
        ("fixed:-1", "wrong arguments"),
        ("fixed:1:2", "wrong arguments"),
        ("uniform:3:1", "wrong arguments"),
        ("uniform:1", "wrong arguments"),
        ("lognormal:1:-0.5", "wrong arguments"),
        ("seed:5", "wrong arguments"),
        ("fixed:abc", "must be numbers"),
        ("uniform:1:inf", "must be finite"),
        ("fixed:nan", "must be finite"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_latency(spec)
    assert repr(spec) in str(info.value)


def test_sim_config_rejects_a_bad_latency_spec_at_construction() -> None:
    with pytest.raises(ValueError, match="bad latency spec"):
        SimConfig(latency="sometimes")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_rate": 1.5},
        {"webhook_loss": -0.1},
        {"time_scale": -1.0},
        {"max_in_flight": 0},
        {"webhook_secret": "not-a-secret"},
        {"webhook_secret": "whsec_c2hvcnQ="},
        {"api_token": " "},
    ],
)
def test_sim_config_rejects_out_of_range_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SimConfig"):
        SimConfig(**kwargs)  # type: ignore[arg-type]


def test_sim_config_generates_a_standard_webhooks_secret() -> None:
    a, b = SimConfig(), SimConfig()
    assert a.webhook_secret.startswith("whsec_")
    assert a.webhook_secret != b.webhook_secret
    assert len(a.webhook_key) == 32


def test_sim_config_from_settings_maps_every_sim_setting() -> None:
    from service.providers import sim_config
    from service.settings import Settings

    settings = Settings(
        sim_latency="seed",
        sim_time_scale=0.5,
        sim_failure_rate=0.1,
        sim_webhook_loss=0.2,
        sim_webhook_duplicate=0.3,
        sim_webhook_delay_s=4.0,
        sim_webhook_bad_signature=0.05,
        sim_output_5xx=0.25,
        sim_seed=11,
    )
    config = sim_config(settings, api_token="t0ken")

    assert (config.latency, config.time_scale, config.failure_rate) == ("seed", 0.5, 0.1)
    assert (config.webhook_loss, config.webhook_duplicate) == (0.2, 0.3)
    assert (config.webhook_delay_s, config.webhook_bad_signature) == (4.0, 0.05)
    assert (config.output_5xx, config.seed, config.api_token) == (0.25, 11, "t0ken")
    assert config.webhook_reorder > 0  # a webhook delay turns reordering on
    assert sim_config(Settings()).webhook_reorder == 0.0
    with pytest.raises(TypeError, match="unknown SimConfig fields"):
        sim_config(settings, latency_ms=3)


def test_sim_config_makes_a_random_token_per_instance() -> None:
    tokens = {SimConfig().api_token for _ in range(3)}
    assert len(tokens) == 3 and "sim-token" not in tokens
    assert all(len(token) >= 40 for token in tokens)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8000/v1/callbacks/sim/t?token=x", True),
        ("http://HOOKLINE.example:8000/hook", True),  # names compare case-insensitively
        ("https://hooks.example/anything", True),  # a bare host allows any port
        ("https://hooks.example:8443/anything", True),
        ("http://[::1]:9000/hook", True),
        ("http://127.0.0.1:8001/hook", False),  # another port of an allowed address
        ("http://127.0.0.1/hook", False),  # port 80 is not 8000
        ("http://localhost:8000/hook", False),  # the same machine by another name
        ("http://user@127.0.0.1:8000/hook", False),  # credentials are refused
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://127.0.0.1:99999/hook", False),  # not a URL httpx would send
    ],
)
def test_webhooks_may_go_only_to_the_configured_hosts(url: str, allowed: bool) -> None:
    config = SimConfig(
        webhook_hosts=frozenset(
            {"127.0.0.1:8000", "hookline.example:8000", "Hooks.Example.", "[::1]:9000"}
        )
    )
    assert config.allows_webhook(url) is allowed
    assert SimConfig().allows_webhook("http://127.0.0.1:8000/hook") is False  # none by default


def test_settings_give_the_simulator_its_token_and_hosts() -> None:
    from pydantic import SecretStr

    from service.providers import sim_config, sim_input_hosts, with_sim_token
    from service.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        public_url="https://hookline.example",
        sim_webhook_hosts="hooks.example, 10.0.0.5:9000",
        input_hosts="images.example",
        blob_url="s3://bucket",
        s3_endpoint="http://minio:9000",
        s3_public_endpoint="https://files.example",
    )
    config = sim_config(settings)
    assert config.webhook_hosts == {"hookline.example:443", "hooks.example", "10.0.0.5:9000"}
    assert sim_input_hosts(settings) == {"hookline.example:443", "images.example", "files.example"}

    pinned = with_sim_token(settings)
    assert pinned.sim_api_token is not None and with_sim_token(pinned) is pinned
    assert sim_config(pinned).api_token == pinned.sim_api_token.get_secret_value()
    assert with_sim_token(settings).sim_api_token != pinned.sim_api_token  # random per start
    fixed = settings.model_copy(update={"sim_api_token": SecretStr("fixed-token")})
    assert sim_config(fixed).api_token == "fixed-token"
