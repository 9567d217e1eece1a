"""KlingProvider against the Kling fake over real HTTP, with a real callback receiver.

A Kling callback is an unsigned trigger: verify gives the task id and no outcome; the query gives
the outcome. Both clocks (the adapter's and the fake's) are test clocks: nothing waits.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.http import JOB_ID
from callbacks.kling import KlingProvider, external_task_id
from callbacks.kling import validate_model as kling_model
from callbacks.provider import Delivery, Outcome, Submission, checked_model
from callbacks.transport import new_client
from tests.fakes import WebhookSink
from tests.fakes.kling_fake import RISK_CONTROL_MSG, KlingFake
from tests.integration.test_provider_paths import HOSTILE_JOB_IDS, HOSTILE_MODELS
from tests.support.server import serve_app

T0 = 1_750_000_000.0
MODEL = "kling-v2-1"
ROUTES = {("POST", "/v1/images/generations"), ("GET", "/v1/images/generations/{id}")}
KLING_HOSTILE = [
    "KLING-V1",
    "kling-v1/../../v1/images/generations",
    "kling-v1?x=1",
    "kling",
    "kling-",
    "kling-v",
    "kling-v1-",
    "kling-v1--5",
    "kling-v1.5",
    "kling-v123",
    "kling-v1-5-master-x",
    "v1/images/generations",
    "flux-pro-1.1",
    "kling-v1\n",
]


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    fake: KlingFake
    sink: WebhookSink
    provider: KlingProvider
    http: httpx.AsyncClient
    base_url: str
    hook_url: str
    clock: Clock  # the adapter's
    fake_clock: Clock

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": MODEL,
            "prompt": "a lighthouse at dusk",
            "callback_url": self.hook_url,
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))

    def provider_with(self, **kw: Any) -> KlingProvider:
        args: dict[str, Any] = {
            "access_key": self.fake.access_key,
            "secret_key": self.fake.secret_key,
            "base_url": self.base_url,
            "now": self.clock,
            **kw,
        }
        return KlingProvider(self.http, **args)


async def _rig(**fake_kw: Any) -> AsyncIterator[Rig]:
    fake_clock, clock = Clock(), Clock()
    fake = KlingFake(clock=fake_clock, **fake_kw)
    sink = WebhookSink()
    async with (
        serve_app(fake.app) as base_url,
        serve_app(sink.app) as sink_url,
        new_client(timeout=10.0) as http,
    ):
        provider = KlingProvider(
            http,
            access_key=fake.access_key,
            secret_key=fake.secret_key,
            base_url=base_url,
            now=clock,
        )
        hook = f"{sink_url}/v1/callbacks/kling/t1?token=k"
        yield Rig(fake, sink, provider, http, base_url, hook, clock, fake_clock)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for value in _rig():
        yield value


def assert_documented(fake: KlingFake) -> None:
    """Every request the fake received is one of the two documented routes, its path as sent."""
    stray = []
    for r in fake.requests:
        parts = r.raw_path.split("/")
        shape = r.raw_path if len(parts) == 4 else "/".join([*parts[:4], "{id}"])
        ok = (
            r.raw_path == r.path
            and (r.method, shape) in ROUTES
            and (len(parts) == 4 or JOB_ID.fullmatch(parts[4]) is not None)
            and len(parts) <= 5
        )
        if not ok:
            stray.append((r.method, r.raw_path))
    assert stray == [], stray


# -- submission and auth ---------------------------------------------------------------------------


async def test_submit_sends_the_documented_body_with_a_kling_jwt(rig: Rig) -> None:
    task_id = await rig.submitted(
        negative_prompt="blurry", num_outputs=3, params={"aspect_ratio": "16:9"}
    )
    [request] = rig.fake.submits()
    assert request.json() == {
        "aspect_ratio": "16:9",
        "model_name": MODEL,
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "n": 3,
        "callback_url": rig.hook_url,
        "external_task_id": "hl-t1-1",
    }
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(
        token, rig.fake.secret_key, algorithms=["HS256"], options={"verify_exp": False}
    )
    assert claims == {"iss": rig.fake.access_key, "exp": int(T0) + 1800, "nbf": int(T0) - 5}
    assert rig.fake.tasks[task_id].task_status == "submitted"


async def test_an_input_image_goes_as_a_url_or_raw_base64_and_drops_the_negative_prompt(
    rig: Rig,
) -> None:
    png = base64.b64encode(b"\x89PNG fake bytes").decode()
    await rig.submitted(inputs=(f"data:image/png;base64,{png}",), negative_prompt="blurry")
    await rig.submitted(task_id="t2", inputs=("https://in.example/a.png",))
    first, second = (r.json() for r in rig.fake.submits())
    assert first["image"] == png
    assert "negative_prompt" not in first
    assert second["image"] == "https://in.example/a.png"


async def test_what_kling_would_refuse_is_refused_before_any_request(rig: Rig) -> None:
    for kw in ({"num_outputs": 0}, {"num_outputs": 10}, {"inputs": ("https://a/1", "https://a/2")}):
        with pytest.raises(PermanentProviderError):
            await rig.submitted(**kw)
    assert rig.fake.requests == []


async def test_the_token_is_cached_and_renewed_before_it_expires(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.provider.poll(task_id, MODEL)
    rig.clock.t = rig.fake_clock.t = T0 + 1400  # 400 s left: still used
    await rig.provider.poll(task_id, MODEL)
    rig.clock.t = rig.fake_clock.t = T0 + 1600  # 200 s left: renewed
    await rig.provider.poll(task_id, MODEL)
    tokens = rig.fake.tokens
    assert tokens[0] == tokens[1] == tokens[2] != tokens[3]
    assert jwt.decode(tokens[3], options={"verify_signature": False})["exp"] == int(T0) + 3400


async def test_a_token_kling_calls_expired_is_renewed_once_and_the_call_repeated(
    rig: Rig,
) -> None:
    task_id = await rig.submitted()
    rig.fake_clock.t = T0 + 1900  # Kling's clock is ahead: our cached token is expired there
    rig.clock.t = T0 + 1000
    assert await rig.provider.poll(task_id, MODEL) == Outcome("running", task_id)
    assert len(rig.fake.requests) == 3  # submit, refused query, repeated query
    assert rig.fake.tokens[-1] != rig.fake.tokens[0]


async def test_a_token_expired_again_after_renewal_is_an_auth_failure(rig: Rig) -> None:
    rig.fake_clock.t = T0 + 4000  # even a fresh token from our clock has expired there
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted()
    assert (info.value.code, info.value.details["kling_code"]) == ("provider_auth_failed", 1004)
    assert len(rig.fake.requests) == 2
    assert rig.fake.tasks == {}


@pytest.mark.parametrize(
    ("keys", "code"),
    [
        ({"secret_key": "a-wrong-secret-key-of-32-bytes-or-more"}, 1002),
        ({"access_key": "nobody"}, 1000),
    ],
)
async def test_bad_credentials_are_a_permanent_auth_failure(
    rig: Rig, keys: dict[str, str], code: int
) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.provider_with(**keys).submit(rig.submission())
    assert (info.value.code, info.value.details["kling_code"]) == ("provider_auth_failed", code)
    assert info.value.details["status"] == 401
    assert len(rig.fake.requests) == 1


# -- idempotent submits ----------------------------------------------------------------------------


async def test_a_repeated_submit_of_one_attempt_finds_the_task_instead_of_paying_twice(
    rig: Rig,
) -> None:
    """A crash between Kling's answer and the record of the job id: the next run submits the
    same attempt again; Kling refuses the reused external_task_id and the adapter finds it."""
    first = await rig.submitted()
    again = await rig.submitted()
    assert again == first
    assert len(rig.fake.tasks) == 1
    assert [(r.method, r.path) for r in rig.fake.requests] == [
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/images/generations/hl-t1-1"),
    ]
    other = await rig.submitted(attempt=2)
    assert other != first
    assert rig.fake.tasks[other].body["external_task_id"] == "hl-t1-2"


async def test_a_genuine_parameter_refusal_stays_a_refusal(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted(model="kling-v9")  # in the grammar, unknown to Kling
    assert (info.value.code, info.value.details["kling_code"]) == ("provider_rejected", 1201)
    assert "model_name" in info.value.message
    assert rig.fake.queries() != []  # asked once whether the attempt had reached Kling


def test_external_task_ids_are_deterministic_and_fit_the_path_grammar() -> None:
    assert external_task_id("tsk_0123abcd", 2) == "hl-tsk_0123abcd-2"
    for task_id in ("a/b", "x" * 300, "tâche", "../x", ""):
        derived = external_task_id(task_id, 1)
        assert derived == external_task_id(task_id, 1) != external_task_id(task_id, 2)
        assert JOB_ID.fullmatch(derived), derived


# -- statuses and outcomes -------------------------------------------------------------------------


async def test_poll_follows_submitted_processing_succeed_and_the_images_download(
    rig: Rig,
) -> None:
    task_id = await rig.submitted(num_outputs=2)
    assert await rig.provider.poll(task_id, MODEL) == Outcome("running", task_id)
    await rig.fake.start(task_id)
    assert await rig.provider.poll(task_id, MODEL) == Outcome("running", task_id)
    await rig.fake.complete(task_id)
    outcome = await rig.provider.poll(task_id, MODEL)
    assert outcome.status == "succeeded"
    assert outcome.outputs == (
        f"{rig.base_url}/results/{task_id}/0.png",
        f"{rig.base_url}/results/{task_id}/1.png",
    )
    assert rig.provider.fetch_headers(outcome.outputs[0]) == {}
    got = await rig.http.get(outcome.outputs[1])
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    rig.fake.expire_results()
    assert (await rig.http.get(outcome.outputs[1])).status_code == 404
    assert_documented(rig.fake)


async def test_a_failed_task_is_retryable_and_a_moderated_one_is_not(rig: Rig) -> None:
    failed = await rig.submitted()
    await rig.fake.fail(failed, "generation timed out")
    assert await rig.provider.poll(failed, MODEL) == Outcome(
        "failed", failed, reason="generation timed out", retryable=True
    )
    moderated = await rig.submitted(task_id="t2")
    await rig.fake.moderate(moderated)
    assert await rig.provider.poll(moderated, MODEL) == Outcome(
        "failed", moderated, reason=RISK_CONTROL_MSG, retryable=False
    )


async def test_a_task_kling_does_not_know_is_a_retryable_failure(rig: Rig) -> None:
    assert await rig.provider.poll("123456789012345678", MODEL) == Outcome(
        "failed", "123456789012345678", reason="task not found"
    )


async def test_a_poll_answered_about_another_task_is_not_this_jobs_outcome(rig: Rig) -> None:
    task_id = await rig.submitted()
    other = {"task_id": "999", "task_status": "succeed", "task_result": {"images": []}}
    rig.fake.faults.add(200, body={"code": 0, "message": "SUCCEED", "data": other})
    with pytest.raises(RetryableProviderError):
        await rig.provider.poll(task_id, MODEL)


async def test_cancel_is_a_no_op_without_any_request(rig: Rig) -> None:
    task_id = await rig.submitted()
    before = len(rig.fake.requests)
    await rig.provider.cancel(task_id, MODEL)
    assert len(rig.fake.requests) == before


# -- callbacks -------------------------------------------------------------------------------------


async def test_a_callback_bare_or_enveloped_is_a_trigger_without_an_outcome(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.fake.complete(task_id)
    await rig.fake.deliver(task_id, enveloped=True)
    bare, wrapped = rig.sink.received
    assert bare.json()["task_id"] == task_id and "data" in wrapped.json()
    updated = rig.fake.tasks[task_id].updated_at
    expected = Delivery(f"{task_id}:succeed:{updated}", task_id, None)
    assert await rig.provider.verify(bare.headers, bare.body, T0) == expected
    assert await rig.provider.verify(wrapped.headers, wrapped.body, T0) == expected


async def test_duplicated_callbacks_share_a_delivery_id_and_status_changes_do_not(
    rig: Rig,
) -> None:
    task_id = await rig.submitted()
    await rig.fake.start(task_id)
    await rig.fake.fail(task_id, "boom", duplicated=True)
    ids = [
        (await rig.provider.verify(r.headers, r.body, T0)).delivery_id for r in rig.sink.received
    ]
    assert len(ids) == 3 and ids[1] == ids[2] != ids[0]
    assert ids[0].startswith(f"{task_id}:processing:")


async def test_a_lost_callback_leaves_the_outcome_to_the_query(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.fake.complete(task_id, lost=True)
    assert rig.sink.received == []
    assert (await rig.provider.poll(task_id, MODEL)).status == "succeeded"


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[]",
        b'{"task_status": "succeed"}',
        b'{"task_id": 42}',
        b'{"code": 0, "data": {"task_status": "succeed"}}',
        b'{"code": 0, "data": "x"}',
    ],
)
async def test_a_callback_without_a_task_id_is_malformed(rig: Rig, body: bytes) -> None:
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify({}, body, T0)
    assert info.value.code == "malformed_body"


# -- errors ----------------------------------------------------------------------------------------


async def test_rate_and_concurrency_limits_are_rate_limited_with_retry_after(rig: Rig) -> None:
    body = {"code": 1302, "message": "too fast", "request_id": "r"}
    rig.fake.faults.add(429, retry_after="3", body=body)
    with pytest.raises(ProviderRateLimited) as limited:
        await rig.submitted()
    assert limited.value.retry_after_s == 3
    async for busy in _rig(concurrency=4):
        await busy.submitted(num_outputs=3)
        with pytest.raises(ProviderRateLimited) as over:
            await busy.submitted(task_id="t2", num_outputs=2)
        assert over.value.details["kling_code"] == 1303


@pytest.mark.parametrize(
    ("status", "code", "error", "error_code"),
    [
        (429, 1101, PermanentProviderError, "provider_account"),  # arrears: not a rate limit
        (429, 1102, PermanentProviderError, "provider_account"),
        (400, 1301, PermanentProviderError, "provider_moderated"),
        (400, 1200, PermanentProviderError, "provider_rejected"),
        (500, 5000, RetryableProviderError, "provider_unavailable"),
        (503, 5001, RetryableProviderError, "provider_unavailable"),
        (200, 5002, RetryableProviderError, "provider_unavailable"),  # an error in a 200
        (200, 1301, PermanentProviderError, "provider_moderated"),
        (200, 1303, ProviderRateLimited, "provider_rate_limited"),
    ],
)
async def test_kling_codes_map_to_the_error_tree_whatever_the_http_status(
    rig: Rig, status: int, code: int, error: type[Exception], error_code: str
) -> None:
    rig.fake.faults.add(status, body={"code": code, "message": "m", "request_id": "r"})
    rig.fake.faults.add(404, body={"code": 1203, "message": "task not found"})  # dedupe query
    with pytest.raises(error) as info:
        await rig.submitted()
    assert type(info.value) is error
    assert info.value.code == error_code  # type: ignore[attr-defined]
    assert info.value.details["kling_code"] == code  # type: ignore[attr-defined]


async def test_http_errors_without_a_kling_body_follow_the_status(rig: Rig) -> None:
    rig.fake.faults.add(502)
    with pytest.raises(RetryableProviderError):
        await rig.submitted()


# -- what may reach a URL --------------------------------------------------------------------------


async def test_hostile_models_reach_no_route(rig: Rig) -> None:
    for model in HOSTILE_MODELS + KLING_HOSTILE:
        with pytest.raises(InvalidModel):
            await rig.submitted(model=model)
        with pytest.raises(InvalidModel):
            checked_model(rig.provider, model)
    assert rig.fake.requests == []
    for model in ("kling-v1", "kling-v1-5", "kling-v2", "kling-v2-new", "kling-v2-1"):
        assert kling_model(model) == model
        task_id = await rig.submitted(model=model, task_id=f"t-{model}")
        await rig.provider.poll(task_id, model)
    assert_documented(rig.fake)


async def test_hostile_task_ids_reach_no_route(rig: Rig) -> None:
    for job_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await rig.provider.poll(job_id, MODEL)
        body = json.dumps({"task_id": job_id, "task_status": "succeed"}).encode()
        with pytest.raises(WebhookRejected) as info:
            await rig.provider.verify({}, body, T0)
        assert info.value.code == "malformed_body"
    assert rig.fake.requests == []
    for job_id in HOSTILE_JOB_IDS:
        if not job_id:
            continue
        data = {"task_id": job_id, "task_status": "submitted"}
        rig.fake.faults.add(200, body={"code": 0, "message": "SUCCEED", "data": data})
        with pytest.raises(InvalidJobId):
            await rig.submitted()
        # a refused resubmit whose lookup answers a hostile id
        rig.fake.faults.add(400, body={"code": 1201, "message": "external_task_id exists"})
        found = {**data, "task_info": {"external_task_id": "hl-t1-1"}}
        rig.fake.faults.add(200, body={"code": 0, "message": "SUCCEED", "data": found})
        with pytest.raises(InvalidJobId):
            await rig.submitted()
    assert_documented(rig.fake)
