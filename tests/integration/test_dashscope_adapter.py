"""DashScopeProvider against the DashScope fake over real HTTP.

DashScope sends no callbacks: every outcome comes from ``GET /tasks/{task_id}``. The fake's clock
is a test clock, so the 24-hour life of result URLs is tested without waiting.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from callbacks.dashscope import (
    DEFAULT_BASE_URL,
    INTL_BASE_URL,
    LIMITS,
    QUOTA,
    DashScopeProvider,
    validate_model,
)
from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.provider import Outcome, Submission, checked_model
from callbacks.transport import new_client
from tests.fakes.dashscope_fake import IMAGE2IMAGE, TEXT2IMAGE, DashScopeFake
from tests.integration.test_provider_paths import HOSTILE_JOB_IDS, HOSTILE_MODELS
from tests.support.logs import captured_logs
from tests.support.server import serve_app

T0 = 1_750_000_000.0
T2I = "wan2.2-t2i-flash"
EDIT = "wanx2.1-imageedit"
I2I = "wan2.5-i2i-preview"
PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake bytes").decode()
DASHSCOPE_HOSTILE = [
    "WAN2.2-T2I-FLASH",
    "wan2.2--t2i",
    "wan2.2-t2i-",
    "-wan",
    "2wan",
    "wan_2",
    "wan2.2-t2i-flash/../tasks",
    "tasks/x/cancel",
    "wan2.2-t2i-flash?x=1",
    "wan" + "x" * 70,
]
# Every route DashScope documents for this adapter (``[^/]+``: a single segment).
ROUTES = [
    ("POST", re.escape(TEXT2IMAGE)),
    ("POST", re.escape(IMAGE2IMAGE)),
    ("GET", r"/tasks/[A-Za-z0-9][A-Za-z0-9_-]*"),
    ("POST", r"/tasks/[A-Za-z0-9][A-Za-z0-9_-]*/cancel"),
]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    fake: DashScopeFake
    provider: DashScopeProvider
    http: httpx.AsyncClient
    base_url: str
    clock: Clock

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "tsk_0123456789abcdef01234567",
            "attempt": 1,
            "model": T2I,
            "prompt": "a lighthouse in the rain",
            "callback_url": "https://hookline.example/v1/callbacks/dashscope/t1?token=k",
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))


async def _rig(**fake_kw: Any) -> AsyncIterator[Rig]:
    clock = Clock()
    fake = DashScopeFake(clock=clock, **fake_kw)
    async with serve_app(fake.app) as base_url, new_client(timeout=10.0) as http:
        provider = DashScopeProvider(http, api_key=fake.key, base_url=base_url)
        yield Rig(fake, provider, http, base_url, clock)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for value in _rig():
        yield value


def assert_documented(fake: DashScopeFake) -> None:
    """Every API request the fake received is on a documented route."""
    api = [r for r in fake.requests if not r.path.startswith("/results/")]
    stray = [
        (r.method, r.raw_path)
        for r in api
        if not any(m == r.method and re.fullmatch(p, r.raw_path) for m, p in ROUTES)
    ]
    assert stray == [], stray


# -- submission ------------------------------------------------------------------------------------


async def test_the_adapters_defaults_are_the_published_ones() -> None:
    assert (QUOTA.submits_per_s, QUOTA.polls_per_s, QUOTA.concurrency) == (2.0, 10.0, 2)
    assert LIMITS.accepts_data_uri is True
    assert DEFAULT_BASE_URL == "https://dashscope.aliyuncs.com/api/v1"
    assert INTL_BASE_URL == "https://dashscope-intl.aliyuncs.com/api/v1"
    async with httpx.AsyncClient() as http:
        provider = DashScopeProvider(http, api_key="k")
    assert (provider.arrival, provider.quota, provider.limits) == ("poll", QUOTA, LIMITS)


async def test_text_to_image_is_submitted_asynchronously_as_documented(rig: Rig) -> None:
    job_id = await rig.submitted(
        negative_prompt="blurry",
        num_outputs=2,
        params={"size": "1024*1024", "seed": 7, "prompt_extend": False},
    )
    [request] = rig.fake.requests
    assert (request.method, request.path) == ("POST", TEXT2IMAGE)
    assert request.headers["authorization"] == f"Bearer {rig.fake.key}"
    assert request.headers["x-dashscope-async"] == "enable"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": T2I,
        "input": {"prompt": "a lighthouse in the rain", "negative_prompt": "blurry"},
        "parameters": {"size": "1024*1024", "seed": 7, "prompt_extend": False, "n": 2},
    }
    assert rig.fake.tasks[job_id].status == "RUNNING"


async def test_an_imageedit_model_goes_to_the_image2image_route_with_a_base_image(
    rig: Rig,
) -> None:
    await rig.submitted(model=EDIT, inputs=(PNG_URI,))
    await rig.submitted(model=EDIT, inputs=("https://in.example/a.png", "https://in.example/m.png"))
    await rig.submitted(
        model=EDIT, inputs=("https://in.example/a.png",), params={"function": "expand"}
    )
    plain, masked, expand = rig.fake.submits()
    assert {plain.path, masked.path, expand.path} == {IMAGE2IMAGE}
    assert plain.json()["input"] == {
        "prompt": "a lighthouse in the rain",
        "base_image_url": PNG_URI,
        "function": "description_edit",
    }
    assert masked.json()["input"] == {
        "prompt": "a lighthouse in the rain",
        "base_image_url": "https://in.example/a.png",
        "mask_image_url": "https://in.example/m.png",
        "function": "description_edit_with_mask",
    }
    assert expand.json()["input"]["function"] == "expand"
    assert "function" not in expand.json()["parameters"]


async def test_wan25_i2i_takes_every_input_as_the_images_list(rig: Rig) -> None:
    await rig.submitted(model=I2I, inputs=(PNG_URI, "https://in.example/b.png"))
    [request] = rig.fake.submits()
    assert request.path == IMAGE2IMAGE
    assert request.json()["input"]["images"] == [PNG_URI, "https://in.example/b.png"]


async def test_a_text_to_image_input_is_the_reference_image(rig: Rig) -> None:
    await rig.submitted(model="wanx-v1", inputs=("https://in.example/ref.png",))
    [request] = rig.fake.submits()
    assert request.path == TEXT2IMAGE
    assert request.json()["input"]["ref_img"] == "https://in.example/ref.png"


@pytest.mark.parametrize(
    "kw",
    [
        {"num_outputs": 0},
        {"num_outputs": 5},
        {"inputs": ("https://a/1", "https://a/2")},  # text-to-image: one reference at most
        {"model": EDIT, "inputs": ("https://a/1", "https://a/2", "https://a/3")},
        {"model": I2I, "inputs": tuple(f"https://a/{i}" for i in range(4))},
    ],
)
async def test_what_dashscope_would_refuse_is_refused_before_any_request(
    rig: Rig, kw: dict[str, Any]
) -> None:
    with pytest.raises(PermanentProviderError):
        await rig.submitted(**kw)
    assert rig.fake.requests == []


async def test_the_fake_refuses_a_synchronous_call_and_a_model_on_the_wrong_route(
    rig: Rig,
) -> None:
    """The fake holds the contract the adapter relies on: without ``X-DashScope-Async`` the call
    is refused, and each model family has its own route."""
    auth = {"Authorization": f"Bearer {rig.fake.key}"}
    body = {"model": T2I, "input": {"prompt": "x"}, "parameters": {"n": 1}}
    sync = await rig.http.post(rig.base_url + TEXT2IMAGE, json=body, headers=auth)
    assert (sync.status_code, sync.json()["code"]) == (403, "AccessDenied")
    wrong = await rig.http.post(
        rig.base_url + IMAGE2IMAGE, json=body, headers={**auth, "X-DashScope-Async": "enable"}
    )
    assert (wrong.status_code, wrong.json()["code"]) == (400, "InvalidParameter")
    assert rig.fake.tasks == {}


# -- statuses and outcomes -------------------------------------------------------------------------


async def test_tasks_queue_per_model_and_run_as_pending_running_suspended(rig: Rig) -> None:
    first, second, third = [await rig.submitted() for _ in range(3)]
    statuses = [rig.fake.tasks[t].status for t in (first, second, third)]
    assert statuses == ["RUNNING", "RUNNING", "PENDING"]
    rig.fake.suspend(second)
    for job_id in (first, second, third):
        assert await rig.provider.poll(job_id, T2I) == Outcome("running", job_id)
    rig.fake.complete(first)
    assert rig.fake.tasks[third].status == "RUNNING"


async def test_a_succeeded_task_gives_downloadable_images_that_expire_after_24_hours(
    rig: Rig,
) -> None:
    job_id = await rig.submitted(num_outputs=2)
    rig.fake.complete(job_id)
    outcome = await rig.provider.poll(job_id, T2I)
    assert outcome == Outcome(
        "succeeded",
        job_id,
        outputs=(
            f"{rig.base_url}/results/{job_id}/0.png",
            f"{rig.base_url}/results/{job_id}/1.png",
        ),
    )
    assert rig.provider.fetch_headers(outcome.outputs[0]) == {}
    got = await rig.http.get(outcome.outputs[0])
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    rig.clock.t = T0 + 86_401
    assert (await rig.http.get(outcome.outputs[0])).status_code == 403
    assert_documented(rig.fake)


async def test_expired_results_answer_403(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.complete(job_id)
    [url] = (await rig.provider.poll(job_id, T2I)).outputs
    rig.fake.expire_results()
    assert (await rig.http.get(url)).status_code == 403


async def test_a_partial_failure_fails_the_task_retryably_never_delivering_fewer_images(
    rig: Rig,
) -> None:
    job_id = await rig.submitted(num_outputs=3)
    rig.fake.complete(job_id, failed_images=1)
    outcome = await rig.provider.poll(job_id, T2I)
    assert outcome == Outcome(
        "failed",
        job_id,
        reason=(
            "1 of 3 image(s) failed: InternalError.Timeout: "
            "An internal timeout error has occured during execution."
        ),
        retryable=True,
    )


async def test_a_partial_failure_by_moderation_is_not_retryable(rig: Rig) -> None:
    job_id = await rig.submitted(num_outputs=2)
    rig.fake.complete(job_id, failed_images=1, code="DataInspectionFailed", message="m")
    outcome = await rig.provider.poll(job_id, T2I)
    assert (outcome.status, outcome.outputs, outcome.retryable) == ("failed", (), False)
    assert outcome.reason == "1 of 2 image(s) failed: DataInspectionFailed: m"


@pytest.mark.parametrize(
    ("code", "message", "retryable"),
    [
        ("InternalError", "An internal error has occured.", True),
        ("InternalError.Timeout", "timeout", True),
        ("DataInspectionFailed", "Output data may contain inappropriate content.", False),
        ("InvalidParameter", "size is not supported", False),
        ("InvalidURL", "the image could not be downloaded", False),
    ],
)
async def test_a_failed_task_is_retryable_unless_it_is_a_refusal(
    rig: Rig, code: str, message: str, retryable: bool
) -> None:
    job_id = await rig.submitted()
    rig.fake.fail(job_id, code, message)
    assert await rig.provider.poll(job_id, T2I) == Outcome(
        "failed", job_id, reason=f"{code}: {message}", retryable=retryable
    )


async def test_moderation_after_submit_is_a_permanent_failure(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.moderate(job_id)
    outcome = await rig.provider.poll(job_id, T2I)
    assert (outcome.status, outcome.retryable) == ("failed", False)


async def test_an_unknown_or_expired_task_is_gone(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.forget(job_id)
    with pytest.raises(PermanentProviderError) as info:
        await rig.provider.poll(job_id, T2I)
    assert info.value.code == "provider_job_unknown"
    with pytest.raises(PermanentProviderError) as never:
        await rig.provider.poll("0385dc79-5ff8-4d82-bcb6-000000000000", T2I)
    assert never.value.code == "provider_job_unknown"


async def test_auto_complete_after_lets_polled_tasks_finish_on_their_own() -> None:
    async for rig in _rig(auto_complete_after=2):
        job_id = await rig.submitted()
        assert (await rig.provider.poll(job_id, T2I)).status == "running"
        assert (await rig.provider.poll(job_id, T2I)).status == "succeeded"


async def test_no_webhooks(rig: Rig) -> None:
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify({}, b'{"task_id": "x"}', T0)
    assert info.value.code == "no_webhooks"


# -- cancel ----------------------------------------------------------------------------------------


async def test_a_pending_task_is_cancelled(rig: Rig) -> None:
    running = [await rig.submitted() for _ in range(2)]
    pending = await rig.submitted()
    await rig.provider.cancel(pending, T2I)
    assert rig.fake.requests[-1].raw_path == f"/tasks/{pending}/cancel"
    assert await rig.provider.poll(pending, T2I) == Outcome(
        "cancelled", pending, reason="cancelled"
    )
    assert [rig.fake.tasks[t].status for t in running] == ["RUNNING", "RUNNING"]


async def test_a_cancel_refused_because_the_task_runs_is_logged_not_raised(rig: Rig) -> None:
    job_id = await rig.submitted()
    assert rig.fake.tasks[job_id].status == "RUNNING"
    with captured_logs() as logs:
        await rig.provider.cancel(job_id, T2I)
    [line] = [entry for entry in logs if entry["event"] == "dashscope_cancel_too_late"]
    assert (line["log_level"], line["job_id"]) == ("info", job_id)
    assert rig.fake.tasks[job_id].status == "RUNNING"


async def test_other_cancel_failures_are_raised(rig: Rig) -> None:
    job_id = await rig.submitted()
    rig.fake.faults.add(500)
    with pytest.raises(RetryableProviderError):
        await rig.provider.cancel(job_id, T2I)
    rig.fake.fail_next(400, "InvalidParameter", "bad task id")
    with pytest.raises(PermanentProviderError):
        await rig.provider.cancel(job_id, T2I)


# -- errors ----------------------------------------------------------------------------------------


async def test_a_rate_limit_honours_retry_after(rig: Rig) -> None:
    body = {"request_id": "r", "code": "Throttling.RateQuota", "message": "Requests rate limit"}
    rig.fake.faults.add(429, retry_after="7", body=body)
    with pytest.raises(ProviderRateLimited) as info:
        await rig.submitted()
    assert info.value.retry_after_s == 7.0
    assert info.value.details["dashscope_code"] == "Throttling.RateQuota"
    rig.fake.fail_next(429, "Throttling.AllocationQuota", "Allocated quota exceeded")
    with pytest.raises(ProviderRateLimited) as unbounded:
        await rig.submitted()
    assert unbounded.value.retry_after_s is None


async def test_bad_credentials_are_a_permanent_auth_failure(rig: Rig) -> None:
    provider = DashScopeProvider(rig.http, api_key="sk-wrong", base_url=rig.base_url)
    with pytest.raises(PermanentProviderError) as info:
        await provider.submit(rig.submission())
    assert info.value.code == "provider_auth_failed"
    assert info.value.details["dashscope_code"] == "InvalidApiKey"
    assert rig.fake.tasks == {}


async def test_a_moderated_prompt_is_refused_at_submit(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted(prompt="something forbidden")
    assert info.value.code == "provider_moderated"


@pytest.mark.parametrize(
    ("status", "code", "error", "error_code"),
    [
        (400, "Arrearage", PermanentProviderError, "provider_account"),
        (400, "InvalidParameter", PermanentProviderError, "provider_rejected"),
        (403, "AccessDenied.Unpurchased", PermanentProviderError, "provider_account"),
        (400, "IPInfringementSuspect", PermanentProviderError, "provider_moderated"),
        (500, "InternalError", RetryableProviderError, "provider_unavailable"),
    ],
)
async def test_dashscope_codes_map_to_the_error_tree(
    rig: Rig, status: int, code: str, error: type[Exception], error_code: str
) -> None:
    rig.fake.fail_next(status, code)
    with pytest.raises(error) as info:
        await rig.submitted()
    assert type(info.value) is error
    assert info.value.code == error_code  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [503, 504])
async def test_503_and_504_on_the_poll_route_are_retryable(rig: Rig, status: int) -> None:
    job_id = await rig.submitted()
    rig.fake.faults.add(status)
    with pytest.raises(RetryableProviderError) as info:
        await rig.provider.poll(job_id, T2I)
    assert type(info.value) is RetryableProviderError
    assert (await rig.provider.poll(job_id, T2I)).status == "running"


async def test_malformed_answers_are_retryable(rig: Rig) -> None:
    rig.fake.faults.add(200, body={"request_id": "r", "output": {}})
    with pytest.raises(RetryableProviderError):
        await rig.submitted()
    rig.fake.faults.add(200, body={"request_id": "r"})
    with pytest.raises(RetryableProviderError):
        await rig.provider.poll("0385dc79-5ff8-4d82-bcb6-000000000000", T2I)


# -- what may reach a URL --------------------------------------------------------------------------


def test_real_model_names_are_in_the_grammar() -> None:
    for model in (
        "wan2.2-t2i-flash",
        "wan2.2-t2i-plus",
        "wanx2.1-t2i-turbo",
        "wanx2.1-imageedit",
        "wan2.5-i2i-preview",
        "wan2.5-t2i-preview",
        "wanx-v1",
        "wanx-sketch-to-image-v1",
    ):
        assert validate_model(model) == model


async def test_hostile_models_are_refused_before_any_request(rig: Rig) -> None:
    for model in HOSTILE_MODELS + DASHSCOPE_HOSTILE:
        with pytest.raises(InvalidModel):
            await rig.submitted(model=model)
        with pytest.raises(InvalidModel):
            checked_model(rig.provider, model)
    assert rig.fake.requests == []


async def test_hostile_job_ids_reach_no_route(rig: Rig) -> None:
    for job_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await rig.provider.poll(job_id, T2I)
        with pytest.raises(InvalidJobId):
            await rig.provider.cancel(job_id, T2I)
    assert rig.fake.requests == []
    for job_id in HOSTILE_JOB_IDS:
        if job_id:
            answer = {"request_id": "r", "output": {"task_id": job_id, "task_status": "PENDING"}}
            rig.fake.faults.add(200, body=answer)
            with pytest.raises(InvalidJobId):
                await rig.submitted()
    assert_documented(rig.fake)
