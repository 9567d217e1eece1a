"""The catalogue (service/styles.py) on its own: what fails to load and why, what a task costs,
which params a user may set, and which provider and model run a task."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from service.settings import SIM_MODEL, Settings
from service.styles import DEFAULT_COST, Catalogue, CatalogueError, Style, steers_io
from statemachine.errors import BadRequest

STYLE = '[styles.s]\nprompt_template = "{prompt}"\n'


def parse(text: str) -> Catalogue:
    return Catalogue.from_dict(tomllib.loads(text), source="test.toml")


def default_model(provider: str) -> str:
    return {"replicate": "black-forest-labs/flux-schnell"}.get(provider, SIM_MODEL)


# --- loading --------------------------------------------------------------------------------------


LOAD_ERRORS: dict[str, tuple[str, str]] = {
    # name: (catalogue, a part of the error message)
    "image_key_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { image_key = { type = "string" } }',
        "[styles.s]: user_params.image_key steers",
    ),
    "images_key_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { images_key = { type = "string" } }',
        "user_params.images_key steers",
    ),
    "webhook_url_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { webhook_url = { type = "string" } }',
        "user_params.webhook_url steers",
    ),
    "fal_webhook_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { fal_webhook = { type = "string" } }',
        "user_params.fal_webhook steers",
    ),
    "an_input_image_key_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { input_image_2 = { type = "string" } }',
        "user_params.input_image_2 steers",
    ),
    "a_url_as_user_param": (
        STYLE + 'cost = 1\nuser_params = { lora_weights_url = { type = "string" } }',
        "user_params.lora_weights_url steers",
    ),
    "a_webhook_in_the_styles_params": (
        STYLE + 'cost = 1\nparams = { webhook_secret = "x" }',
        "params.webhook_secret is set by the adapter itself",
    ),
    "a_reserved_param_on_plain": (
        '[plain]\ncost = 1\nuser_params = { webhook = { type = "string" } }',
        "[plain]: user_params.webhook steers",
    ),
    "cost_and_price": (STYLE + "cost = 1\nprice = { per_output = 1 }", "either cost"),
    "no_price": (STYLE, "either cost"),
    "negative_cost": (STYLE + "cost = -1", "cost: must be a whole number of credits"),
    "fractional_cost": (STYLE + "cost = 1.5", "cost: must be a whole number of credits"),
    "per_output_and_sizes": (
        STYLE + "price = { per_output = 1, sizes = [{ max_pixels = 1, per_output = 1 }] }",
        "either per_output or sizes",
    ),
    "sizes_not_ascending": (
        STYLE
        + "params = { width = 8, height = 8 }\n"
        + "price.sizes = [{ max_pixels = 100, per_output = 1 },"
        + " { max_pixels = 64, per_output = 2 }]",
        "ascend by max_pixels",
    ),
    "sizes_without_a_default_size": (
        STYLE + "price.sizes = [{ max_pixels = 100, per_output = 1 }]",
        "needs an integer params.width",
    ),
    "sizes_below_what_users_may_ask": (
        STYLE
        + "params = { width = 1024, height = 1024 }\n"
        + "price.sizes = [{ max_pixels = 1048576, per_output = 8 }]\n"
        + "user_params.width = { min = 64, max = 2048 }",
        "(2097152 pixels) is above the largest price.sizes tier (1048576)",
    ),
    "a_typo_in_a_style": (STYLE + "cost = 1\nuser_param = {}", "unknown keys ['user_param']"),
    "a_typo_at_the_top": ("[style.s]\ncost = 1", "unknown keys ['style']"),
    "a_typo_in_a_rule": (
        STYLE + "cost = 1\nuser_params = { steps = { min = 1, maximum = 9 } }",
        "user_params.steps: unknown keys ['maximum']",
    ),
    "a_range_without_max": (
        STYLE + "cost = 1\nuser_params = { steps = { min = 1 } }",
        "needs min and max",
    ),
    "min_above_max": (
        STYLE + "cost = 1\nuser_params = { steps = { min = 9, max = 1 } }",
        "min is above max",
    ),
    "a_rule_without_a_type": (
        STYLE + "cost = 1\nuser_params = { style_preset = {} }",
        "give its type",
    ),
    "surcharges_on_a_string": (
        STYLE
        + 'cost = 1\nuser_params.q = { type = "string", surcharges = '
        + "[{ above = 1, per_output = 1 }] }",
        "surcharges are for integer and number ranges",
    ),
    "a_price_for_no_choice": (
        STYLE + 'cost = 1\nuser_params.q = { choices = ["a", "b"], prices = { c = 1 } }',
        "prices (by choice): unknown keys ['c']",
    ),
    "a_choice_of_another_type": (
        STYLE + 'cost = 1\nuser_params.q = { type = "integer", choices = [1, "two"] }',
        "choice 'two' is not a integer",
    ),
    "a_default_the_rule_refuses": (
        STYLE + "cost = 1\nparams = { width = 4096 }\nuser_params.width = { min = 64, max = 2048 }",
        "params.width = 4096, but it must be from 64 to 2048",
    ),
    "models_not_a_list": ('[providers.sim]\nmodels = "hookline/sim"', "models must be a list"),
    "an_unknown_provider_key": ("[providers.sim]\nmodel = []", "unknown keys ['model']"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_a_catalogue_it_cannot_honour_fails_to_load_naming_the_key(case: str) -> None:
    text, message = LOAD_ERRORS[case]
    with pytest.raises(CatalogueError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("test.toml")


def test_a_file_that_is_not_toml_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "styles.toml"
    path.write_text("[styles.s\n")
    with pytest.raises(CatalogueError, match=str(path)):
        Catalogue.load(path)


def test_hookline_styles_path_names_the_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "styles.toml"
    path.write_text(STYLE + 'cost = 1\nuser_params = { webhook = { type = "string" } }')
    monkeypatch.setenv("HOOKLINE_STYLES_PATH", str(path))
    with pytest.raises(CatalogueError, match=r"user_params\.webhook steers"):
        Catalogue.load(Settings(_env_file=None).styles_path)  # type: ignore[call-arg]


def test_the_default_catalogue_loads_and_prices_its_own_params() -> None:
    catalogue = Catalogue.load()
    assert {s.name for s in catalogue.all()} == {"portrait", "anime", "vintage", "ink"}
    assert {s.name: s.cost for s in catalogue.all()} == {
        "portrait": 10,
        "anime": 8,
        "vintage": 5,
        "ink": 6,
    }
    ink = catalogue.get("ink")  # a Chinese provider's style, falling back to another
    assert ink.provider == "dashscope" and ink.fallbacks == ("kling",)
    assert catalogue.get(None).cost == DEFAULT_COST
    for style in catalogue.all():
        assert not any(steers_io(name) for name in style.user_params)
        style.check_params({k: v for k, v in style.params.items() if k in style.user_params})


def test_the_operator_may_steer_the_input_image_key_in_a_styles_own_params() -> None:
    style = parse(STYLE + 'cost = 1\nparams = { image_key = "input_image" }').get("s")
    assert style.params == {"image_key": "input_image"}


def test_a_bare_cost_is_credits_per_output_and_no_plain_means_the_default() -> None:
    catalogue = parse(STYLE + "cost = 5")
    assert catalogue.get("s").cost_of(3, {}) == 15
    assert catalogue.get(None).cost_of(2, {}) == 2 * DEFAULT_COST
    assert catalogue.get(None).user_params == {}
    assert catalogue.providers == {}


@pytest.mark.parametrize(
    ("name", "steers"),
    [
        ("image_key", True),
        ("images_key", True),
        ("webhook", True),
        ("Webhook_URL", True),
        ("webhook_events_filter", True),
        ("fal_webhook", True),
        ("callback_url", True),
        ("image", True),
        ("image_url", True),
        ("input_image", True),
        ("input_image_3", True),
        ("image_prompt", True),
        ("mask_image", True),
        ("control_images", True),
        ("prompt", True),
        ("num_outputs", True),
        ("num_images", True),
        ("sync_mode", True),
        ("width", False),
        ("seed", False),
        ("image_size", False),
        ("num_inference_steps", False),
        ("guidance_scale", False),
        ("output_format", False),
    ],
)
def test_which_keys_steer_io(name: str, steers: bool) -> None:
    assert steers_io(name) is steers


# --- prices and params ---------------------------------------------------------------------------

PRICED = parse(
    """
[styles.sized]
prompt_template = "{prompt}"
params = { width = 1024, height = 1024, quality = "standard" }
price.base = 1
price.sizes = [{ max_pixels = 1048576, per_output = 8 }, { max_pixels = 4194304, per_output = 20 }]
user_params.width = { min = 64, max = 2048 }
user_params.height = { min = 64, max = 2048 }
user_params.steps = { min = 1, max = 50, surcharges = [{ above = 30, per_output = 2 }] }
user_params.cfg = { min = 0.5, max = 9.5 }
user_params.quality = { choices = ["standard", "hd"], prices = { hd = 3 } }
user_params.tiled = { type = "boolean" }
user_params.note = { type = "string", max_length = 5 }
user_params.size = { choices = [512, 1024] }
"""
).get("sized")


@pytest.mark.parametrize(
    ("num_outputs", "params", "cost"),
    [
        (1, {}, 9),
        (4, {}, 33),
        (1, {"width": 2048, "height": 2048}, 21),
        (2, {"width": 1025}, 41),
        (1, {"steps": 30}, 9),
        (1, {"steps": 31}, 11),
        (2, {"quality": "hd", "steps": 50}, 27),  # 1 + 2 × (8 + 3 + 2)
        (1, {"tiled": True, "note": "hi", "cfg": 2.5, "size": 512}, 9),
    ],
)
def test_the_cost_is_base_plus_outputs_times_their_price(
    num_outputs: int, params: dict[str, object], cost: int
) -> None:
    PRICED.check_params(params)  # type: ignore[arg-type]
    assert PRICED.cost_of(num_outputs, {**PRICED.params, **params}) == cost


@pytest.mark.parametrize(
    ("params", "code", "problem"),
    [
        ({"scheduler": "ddim"}, "param_not_allowed", "is not one style 'sized' lets you set"),
        ({"image_key": "x"}, "reserved_param", "is set by hookline itself"),
        ({"width": 4096}, "bad_param_value", "must be from 64 to 2048"),
        ({"width": 1024.0}, "bad_param_value", "must be an integer"),
        ({"width": True}, "bad_param_value", "must be an integer"),
        ({"cfg": "2"}, "bad_param_value", "must be a number"),
        ({"quality": "ultra"}, "bad_param_value", "must be one of ['standard', 'hd']"),
        ({"size": 1024.0}, "bad_param_value", "must be an integer"),
        ({"size": 1000}, "bad_param_value", "must be one of [512, 1024]"),
        ({"tiled": 1}, "bad_param_value", "must be true or false"),
        ({"note": "too long"}, "bad_param_value", "must be at most 5 characters"),
    ],
)
def test_a_param_outside_the_allowlist_is_refused_by_name(
    params: dict[str, object], code: str, problem: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        PRICED.check_params(params)  # type: ignore[arg-type]
    [name] = params
    assert caught.value.code == code
    assert caught.value.message.startswith(f"param {name!r}") and problem in caught.value.message
    assert caught.value.details["param"] == name


# --- which provider and model run ----------------------------------------------------------------

CHOICES = parse(
    """
[providers.sim]
models = ["hookline/sim-xl"]
[providers.replicate]
models = ["black-forest-labs/flux-dev"]

[plain]
cost = 1

[styles.pinned]
prompt_template = "{prompt}"
cost = 1
provider = "replicate"
model = "acme/pinned"
providers = ["sim"]
models = { sim = [] }
"""
)
CONFIGURED = ("sim", "replicate", "private")


def choose(style: Style, provider: str | None, model: str | None, *, admin: bool) -> object:
    try:
        return CHOICES.choose(
            style,
            provider=provider,
            model=model,
            default_provider="sim",
            default_model=default_model,
            configured=CONFIGURED,
            admin=admin,
        )
    except BadRequest as exc:
        return exc.code, exc.details


@pytest.mark.parametrize(
    ("style", "provider", "model", "user", "admin"),
    [
        (None, None, None, ("sim", SIM_MODEL), ("sim", SIM_MODEL)),
        (None, None, "hookline/sim-xl", ("sim", "hookline/sim-xl"), ("sim", "hookline/sim-xl")),
        (
            None,
            "replicate",
            None,
            ("replicate", "black-forest-labs/flux-schnell"),
            ("replicate", "black-forest-labs/flux-schnell"),
        ),
        (
            None,
            None,
            "acme/private",
            ("model_not_allowed", [SIM_MODEL, "hookline/sim-xl"]),
            ("sim", "acme/private"),
        ),
        (
            None,
            "private",
            None,
            ("provider_not_allowed", ["sim", "replicate"]),
            ("private", SIM_MODEL),
        ),
        (
            None,
            "midjourney",
            None,
            ("unknown_provider", ["sim", "replicate"]),  # "private" is not offered: not shown
            ("unknown_provider", ["private", "replicate", "sim"]),
        ),
        # the style's model runs on its own provider; on another, that provider's default
        ("pinned", None, None, ("replicate", "acme/pinned"), ("replicate", "acme/pinned")),
        ("pinned", "sim", None, ("sim", SIM_MODEL), ("sim", SIM_MODEL)),
        (
            "pinned",
            "sim",
            "hookline/sim-xl",
            ("model_not_allowed", [SIM_MODEL]),
            ("sim", "hookline/sim-xl"),
        ),
        (
            "pinned",
            "replicate",
            "black-forest-labs/flux-dev",
            ("replicate", "black-forest-labs/flux-dev"),
            ("replicate", "black-forest-labs/flux-dev"),
        ),
    ],
)
def test_the_provider_and_model_a_task_runs_on(
    style: str | None, provider: str | None, model: str | None, user: object, admin: object
) -> None:
    chosen = CHOICES.get(style)
    assert choose(chosen, provider, model, admin=False) == user
    assert choose(chosen, provider, model, admin=True) == admin


def test_the_choices_shown_are_the_configured_ones_home_first() -> None:
    pinned = CHOICES.get("pinned")
    assert CHOICES.choices(pinned, "sim", default_model, CONFIGURED) == {
        "replicate": ["acme/pinned", "black-forest-labs/flux-dev"],
        "sim": [SIM_MODEL],
    }
    plain = CHOICES.get(None)
    assert CHOICES.choices(plain, "sim", default_model, ("sim",)) == {
        "sim": [SIM_MODEL, "hookline/sim-xl"]
    }
