"""ReplicateProvider against the Replicate fake over real HTTP, with a real webhook receiver.

Each delivery the adapter verifies is one the fake actually sent and the sink actually received:
submit → webhook → verify → outcome. The fake's clock is fixed at T0, so ``now`` decides
freshness without any sleeping.
"""

from __future__ import annotations

import email.utils
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from callbacks import standard_webhooks
from callbacks.errors import (
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.provider import Delivery, Outcome, Submission
from callbacks.replicate import ReplicateProvider
from callbacks.transport import new_client
from service.providers import build_providers, default_output_hosts
from service.settings import Settings
from tests.fakes import WebhookSink
from tests.fakes.replicate_fake import ReplicateFake
from tests.support.server import serve_app

T0 = 1_750_000_000.0
SIM_TOKEN = "sim-test-token"
URL_A = "https://replicate.delivery/xezq/a1/out-0.webp"
URL_B = "https://replicate.delivery/xezq/a1/out-1.webp"


@dataclass
class Rig:
    fake: ReplicateFake
    sink: WebhookSink
    provider: ReplicateProvider
    http: httpx.AsyncClient
    base_url: str
    hook_url: str

    def submission(self, model: str = "black-forest-labs/flux-schnell", **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": model,
            "prompt": "a portrait in oil",
            "callback_url": self.hook_url,
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))

    async def delivered(self, now: float = T0) -> Delivery:
        return await self.provider.verify(self.sink.last.headers, self.sink.last.body, now)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fake = ReplicateFake(clock=lambda: T0)
    sink = WebhookSink()
    async with (
        serve_app(fake.app) as base_url,
        serve_app(sink.app) as sink_url,
        new_client(timeout=10.0) as http,
    ):
        provider = ReplicateProvider(http, api_token=fake.token, base_url=base_url)
        yield Rig(fake, sink, provider, http, base_url, f"{sink_url}/v1/callbacks/replicate/t1")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- submission ---------------------------------------------------------------------------------


async def test_submit_to_a_model_sends_input_webhook_and_only_the_completed_event(
    rig: Rig,
) -> None:
    job_id = await rig.submitted(
        inputs=("https://in.example/a.png", "https://in.example/b.png"),
        negative_prompt="blurry",
        num_outputs=2,
        params={"guidance": 3.5, "prompt": "ignored: the submission's prompt wins"},
    )
    assert job_id in rig.fake.predictions
    [request] = rig.fake.submitted()
    assert request.path == "/models/black-forest-labs/flux-schnell/predictions"
    assert request.headers["authorization"] == f"Bearer {rig.fake.token}"
    assert "prefer" not in request.headers  # never hold the request open
    body = request.json()
    assert body == {
        "input": {
            "prompt": "a portrait in oil",
            "image": "https://in.example/a.png",
            "num_outputs": 2,
            "negative_prompt": "blurry",
            "guidance": 3.5,
        },
        "webhook": rig.hook_url,
        "webhook_events_filter": ["completed"],
    }


async def test_image_keys_come_from_params_and_are_not_sent_as_inputs(rig: Rig) -> None:
    await rig.submitted(inputs=("https://in.example/a.png",), params={"image_key": "input_image"})
    await rig.submitted(
        inputs=("https://in.example/a.png", "https://in.example/b.png"),
        params={"images_key": "input_images"},
    )
    first, second = (r.json()["input"] for r in rig.fake.submitted())
    assert first["input_image"] == "https://in.example/a.png"
    assert "image" not in first and "image_key" not in first
    assert second["input_images"] == ["https://in.example/a.png", "https://in.example/b.png"]


@pytest.mark.parametrize(
    ("model", "version"),
    [("black-forest-labs/flux-dev:5599ed30703defd1", "5599ed30703defd1"), ("5599ed30", "5599ed30")],
)
async def test_a_versioned_model_goes_to_predictions_with_its_version(
    rig: Rig, model: str, version: str
) -> None:
    await rig.submitted(model=model)
    [request] = rig.fake.submitted()
    assert request.path == "/predictions"
    assert request.json()["version"] == version


async def test_a_deployment_goes_to_its_own_route(rig: Rig) -> None:
    await rig.submitted(model="deployments/acme/portraits")
    assert rig.fake.submitted()[0].path == "/deployments/acme/portraits/predictions"


# -- webhooks -----------------------------------------------------------------------------------


async def test_completed_webhook_verifies_into_a_success_with_every_output(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, [URL_A, URL_B])
    delivery = await rig.delivered()
    assert delivery.job_id == job_id
    assert delivery.delivery_id == rig.sink.last.headers["webhook-id"]
    assert delivery.outcome == Outcome("succeeded", job_id, outputs=(URL_A, URL_B))


async def test_a_single_url_output_is_one_output(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, URL_A)
    assert (await rig.delivered()).outcome == Outcome("succeeded", job_id, outputs=(URL_A,))


async def test_the_secret_is_fetched_once_and_cached(rig: Rig) -> None:
    for _ in range(3):
        job_id = await rig.submitted()
        await rig.fake.complete(job_id, URL_A)
        await rig.delivered()
    assert rig.fake.secret_hits == 1


async def test_a_configured_secret_is_never_fetched(rig: Rig) -> None:
    provider = ReplicateProvider(
        rig.http,
        api_token=rig.fake.token,
        base_url=rig.base_url,
        webhook_secret=rig.fake.webhook_secret,
    )
    job_id = await provider.submit(rig.submission())
    await rig.fake.complete(job_id, URL_A)
    delivery = await provider.verify(rig.sink.last.headers, rig.sink.last.body, T0)
    assert delivery.outcome is not None and delivery.outcome.status == "succeeded"
    assert rig.fake.secret_hits == 0


async def test_a_redelivery_carries_the_same_delivery_id(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, URL_A)
    first = await rig.delivered()
    await rig.fake.deliver(job_id)
    second = await rig.delivered()
    assert len(rig.sink.received) == 2
    assert first.delivery_id == second.delivery_id


async def test_a_rotated_secret_is_accepted_among_several_signatures(rig: Rig) -> None:
    new_secret = standard_webhooks.generate_secret()
    rig.fake.extra_secrets.append(new_secret)
    provider = ReplicateProvider(
        rig.http, api_token=rig.fake.token, base_url=rig.base_url, webhook_secret=new_secret
    )
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, URL_A)
    assert len(rig.sink.last.headers["webhook-signature"].split()) == 2
    delivery = await provider.verify(rig.sink.last.headers, rig.sink.last.body, T0)
    assert delivery.job_id == job_id


async def test_forged_and_replayed_deliveries_are_rejected(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, URL_A)
    got = rig.sink.last
    forged_body = got.body.replace(b"out-0", b"evil-0")
    cases: list[tuple[dict[str, str], bytes, float, str]] = [
        (got.headers, forged_body, T0, "bad_signature"),
        (got.headers, got.body, T0 + 301, "stale_timestamp"),
        (got.headers, got.body, T0 - 301, "stale_timestamp"),
        (
            {k: v for k, v in got.headers.items() if k != "webhook-id"},
            got.body,
            T0,
            "missing_headers",
        ),
    ]
    for hdrs, body, now, code in cases:
        with pytest.raises(WebhookRejected) as info:
            await rig.provider.verify(hdrs, body, now)
        assert info.value.code == code
    wrong = ReplicateProvider(
        rig.http,
        api_token=rig.fake.token,
        base_url=rig.base_url,
        webhook_secret=standard_webhooks.generate_secret(),
    )
    with pytest.raises(WebhookRejected) as info:
        await wrong.verify(got.headers, got.body, T0)
    assert info.value.code == "bad_signature"


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"status": "succeeded"}'])
async def test_a_validly_signed_body_that_is_not_a_prediction_is_malformed(
    rig: Rig, body: bytes
) -> None:
    hdrs = standard_webhooks.sign_headers(rig.fake.webhook_secret, "msg_x", int(T0), body)
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify(hdrs, body, T0)
    assert info.value.code == "malformed_body"


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("fail_validation", Outcome("failed", "", reason="", retryable=False)),
        ("fail_oom", Outcome("failed", "", reason="", retryable=True)),
        ("abort", Outcome("failed", "", reason="", retryable=True)),
    ],
)
async def test_terminal_failures_arrive_as_failed(rig: Rig, finish: str, expected: Outcome) -> None:
    job_id = await rig.submitted()
    if finish == "fail_validation":
        await rig.fake.fail(job_id, "Prediction input failed validation: width must be <= 1440")
    elif finish == "fail_oom":
        await rig.fake.fail(job_id, "CUDA out of memory")
    else:
        await rig.fake.abort(job_id)
    outcome = (await rig.delivered()).outcome
    assert outcome is not None
    assert (outcome.status, outcome.retryable) == (expected.status, expected.retryable)
    assert outcome.reason


# -- poll and cancel ----------------------------------------------------------------------------


async def test_poll_follows_the_prediction_through_its_statuses(rig: Rig) -> None:
    job_id = await rig.submitted()
    assert await rig.provider.poll(job_id, "m") == Outcome("running", job_id)
    await rig.fake.start(job_id)
    assert await rig.provider.poll(job_id, "m") == Outcome("running", job_id)
    await rig.fake.complete(job_id, [URL_A])
    assert await rig.provider.poll(job_id, "m") == Outcome("succeeded", job_id, outputs=(URL_A,))
    rig.fake.remove_data(job_id)
    removed = await rig.provider.poll(job_id, "m")
    assert (removed.status, removed.retryable) == ("failed", True)


async def test_poll_of_an_unknown_prediction_is_a_retryable_failure(rig: Rig) -> None:
    outcome = await rig.provider.poll("nosuchprediction", "m")
    assert (outcome.status, outcome.retryable) == ("failed", True)


async def test_cancel_cancels_and_the_webhook_says_cancelled(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.provider.cancel(job_id, "m")
    assert rig.fake.predictions[job_id]["status"] == "canceled"
    assert [r.path for r in rig.fake.requests][-1] == f"/predictions/{job_id}/cancel"
    delivery = await rig.delivered()
    assert delivery.outcome is not None and delivery.outcome.status == "cancelled"
    assert (await rig.provider.poll(job_id, "m")).status == "cancelled"


# -- errors -------------------------------------------------------------------------------------


async def test_a_5xx_is_retryable(rig: Rig) -> None:
    rig.fake.faults.add(503)
    with pytest.raises(RetryableProviderError) as info:
        await rig.submitted()
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert info.value.retryable


async def test_a_429_is_rate_limited_with_retry_after_seconds(rig: Rig) -> None:
    rig.fake.faults.add(429, retry_after="7")
    with pytest.raises(ProviderRateLimited) as info:
        await rig.submitted()
    assert info.value.retry_after_s == 7


async def test_a_429_retry_after_http_date_is_relative_to_the_clock(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("statemachine.clock.now", lambda: T0)
    rig.fake.faults.add(429, retry_after=email.utils.formatdate(T0 + 30, usegmt=True))
    with pytest.raises(ProviderRateLimited) as info:
        await rig.provider.poll("p", "m")
    assert info.value.retry_after_s == 30


async def test_a_422_is_permanent(rig: Rig) -> None:
    rig.fake.faults.add(422, body={"title": "Input validation failed", "detail": "bad width"})
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted()
    assert "bad width" in info.value.message
    assert not info.value.retryable


async def test_a_wrong_token_is_permanent(rig: Rig) -> None:
    provider = ReplicateProvider(rig.http, api_token="r8_wrong", base_url=rig.base_url)
    with pytest.raises(PermanentProviderError):
        await provider.submit(rig.submission())


async def test_an_unreachable_api_is_retryable_and_the_secret_fetch_too(rig: Rig) -> None:
    provider = ReplicateProvider(rig.http, api_token="t", base_url=closed_port_url())
    with pytest.raises(RetryableProviderError) as info:
        await provider.submit(rig.submission())
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    hdrs = standard_webhooks.sign_headers(rig.fake.webhook_secret, "msg_1", int(T0), b"{}")
    with pytest.raises(RetryableProviderError):
        await provider.verify(hdrs, b"{}", T0)
    with pytest.raises(WebhookRejected) as junk:  # junk is refused without a secret fetch
        await provider.verify({}, b"{}", T0)
    assert junk.value.code == "missing_headers"


# -- output fetching and the registry -----------------------------------------------------------


async def test_fetch_headers_authorise_only_replicate_hosts(rig: Rig) -> None:
    auth = {"Authorization": f"Bearer {rig.fake.token}"}
    assert rig.provider.fetch_headers(URL_A) == auth
    assert rig.provider.fetch_headers("https://pbxt.replicate.delivery/x.png") == auth
    assert rig.provider.fetch_headers(f"{rig.base_url}/files/x.png") == auth
    assert rig.provider.fetch_headers("https://evil.example/replicate.delivery/x.png") == {}
    assert rig.provider.fetch_headers("http://replicate.delivery/x.png") == {}
    assert rig.provider.fetch_headers("https://replicate.delivery.evil.example/x.png") == {}


async def test_registry_builds_configured_providers_and_a_sim_that_fetches_its_secret(
    rig: Rig,
) -> None:
    settings = Settings(
        replicate_api_token=SecretStr("r8_x"),
        fal_key=None,
        bfl_api_key=SecretStr("bfl_x"),
        replicate_webhook_secret=None,
    )
    assert set(build_providers(settings, rig.http)) == {"replicate", "bfl"}

    sim_fake = ReplicateFake(token=SIM_TOKEN, clock=lambda: T0)
    async with serve_app(sim_fake.app) as sim_url:
        providers = build_providers(settings, rig.http, sim_base_url=sim_url, sim_token=SIM_TOKEN)
        assert set(providers) == {"sim", "replicate", "bfl"}
        sim = providers["sim"]
        job_id = await sim.submit(rig.submission())
        await sim_fake.complete(job_id, f"{sim_url}/files/{job_id}.png")
        delivery = await sim.verify(rig.sink.last.headers, rig.sink.last.body, T0)
        assert delivery.outcome == Outcome(
            "succeeded", job_id, outputs=(f"{sim_url}/files/{job_id}.png",)
        )
        assert sim_fake.secret_hits == 1
        assert sim.fetch_headers(f"{sim_url}/files/x.png") == {
            "Authorization": f"Bearer {SIM_TOKEN}"
        }
        port = httpx.URL(sim_url).port
        assert default_output_hosts("sim", sim_base_url=sim_url) == (f"127.0.0.1:{port}",)
    assert "replicate.delivery" in default_output_hosts("replicate")
    assert default_output_hosts("nope") == ()
    assert json.loads(rig.sink.last.body)["id"] == job_id


async def test_a_poll_answered_with_another_prediction_is_not_passed_off_as_this_one(
    rig: Rig,
) -> None:
    job_id = await rig.submitted()
    other = {"id": "someoneelsesprediction0000", "status": "succeeded", "output": [URL_A]}
    rig.fake.faults.add(200, body=other)
    with pytest.raises(RetryableProviderError):
        await rig.provider.poll(job_id, "m")
