"""Price what runs, through a real server: the catalogue decides which providers, models and params
a user may choose and what a task costs; a refusal is a 422 with a code that writes and charges
nothing; the price grows with the outputs and with priced params; an admin may run what is
configured but not offered; an ``Idempotency-Key`` replay is free; ``/v1/styles`` shows it all.

"Nothing written" is checked as tests/integration/test_api.py does: the caller's balance, task
list and ledger are unchanged, and the store holds no task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_api import (
    account,
    all_tasks,
    assert_error,
    body_for,
    new_caller,
    post_task,
)
from tests.support.hookline import Hookline, running_hookline
from tests.support.manual_provider import ManualProvider

HOLD = {"sim_latency": "fixed:600", "sim_webhook_loss": 1.0}  # tasks wait in ai_processing

CATALOGUE = """
[providers.sim]
models = ["hookline/sim-xl"]

[plain]
cost = 3
[plain.user_params]
seed = { min = 0, max = 1000 }

[styles.sized]
prompt_template = "sized: {prompt}"
params = { width = 1024, height = 1024 }
[styles.sized.price]
sizes = [{ max_pixels = 1048576, per_output = 8 }, { max_pixels = 4194304, per_output = 20 }]
[styles.sized.user_params]
width = { choices = [1024, 2048] }
height = { choices = [1024, 2048] }
steps.min = 1
steps.max = 50
steps.surcharges = [{ above = 30, per_output = 2 }, { above = 40, per_output = 5 }]

[styles.based]
prompt_template = "based: {prompt}"
providers = []            # no other provider may be chosen
models = { sim = [] }     # and no other model on sim
[styles.based.price]
base = 2
per_output = 3
[styles.based.user_params]
quality = { choices = ["standard", "hd"], prices = { hd = 4 } }
"""


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    catalogue = tmp_path / "styles.toml"
    catalogue.write_text(CATALOGUE)
    async with running_hookline(tmp_path, styles_path=catalogue, **HOLD) as running:
        # configured, but offered by no catalogue entry: only an admin may choose it
        running.runtime.providers["private"] = ManualProvider(
            http=running.runtime.http, name="private"
        )
        yield running


# --- refusals: 422 with a code, nothing written or charged ----------------------------------------

REFUSALS: dict[str, tuple[dict[str, Any], str, str | None]] = {
    # name: (body fields, the error code, the param the error must name)
    "model_not_offered": ({"model": "acme/private-deployment"}, "model_not_allowed", None),
    "model_of_another_provider": (
        {"model": "black-forest-labs/flux-dev"},
        "model_not_allowed",
        None,
    ),
    "model_the_style_does_not_offer": (
        {"style": "based", "model": "hookline/sim-xl"},
        "model_not_allowed",
        None,
    ),
    "provider_not_offered": ({"provider": "private"}, "provider_not_allowed", None),
    "param_not_listed": (
        {"style": "sized", "params": {"scheduler": "ddim"}},
        "param_not_allowed",
        "scheduler",
    ),
    "param_listed_for_another_style": (
        {"style": "based", "params": {"steps": 10}},
        "param_not_allowed",
        "steps",
    ),
    "param_on_plain": ({"params": {"guidance": 3.5}}, "param_not_allowed", "guidance"),
    "value_outside_choices": (
        {"style": "sized", "params": {"width": 4096}},
        "bad_param_value",
        "width",
    ),
    "value_above_range": ({"style": "sized", "params": {"steps": 51}}, "bad_param_value", "steps"),
    "value_of_wrong_type": (
        {"style": "sized", "params": {"steps": 2.5}},
        "bad_param_value",
        "steps",
    ),
    "bool_for_an_integer": ({"params": {"seed": True}}, "bad_param_value", "seed"),
    "string_not_a_choice": (
        {"style": "based", "params": {"quality": "ultra"}},
        "bad_param_value",
        "quality",
    ),
    "image_key": ({"params": {"image_key": "mask_image"}}, "reserved_param", "image_key"),
    "images_key": ({"params": {"images_key": "refs"}}, "reserved_param", "images_key"),
    "webhook": ({"params": {"webhook": "https://evil.example/hook"}}, "reserved_param", "webhook"),
    "webhook_url": (
        {"params": {"webhook_url": "https://evil.example/"}},
        "reserved_param",
        "webhook_url",
    ),
    "webhook_secret": ({"params": {"webhook_secret": "mine"}}, "reserved_param", "webhook_secret"),
    "fal_webhook": (
        {"params": {"fal_webhook": "https://evil.example/"}},
        "reserved_param",
        "fal_webhook",
    ),
    "input_image": (
        {"params": {"input_image": "http://169.254.169.254/"}},
        "reserved_param",
        "input_image",
    ),
    "image_url": (
        {"params": {"image_url": "http://10.0.0.1/x.png"}},
        "reserved_param",
        "image_url",
    ),
    "num_images": ({"params": {"num_images": 4}}, "reserved_param", "num_images"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_what_the_catalogue_does_not_offer_is_refused_and_charges_nothing(
    hl: Hookline, case: str
) -> None:
    fields, code, param = REFUSALS[case]
    alice = await new_caller(hl, "alice")
    before = await account(hl, alice)
    error = assert_error(await post_task(hl, alice, body_for(alice, **fields)), 422, code)
    if param is not None:
        assert error["details"]["param"] == param and repr(param) in error["message"], error
    elif code == "model_not_allowed":
        assert "hookline/sim" in error["details"], error  # what may be chosen instead
    else:
        assert error["details"] == ["sim"], error
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def test_steering_params_are_refused_even_for_an_admin(hl: Hookline) -> None:
    root = await new_caller(hl, "root", credits=100, admin=True)
    before = await account(hl, root)
    for name in ("image_key", "webhook_url", "input_image"):
        r = await post_task(hl, root, body_for(root, params={name: "x"}))
        assert assert_error(r, 422, "reserved_param")["details"] == {"param": name}
    assert await account(hl, root) == before
    assert await all_tasks(hl) == []


# --- what it costs ------------------------------------------------------------------------------

PRICES: list[tuple[dict[str, Any], int]] = [
    # (body fields, the cost the catalogue gives)
    ({}, 3),
    ({"num_outputs": 2}, 6),
    ({"num_outputs": 4, "params": {"seed": 7}}, 12),
    ({"style": "sized"}, 8),  # 1024×1024
    ({"style": "sized", "params": {"width": 2048, "height": 2048}}, 20),
    ({"style": "sized", "params": {"width": 2048}}, 20),  # 2048×1024: over the first tier
    ({"style": "sized", "num_outputs": 3, "params": {"width": 2048, "height": 2048}}, 60),
    ({"style": "sized", "params": {"steps": 30}}, 8),  # not above 30
    ({"style": "sized", "params": {"steps": 31}}, 10),
    ({"style": "sized", "num_outputs": 2, "params": {"steps": 45}}, 26),  # 2 × (8 + 5)
    ({"style": "based"}, 5),  # 2 + 3
    ({"style": "based", "num_outputs": 4}, 14),
    ({"style": "based", "num_outputs": 2, "params": {"quality": "hd"}}, 16),  # 2 + 2 × (3 + 4)
    ({"style": "based", "params": {"quality": "standard"}}, 5),
]


async def test_the_price_grows_with_outputs_and_priced_params(hl: Hookline) -> None:
    """Each task costs what the catalogue says; the debit is that cost, stored on the task."""
    alice = await new_caller(hl, "alice", credits=1000)
    balance = 1000
    for fields, cost in PRICES:
        r = await post_task(hl, alice, body_for(alice, **fields))
        assert r.status_code == 202, (fields, r.text)
        task = r.json()
        assert task["cost"] == cost, (fields, task)
        assert task["num_outputs"] == fields.get("num_outputs", 1)
        balance -= cost
        after = await account(hl, alice)
        assert after.balance == balance, fields
        assert after.ledger[-1] == ("debit", -cost, task["id"])
        got = await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(alice.key))
        assert got.json()["cost"] == cost


async def test_the_debit_is_the_computed_price_or_402(hl: Hookline) -> None:
    """The price is known before the debit: a balance that covers one output but not three is
    refused with the full price, and nothing is written."""
    poor = await new_caller(hl, "poor", credits=50)
    before = await account(hl, poor)
    body = body_for(poor, style="sized", num_outputs=3, params={"width": 2048, "height": 2048})
    error = assert_error(await post_task(hl, poor, body), 402, "insufficient_credits")
    assert error["details"] == {"balance": 50, "cost": 60}
    assert await account(hl, poor) == before
    assert await all_tasks(hl) == []


async def test_a_user_may_choose_a_listed_model_and_only_that(hl: Hookline) -> None:
    alice = await new_caller(hl, "alice")
    r = await post_task(hl, alice, body_for(alice, model="hookline/sim-xl"))
    assert r.status_code == 202, r.text
    assert (r.json()["provider"], r.json()["model"]) == ("sim", "hookline/sim-xl")
    r = await post_task(hl, alice, body_for(alice, provider="sim", model="hookline/sim"))
    assert r.status_code == 202, r.text
    before = await account(hl, alice)
    r = await post_task(hl, alice, body_for(alice, model="hookline/sim-xxl"))
    assert assert_error(r, 422, "model_not_allowed")["details"] == [
        "hookline/sim",
        "hookline/sim-xl",
    ]
    assert await account(hl, alice) == before


async def test_an_admin_may_run_a_configured_provider_and_model_nobody_offers(
    hl: Hookline,
) -> None:
    """The private provider gets the job with the admin's model, at the style's price."""
    root = await new_caller(hl, "root", credits=100, admin=True)
    body = body_for(root, provider="private", model="acme/private-deployment", num_outputs=2)
    r = await post_task(hl, root, body)
    assert r.status_code == 202, r.text
    task = r.json()
    assert (task["provider"], task["model"], task["cost"]) == (
        "private",
        "acme/private-deployment",
        6,
    )
    private = hl.runtime.providers["private"]
    assert isinstance(private, ManualProvider)
    async with asyncio.timeout(30):
        while not private.jobs:
            await asyncio.sleep(0.02)
    [job] = private.jobs.values()
    assert job.submission.model == "acme/private-deployment" and job.submission.num_outputs == 2
    assert (await account(hl, root)).balance == 94


async def test_an_idempotent_replay_of_a_priced_task_is_free(hl: Hookline) -> None:
    """The replay returns the first task and charges nothing, even once the balance could no
    longer pay for it; the key with another price-relevant field is a 409 that writes nothing."""
    alice = await new_caller(hl, "alice", credits=100)
    headers = {"Idempotency-Key": "order-7"}
    body = body_for(alice, style="sized", num_outputs=3, params={"width": 2048, "height": 2048})
    first = await post_task(hl, alice, body, headers)
    assert first.status_code == 202 and first.json()["cost"] == 60, first.text
    again = await post_task(hl, alice, body, headers)  # 40 credits left: less than 60
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    after = await account(hl, alice)
    assert after.balance == 40
    assert after.ledger == [("grant", 100, None), ("debit", -60, first.json()["id"])]
    for changed in (
        {**body, "num_outputs": 2},
        {**body, "params": {"width": 1024, "height": 1024}},
        {**body, "model": "hookline/sim-xl"},
    ):
        assert_error(await post_task(hl, alice, changed, headers), 409, "idempotency_conflict")
    assert await account(hl, alice) == after


# --- what /v1/styles shows ---------------------------------------------------------------------


async def test_styles_show_the_price_rule_choices_and_user_params(hl: Hookline) -> None:
    alice = await new_caller(hl, "alice")
    r = await hl.client.get("/v1/styles", headers=hl.auth(alice.key))
    assert r.status_code == 200, r.text
    listing = r.json()
    styles = {s["name"]: s for s in listing["items"]}
    assert set(styles) == {"sized", "based"}
    sized = styles["sized"]
    assert sized["cost"] == 8
    assert sized["price"] == {
        "base": 0,
        "per_output": None,
        "sizes": [
            {"max_pixels": 1048576, "per_output": 8},
            {"max_pixels": 4194304, "per_output": 20},
        ],
    }
    assert sized["providers"] == {"sim": ["hookline/sim", "hookline/sim-xl"]}  # not "private"
    assert sized["user_params"] == {
        "width": {"type": "integer", "choices": [1024, 2048]},
        "height": {"type": "integer", "choices": [1024, 2048]},
        "steps": {
            "type": "integer",
            "minimum": 1,
            "maximum": 50,
            "surcharges": [{"above": 30, "per_output": 2}, {"above": 40, "per_output": 5}],
        },
    }
    based = styles["based"]
    assert based["price"] == {"base": 2, "per_output": 3, "sizes": []} and based["cost"] == 5
    assert based["providers"] == {"sim": ["hookline/sim"]}  # its own list replaces [providers]
    assert based["user_params"] == {
        "quality": {"type": "string", "choices": ["standard", "hd"], "prices": {"hd": 4}}
    }
    plain = listing["plain"]
    assert plain["name"] == "plain" and plain["cost"] == 3
    assert plain["price"] == {"base": 0, "per_output": 3, "sizes": []}
    assert plain["user_params"] == {"seed": {"type": "integer", "minimum": 0, "maximum": 1000}}


async def test_the_default_catalogue_prices_its_styles_by_output_and_size(tmp_path: Path) -> None:
    """service/styles.toml: portrait, anime and vintage still run; anime is the issue's example
    (8 per output at 1024×1024, 20 at 2048×2048); a task without a style is 5 per output."""
    async with running_hookline(tmp_path, **HOLD) as hl:
        alice = await new_caller(hl, "alice", credits=1000)
        listed = await hl.client.get("/v1/styles", headers=hl.auth(alice.key))
        costs = {s["name"]: s["cost"] for s in listed.json()["items"]}
        assert costs == {"portrait": 10, "anime": 8, "vintage": 5, "ink": 6}
        assert listed.json()["plain"]["cost"] == 5
        # ink runs on DashScope, which this hookline has no credentials for: a clear refusal
        unconfigured = await post_task(hl, alice, body_for(alice, style="ink"))
        assert_error(unconfigured, 422, "unknown_provider")
        shipped: list[tuple[dict[str, Any], int]] = [
            ({"style": "anime"}, 8),
            ({"style": "anime", "params": {"width": 2048, "height": 2048}}, 20),
            ({"style": "anime", "num_outputs": 4}, 32),
            ({"style": "portrait", "params": {"seed": 7}}, 10),
            ({"style": "vintage", "num_outputs": 2}, 9),
            ({"num_outputs": 3}, 15),
        ]
        for fields, cost in shipped:
            r = await post_task(hl, alice, body_for(alice, **fields))
            assert r.status_code == 202 and r.json()["cost"] == cost, (fields, r.text)
        refused = await post_task(hl, alice, body_for(alice, style="anime", model="acme/x"))
        assert_error(refused, 422, "model_not_allowed")
