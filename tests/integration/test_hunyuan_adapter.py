"""HunyuanProvider against the Hunyuan fake over real HTTP, and its signer against the SDK's.

Hunyuan sends no callbacks: every outcome comes from ``QueryHunyuanImageJob``. Both clocks (the
adapter's and the fake's) are test clocks, so the 5-minute window is tested without waiting.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tencentcloud.common import abstract_client_async
from tencentcloud.common.credential import Credential
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.hunyuan.v20230901.hunyuan_client_async import HunyuanClient

from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.hunyuan import MODEL, HunyuanProvider, tc3_authorization
from callbacks.provider import Outcome, Submission, checked_model
from callbacks.transport import new_client
from tests.fakes.hunyuan_fake import HunyuanFake
from tests.integration.test_provider_paths import HOSTILE_JOB_IDS, HOSTILE_MODELS
from tests.support.server import serve_app

T0 = 1_750_000_000.0
HUNYUAN_HOSTILE = [
    "hunyuan",
    "HUNYUAN-IMAGE",
    "hunyuan-image/../x",
    "hunyuan-image?x=1",
    "hunyuan-image ",
    "hunyuan-image\n",
    "hunyuan-image-v2",
    "SubmitHunyuanImageJob",
]


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    fake: HunyuanFake
    provider: HunyuanProvider
    http: httpx.AsyncClient
    base_url: str
    clock: Clock  # the adapter's
    fake_clock: Clock

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": MODEL,
            "prompt": "水墨画风格的山水",
            "callback_url": "https://hookline.example/v1/callbacks/hunyuan/t1?token=k",
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))

    def provider_with(self, **kw: Any) -> HunyuanProvider:
        args: dict[str, Any] = {
            "secret_id": self.fake.secret_id,
            "secret_key": self.fake.secret_key,
            "base_url": self.base_url,
            "now": self.clock,
            **kw,
        }
        return HunyuanProvider(self.http, **args)


async def _rig(**fake_kw: Any) -> AsyncIterator[Rig]:
    fake_clock, clock = Clock(), Clock()
    fake = HunyuanFake(clock=fake_clock, **fake_kw)
    async with serve_app(fake.app) as base_url, new_client(timeout=10.0) as http:
        provider = HunyuanProvider(
            http,
            secret_id=fake.secret_id,
            secret_key=fake.secret_key,
            base_url=base_url,
            now=clock,
        )
        yield Rig(fake, provider, http, base_url, clock, fake_clock)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for value in _rig():
        yield value


def assert_only_the_api_route(fake: HunyuanFake) -> None:
    stray = [
        (r.method, r.raw_path) for r in fake.requests if (r.method, r.raw_path) != ("POST", "/")
    ]
    assert stray == [], stray


# -- the signature ---------------------------------------------------------------------------------


@pytest.fixture
def sdk_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The SDK's signer reads ``time.time()`` itself: fixed at T0 for the comparison."""

    class FixedTime:
        @staticmethod
        def time() -> float:
            return T0

    monkeypatch.setattr(abstract_client_async, "time", FixedTime)
    yield


@pytest.mark.parametrize("endpoint", ["hunyuan.tencentcloudapi.com", "127.0.0.1:8443"])
@pytest.mark.parametrize(
    ("action", "params"),
    [
        ("SubmitHunyuanImageJob", {"Prompt": "雨中的灯塔", "Num": 2, "Style": "riman"}),
        ("QueryHunyuanImageJob", {"JobId": "1258344703-1750000000-abc-0"}),
    ],
)
async def test_our_signature_is_the_official_sdks(
    sdk_clock: None, endpoint: str, action: str, params: dict[str, Any]
) -> None:
    """The SDK's own TC3 signer (its asyncio client's request builder) and ours agree on the
    Authorization of the same request: same bytes, host, timestamp and keys."""
    profile = ClientProfile(httpProfile=HttpProfile(endpoint=endpoint))
    client = HunyuanClient(Credential("AKIDexample", "example-secret-key"), "ap-guangzhou", profile)
    try:
        request = client._build_req_with_tc3_signature(action, params, {}, {})
    finally:
        await client.close()
    ours = tc3_authorization(
        secret_id="AKIDexample",
        secret_key="example-secret-key",
        host=endpoint,
        body=request.content,
        timestamp=int(T0),
    )
    assert ours == request.headers["Authorization"]
    assert request.headers["X-TC-Timestamp"] == str(int(T0))
    # and the adapter's headers, for the same body, are the SDK's
    async with httpx.AsyncClient() as http:
        provider = HunyuanProvider(
            http,
            secret_id="AKIDexample",
            secret_key="example-secret-key",
            base_url=f"https://{endpoint}",
            now=lambda: T0,
        )
        headers = provider.signed_headers(action, request.content)
    for name in ("Authorization", "Host", "X-TC-Action", "X-TC-Version", "X-TC-Region"):
        assert headers[name] == request.headers[name], name


# -- submission ------------------------------------------------------------------------------------


async def test_submit_sends_the_documented_signed_request(rig: Rig) -> None:
    job_id = await rig.submitted(
        negative_prompt="模糊", num_outputs=2, params={"Style": "riman", "Resolution": "1024:768"}
    )
    [request] = rig.fake.calls()
    host = rig.base_url.removeprefix("http://")
    assert {k: request.headers[k] for k in ("host", "content-type", "x-tc-action")} == {
        "host": host,
        "content-type": "application/json",
        "x-tc-action": "SubmitHunyuanImageJob",
    }
    assert request.headers["x-tc-version"] == "2023-09-01"
    assert request.headers["x-tc-region"] == "ap-guangzhou"
    assert request.headers["x-tc-timestamp"] == str(int(T0))
    assert request.headers["authorization"] == tc3_authorization(
        secret_id=rig.fake.secret_id,
        secret_key=rig.fake.secret_key,
        host=host,
        body=request.body,
        timestamp=int(T0),
    )
    assert request.json() == {
        "Style": "riman",
        "Resolution": "1024:768",
        "Prompt": "水墨画风格的山水",
        "NegativePrompt": "模糊",
        "Num": 2,
    }
    assert rig.fake.jobs[job_id].status == "2"


async def test_an_input_image_goes_as_image_url_or_raw_base64(rig: Rig) -> None:
    png = base64.b64encode(b"\x89PNG fake bytes").decode()
    await rig.submitted(inputs=(f"data:image/png;base64,{png}",))
    await rig.submitted(inputs=("https://in.example/a.png",))
    first, second = (r.json()["ContentImage"] for r in rig.fake.calls())
    assert first == {"ImageBase64": png}
    assert second == {"ImageUrl": "https://in.example/a.png"}


async def test_what_hunyuan_would_refuse_is_refused_before_any_request(rig: Rig) -> None:
    for kw in ({"num_outputs": 0}, {"num_outputs": 5}, {"inputs": ("https://a/1", "https://a/2")}):
        with pytest.raises(PermanentProviderError):
            await rig.submitted(**kw)
    assert rig.fake.requests == []


async def test_a_param_hunyuan_does_not_know_is_a_permanent_refusal(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted(params={"width": 1024})
    assert (info.value.code, info.value.details["tencent_code"]) == (
        "provider_rejected",
        "UnknownParameter",
    )


# -- authentication and the clock ------------------------------------------------------------------


@pytest.mark.parametrize(("skew_s", "accepted"), [(299, True), (-299, True), (301, False)])
async def test_requests_more_than_five_minutes_off_the_servers_clock_are_refused(
    rig: Rig, skew_s: float, accepted: bool
) -> None:
    rig.clock.t = T0 - skew_s
    if accepted:
        assert await rig.submitted()
        return
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted()
    assert (info.value.code, info.value.details["tencent_code"]) == (
        "provider_auth_failed",
        "AuthFailure.SignatureExpire",
    )
    assert rig.fake.jobs == {}


@pytest.mark.parametrize(
    ("keys", "code"),
    [
        ({"secret_key": "a-wrong-secret-key"}, "AuthFailure.SignatureFailure"),
        ({"secret_id": "AKIDsomeoneelse"}, "AuthFailure.SecretIdNotFound"),
        ({"region": "ap-shanghai"}, "UnsupportedRegion"),
    ],
)
async def test_bad_credentials_answer_an_error_in_a_200(
    rig: Rig, keys: dict[str, str], code: str
) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.provider_with(**keys).submit(rig.submission())
    assert info.value.details["tencent_code"] == code
    assert rig.fake.jobs == {}


async def test_a_signature_over_other_bytes_is_refused(rig: Rig) -> None:
    """The fake really checks the bytes: the right headers on another body fail."""
    body = json.dumps({"Prompt": "x"}).encode()
    headers = rig.provider.signed_headers("SubmitHunyuanImageJob", body)
    answer = await rig.http.post(rig.base_url + "/", content=body + b" ", headers=headers)
    assert answer.status_code == 200
    assert answer.json()["Response"]["Error"]["Code"] == "AuthFailure.SignatureFailure"


# -- jobs and outcomes -----------------------------------------------------------------------------


async def test_jobs_queue_one_at_a_time_and_succeed_with_downloadable_images(rig: Rig) -> None:
    first = await rig.submitted(num_outputs=2)
    second = await rig.submitted()
    assert (rig.fake.jobs[first].status, rig.fake.jobs[second].status) == ("2", "1")
    assert await rig.provider.poll(second, MODEL) == Outcome("running", second)
    rig.fake.complete(first)
    assert rig.fake.jobs[second].status == "2"
    outcome = await rig.provider.poll(first, MODEL)
    assert outcome == Outcome(
        "succeeded",
        first,
        outputs=(f"{rig.base_url}/results/{first}/0.png", f"{rig.base_url}/results/{first}/1.png"),
    )
    assert rig.provider.fetch_headers(outcome.outputs[0]) == {}
    got = await rig.http.get(outcome.outputs[0])
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    rig.fake_clock.t = T0 + 3601  # ResultImage URLs are valid for one hour
    assert (await rig.http.get(outcome.outputs[0])).status_code == 403
    assert_only_the_api_route(rig.fake)


async def test_expired_results_answer_403(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.complete(job_id)
    [url] = (await rig.provider.poll(job_id, MODEL)).outputs
    rig.fake.expire_results()
    assert (await rig.http.get(url)).status_code == 403


async def test_a_partial_result_succeeds_with_the_images_made_and_says_what_is_missing(
    rig: Rig,
) -> None:
    job_id = await rig.submitted(num_outputs=3)
    rig.fake.complete(job_id, failed_images=1)
    outcome = await rig.provider.poll(job_id, MODEL)
    assert outcome.status == "succeeded" and len(outcome.outputs) == 2
    assert outcome.reason == "1 image(s) not made: FailedOperation.GenerateImageFailed"


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("FailedOperation.GenerateImageFailed", True),
        ("FailedOperation.ImageDownloadError", True),
        ("OperationDenied.ImageIllegalDetected", False),
        ("OperationDenied.TextIllegalDetected", False),
        ("InvalidParameterValue.ParameterValueError", False),
    ],
)
async def test_a_failed_job_is_retryable_unless_its_code_is_a_refusal(
    rig: Rig, code: str, retryable: bool
) -> None:
    job_id = await rig.submitted()
    rig.fake.fail(job_id, code, "m")
    assert await rig.provider.poll(job_id, MODEL) == Outcome(
        "failed", job_id, reason=f"{code}: m", retryable=retryable
    )


async def test_moderation_of_the_output_is_a_permanent_failure(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.moderate(job_id)
    outcome = await rig.provider.poll(job_id, MODEL)
    assert (outcome.status, outcome.retryable) == ("failed", False)


async def test_a_job_tencent_does_not_know_is_a_retryable_failure(rig: Rig) -> None:
    assert await rig.provider.poll("1258344703-1-nope-0", MODEL) == Outcome(
        "failed", "1258344703-1-nope-0", reason="job not found"
    )


async def test_auto_complete_after_lets_polled_jobs_finish_on_their_own() -> None:
    async for rig in _rig(auto_complete_after=2):
        job_id = await rig.submitted()
        assert (await rig.provider.poll(job_id, MODEL)).status == "running"
        assert (await rig.provider.poll(job_id, MODEL)).status == "succeeded"


async def test_no_callbacks_and_no_cancel(rig: Rig) -> None:
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify({}, b'{"JobId": "x"}', T0)
    assert info.value.code == "no_callbacks"
    job_id = await rig.submitted()
    before = len(rig.fake.requests)
    await rig.provider.cancel(job_id, MODEL)
    assert len(rig.fake.requests) == before


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error", "error_code"),
    [
        ("RequestLimitExceeded", ProviderRateLimited, "provider_rate_limited"),
        ("RequestLimitExceeded.JobNumExceed", ProviderRateLimited, "provider_rate_limited"),
        ("LimitExceeded", ProviderRateLimited, "provider_rate_limited"),
        ("FailedOperation.EngineServerLimitExceeded", ProviderRateLimited, "provider_rate_limited"),
        ("AuthFailure.SignatureExpire", PermanentProviderError, "provider_auth_failed"),
        ("OperationDenied.TextIllegalDetected", PermanentProviderError, "provider_moderated"),
        ("OperationDenied.ImageIllegalDetected", PermanentProviderError, "provider_moderated"),
        ("FailedOperation.ResourcePackExhausted", PermanentProviderError, "provider_account"),
        ("ResourceUnavailable.InArrears", PermanentProviderError, "provider_account"),
        ("InvalidParameter", PermanentProviderError, "provider_rejected"),
        ("InvalidParameterValue.Model", PermanentProviderError, "provider_rejected"),
        ("InternalError", RetryableProviderError, "provider_unavailable"),
        ("FailedOperation.EngineServerError", RetryableProviderError, "provider_unavailable"),
    ],
)
async def test_errors_in_a_200_map_to_the_error_tree(
    rig: Rig, code: str, error: type[Exception], error_code: str
) -> None:
    rig.fake.fail_next(code)
    with pytest.raises(error) as info:
        await rig.submitted()
    assert type(info.value) is error
    assert info.value.code == error_code  # type: ignore[attr-defined]
    assert info.value.details["tencent_code"] == code  # type: ignore[attr-defined]


async def test_a_banned_prompt_is_refused_as_moderation_at_submit(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted(prompt="something forbidden")
    assert info.value.code == "provider_moderated"


async def test_http_errors_are_translated(rig: Rig) -> None:
    rig.fake.faults.add(502)
    with pytest.raises(RetryableProviderError):
        await rig.submitted()
    rig.fake.faults.add(200, body={"not": "a Response"})
    with pytest.raises(RetryableProviderError):
        await rig.submitted()


# -- what may reach a URL or a body ----------------------------------------------------------------


async def test_hostile_models_are_refused_before_any_request(rig: Rig) -> None:
    for model in HOSTILE_MODELS + HUNYUAN_HOSTILE:
        with pytest.raises(InvalidModel):
            await rig.submitted(model=model)
        with pytest.raises(InvalidModel):
            checked_model(rig.provider, model)
    assert rig.fake.requests == []


async def test_hostile_job_ids_are_refused(rig: Rig) -> None:
    for job_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await rig.provider.poll(job_id, MODEL)
    assert rig.fake.requests == []
    for job_id in HOSTILE_JOB_IDS:
        if job_id:
            rig.fake.faults.add(200, body={"Response": {"JobId": job_id, "RequestId": "r"}})
            with pytest.raises(InvalidJobId):
                await rig.submitted()
    assert_only_the_api_route(rig.fake)
