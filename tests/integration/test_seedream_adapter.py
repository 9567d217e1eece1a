"""SeedreamProvider against the Seedream fake over real HTTP.

Seedream is synchronous: ``generate`` is the whole job. The fake can hold a call until the test
releases it, so "in flight" and "no answer within the timeout" are shown without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from callbacks.errors import (
    InvalidModel,
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.provider import Outcome, Submission, SyncProvider, checked_model
from callbacks.seedream import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    LIMITS,
    QUOTA,
    SeedreamProvider,
    validate_model,
)
from callbacks.transport import new_client
from tests.fakes.seedream_fake import ROUTE, SeedreamFake
from tests.integration.test_provider_paths import HOSTILE_MODELS
from tests.support.server import serve_app

T0 = 1_750_000_000.0
TASK_ID = "tsk_0123456789abcdef01234567"
PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake bytes").decode()
SEEDREAM_HOSTILE = [
    "seedream-4-0",
    "doubao-seedream",
    "DOUBAO-SEEDREAM-4-0-250828",
    "doubao-seedream-4-0-250828/../x",
    "doubao-seedream--4",
    "doubao-seedream-4.0",
    "doubao-seedream-4-0-250828 ",
    "doubao-pro-32k",
    "ep",
    "ep-",
    "images/generations",
    "doubao-seedream-" + "a" * 60,
]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    fake: SeedreamFake
    provider: SeedreamProvider
    http: httpx.AsyncClient
    base_url: str  # the adapter's: the fake's host + /api/v3
    clock: Clock

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": TASK_ID,
            "attempt": 1,
            "model": DEFAULT_MODEL,
            "prompt": "a lighthouse in the rain",
            "callback_url": "https://hookline.example/v1/callbacks/seedream/t1?token=k",
            **kw,
        }
        return Submission(**fields)

    async def generated(self, **kw: Any) -> Outcome:
        return await self.provider.generate(self.submission(**kw))

    def provider_with(self, **kw: Any) -> SeedreamProvider:
        args: dict[str, Any] = {"api_key": self.fake.key, "base_url": self.base_url, **kw}
        return SeedreamProvider(self.http, **args)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = Clock()
    fake = SeedreamFake(clock=clock)
    async with serve_app(fake.app) as served, new_client(timeout=10.0) as http:
        base_url = served + "/api/v3"
        provider = SeedreamProvider(http, api_key=fake.key, base_url=base_url)
        yield Rig(fake, provider, http, base_url, clock)


def assert_only_the_api_route(fake: SeedreamFake) -> None:
    stray = [
        (r.method, r.raw_path)
        for r in fake.requests
        if (r.method, r.raw_path) != ("POST", ROUTE) and not r.path.startswith("/results/")
    ]
    assert stray == [], stray


# -- the contract ----------------------------------------------------------------------------------


async def test_the_adapter_is_synchronous_with_no_published_quota() -> None:
    async with httpx.AsyncClient() as http:
        provider = SeedreamProvider(http, api_key="k")
    assert isinstance(provider, SyncProvider)
    assert (provider.arrival, provider.quota, provider.limits) == ("sync", QUOTA, LIMITS)
    assert (QUOTA.submits_per_s, QUOTA.polls_per_s, QUOTA.concurrency) == (0.0, 0.0, 0)
    assert LIMITS.accepts_data_uri is True
    assert provider.timeout_s == 120.0
    assert DEFAULT_BASE_URL == "https://ark.cn-beijing.volces.com/api/v3"


async def test_generate_sends_the_documented_request_and_answers_with_the_images(
    rig: Rig,
) -> None:
    rig.fake.request_id = lambda: "021750000000000abcdef0123456789abcdef0123456789"
    outcome = await rig.generated(
        negative_prompt="blurry", params={"size": "2K", "seed": 7, "watermark": False}
    )
    [request] = rig.fake.calls()
    assert request.headers["authorization"] == f"Bearer {rig.fake.key}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "size": "2K",
        "seed": 7,
        "watermark": False,
        "model": DEFAULT_MODEL,
        "prompt": "a lighthouse in the rain",
        "response_format": "url",
    }
    [url] = outcome.outputs
    assert outcome == Outcome(
        "succeeded", "021750000000000abcdef0123456789abcdef0123456789", outputs=(url,)
    )
    assert url.startswith(rig.base_url.removesuffix("/api/v3") + "/results/")
    assert rig.provider.fetch_headers(url) == {}
    got = await rig.http.get(url)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    rig.clock.t = T0 + 86_401  # result URLs live 24 hours
    assert (await rig.http.get(url)).status_code == 403
    assert_only_the_api_route(rig.fake)


async def test_expired_results_answer_403(rig: Rig) -> None:
    [url] = (await rig.generated()).outputs
    rig.fake.expire_results()
    assert (await rig.http.get(url)).status_code == 403


async def test_inputs_go_as_image_one_as_a_string_several_as_a_list(rig: Rig) -> None:
    await rig.generated(inputs=("https://in.example/a.png",))
    await rig.generated(inputs=(PNG_URI, "https://in.example/b.png"))
    await rig.generated(params={"response_format": "b64_json"})
    one, two, forced = (r.json() for r in rig.fake.calls())
    assert one["image"] == "https://in.example/a.png"
    assert two["image"] == [PNG_URI, "https://in.example/b.png"]
    assert forced["response_format"] == "url"


@pytest.mark.parametrize(
    "kw",
    [
        {"num_outputs": 2},
        {"num_outputs": 0},
        {"params": {"sequential_image_generation": "auto"}},
        {"params": {"stream": True}},
        {"inputs": tuple(f"https://in.example/{i}.png" for i in range(15))},
    ],
)
async def test_what_cannot_be_asked_of_seedream_is_refused_before_any_request(
    rig: Rig, kw: dict[str, Any]
) -> None:
    with pytest.raises(PermanentProviderError):
        await rig.generated(**kw)
    assert rig.fake.requests == []


async def test_sequential_disabled_may_be_said_explicitly(rig: Rig) -> None:
    outcome = await rig.generated(params={"sequential_image_generation": "disabled"})
    assert len(outcome.outputs) == 1


async def test_a_request_id_outside_the_grammar_gives_a_job_id_of_our_own(rig: Rig) -> None:
    for hostile in ("../../x", "a/b", "x" * 200, "id with spaces"):
        rig.fake.request_id = functools.partial(str, hostile)
        outcome = await rig.generated()
        assert re.fullmatch(rf"{TASK_ID}-1-[0-9a-f]{{8}}", outcome.job_id), outcome.job_id
    second = await rig.generated(attempt=2)
    assert second.job_id.startswith(f"{TASK_ID}-2-")
    other = await rig.generated(attempt=2)
    assert other.job_id != second.job_id  # unique per call


# -- the call in flight and its timeout ------------------------------------------------------------


async def test_a_held_call_is_in_flight_until_the_provider_answers(rig: Rig) -> None:
    gate = rig.fake.hold()
    call = asyncio.create_task(rig.generated())
    await rig.fake.waiting.wait()
    assert not call.done()
    assert len(rig.fake.calls()) == 1
    gate.set()
    outcome = await call
    assert outcome.status == "succeeded"


async def test_no_answer_within_timeout_s_is_retryable(rig: Rig) -> None:
    gate = rig.fake.hold()
    provider = rig.provider_with(timeout_s=0.2)
    try:
        with pytest.raises(RetryableProviderError) as info:
            await provider.generate(rig.submission())
    finally:
        gate.set()  # let the fake's handler end
    assert "no answer within 0.2 s" in info.value.message


async def test_each_call_carries_its_own_timeout_not_the_clients() -> None:
    """The shared client's default (here 1 s) would cut a call Seedream takes tens of seconds to
    answer: the request goes out with the adapter's ``timeout_s``."""
    fake = SeedreamFake()
    seen: list[dict[str, float]] = []

    async def on_request(request: httpx.Request) -> None:
        seen.append(request.extensions["timeout"])

    async with (
        serve_app(fake.app) as served,
        httpx.AsyncClient(timeout=1.0, event_hooks={"request": [on_request]}) as http,
    ):
        provider = SeedreamProvider(http, api_key=fake.key, base_url=served + "/api/v3")
        submission = Submission(TASK_ID, 1, DEFAULT_MODEL, "a cat", "https://h.example/cb")
        await provider.generate(submission)
    assert seen == [{"connect": 10.0, "read": 120.0, "write": 120.0, "pool": 120.0}]


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "in_band"),
    [
        ("input_text", False),
        ("input_image", False),
        ("output_image", False),
        ("output_image", True),
    ],
)
async def test_moderation_is_a_permanent_refusal(rig: Rig, kind: str, in_band: bool) -> None:
    rig.fake.moderate_next(kind, in_band=in_band)
    with pytest.raises(PermanentProviderError) as info:
        await rig.generated()
    assert info.value.code == "provider_moderated"
    assert info.value.details["ark_code"].endswith("SensitiveContentDetected")
    assert info.value.details["request_id"]


async def test_a_sensitive_prompt_is_refused_by_the_fake_as_ark_does(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.generated(prompt="something forbidden")
    assert info.value.details["ark_code"] == "InputTextSensitiveContentDetected"


async def test_a_rate_limit_honours_retry_after(rig: Rig) -> None:
    rig.fake.fail_next("RateLimitExceeded.EndpointRPMExceeded", status=429, retry_after="3")
    with pytest.raises(ProviderRateLimited) as info:
        await rig.generated()
    assert info.value.retry_after_s == 3.0
    assert info.value.details["ark_code"] == "RateLimitExceeded.EndpointRPMExceeded"
    rig.fake.faults.add(429)  # a bare 429, no Ark body
    with pytest.raises(ProviderRateLimited) as bare:
        await rig.generated()
    assert bare.value.retry_after_s is None


async def test_bad_credentials_are_a_permanent_auth_failure(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.provider_with(api_key="wrong").generate(rig.submission())
    assert info.value.code == "provider_auth_failed"
    assert info.value.details["ark_code"] == "AuthenticationError"


@pytest.mark.parametrize(
    ("status", "code", "error", "error_code"),
    [
        (400, "InvalidParameter", PermanentProviderError, "provider_rejected"),
        (429, "QuotaExceeded", PermanentProviderError, "provider_account"),
        (403, "AccountOverdueError", PermanentProviderError, "provider_account"),
        (404, "ModelNotOpen", PermanentProviderError, "provider_account"),
        (500, "InternalServiceError", RetryableProviderError, "provider_unavailable"),
        (503, "ServiceUnavailable", RetryableProviderError, "provider_unavailable"),
    ],
)
async def test_ark_codes_map_to_the_error_tree(
    rig: Rig, status: int, code: str, error: type[Exception], error_code: str
) -> None:
    rig.fake.fail_next(code, status=status)
    with pytest.raises(error) as info:
        await rig.generated()
    assert type(info.value) is error
    assert info.value.code == error_code  # type: ignore[attr-defined]


async def test_a_model_ark_does_not_serve_is_rejected(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.generated(model="doubao-seedream-9-9-999999")
    assert info.value.details["ark_code"] == "InvalidEndpointOrModel.NotFound"


async def test_http_faults_and_malformed_answers_are_retryable(rig: Rig) -> None:
    rig.fake.faults.add(502)
    with pytest.raises(RetryableProviderError):
        await rig.generated()
    rig.fake.faults.add(200, body={"data": []})
    with pytest.raises(RetryableProviderError):
        await rig.generated()
    rig.fake.faults.add(200, body={"error": {"code": "InternalServiceError", "message": "m"}})
    with pytest.raises(RetryableProviderError):
        await rig.generated()


async def test_no_jobs_no_webhooks_nothing_to_cancel(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError):
        await rig.provider.submit(rig.submission())
    with pytest.raises(PermanentProviderError):
        await rig.provider.poll("021750000000000abc", DEFAULT_MODEL)
    await rig.provider.cancel("021750000000000abc", DEFAULT_MODEL)
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify({}, b"{}", T0)
    assert info.value.code == "no_webhooks"
    assert rig.fake.requests == []


# -- what may reach a request ----------------------------------------------------------------------


def test_real_model_names_and_endpoint_ids_are_in_the_grammar() -> None:
    for model in (
        "doubao-seedream-4-0-250828",
        "doubao-seedream-4-5-251128",
        "doubao-seedream-3-0-t2i-250415",
        "doubao-seededit-3-0-i2i-250628",
        "ep-20250828123456-abcde",
    ):
        assert validate_model(model) == model


async def test_hostile_models_are_refused_before_any_request(rig: Rig) -> None:
    for model in HOSTILE_MODELS + SEEDREAM_HOSTILE:
        with pytest.raises(InvalidModel):
            await rig.generated(model=model)
        with pytest.raises(InvalidModel):
            checked_model(rig.provider, model)
    assert rig.fake.requests == []
