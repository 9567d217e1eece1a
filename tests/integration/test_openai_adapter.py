"""OpenAiProvider against the OpenAI fake over real HTTP, with a real project-webhook receiver.

An OpenAI webhook is a thin, signed event: verify checks the Standard Webhooks signature and gives
the response id and no outcome; the fetched response gives the outcome, its image as base64. The
fake's clock is a test clock, so signatures are checked against a fixed ``T0``: nothing waits.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import standardwebhooks
from openai.types.webhooks import ResponseCompletedWebhookEvent
from PIL import Image

from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.openai import OpenAiProvider, checked_response_id
from callbacks.openai import validate_model as openai_model
from callbacks.provider import Delivery, Outcome, Submission, checked_model
from callbacks.transport import new_client
from tests.fakes import RecordedRequest, WebhookSink
from tests.fakes.openai_fake import OpenAiFake, image_bytes, openai_error
from tests.integration.test_provider_paths import HOSTILE_JOB_IDS, HOSTILE_MODELS
from tests.support.server import serve_app

T0 = 1_750_000_000.0
MODEL = "gpt-image-1"
PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
ROUTES = [
    ("POST", r"/responses"),
    ("GET", r"/responses/resp_[A-Za-z0-9]+"),
    ("POST", r"/responses/resp_[A-Za-z0-9]+/cancel"),
]
OPENAI_HOSTILE = [
    "GPT-IMAGE-1",
    "gpt-image-1/../../responses",
    "gpt-image-1?x=1",
    "gpt-image",
    "gpt-image-",
    "gpt-image--1",
    "gpt-image-1.",
    "gpt_image_1",
    "dall-e-3",
    "gpt-4.1-mini",
    "responses",
    "gpt-image-1\n",
    "gpt-image-" + "1" * 60,
]
OPENAI_HOSTILE_IDS = ["resp_", "resp_a.b", "resp_a-b", "RESP_abc", "evt_abc", "resp_" + "a" * 121]


@dataclass
class Rig:
    fake: OpenAiFake
    sink: WebhookSink
    provider: OpenAiProvider
    http: httpx.AsyncClient
    base_url: str

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": MODEL,
            "prompt": "a lighthouse at dusk",
            "callback_url": "https://hookline.example/v1/callbacks/openai/t1?token=k",
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))

    async def delivery(self, request: RecordedRequest, now: float = T0) -> Delivery:
        return await self.provider.verify(request.headers, request.body, now)


async def _rig(fake: OpenAiFake) -> AsyncIterator[Rig]:
    sink = WebhookSink()
    async with (
        serve_app(fake.app) as base_url,
        serve_app(sink.app) as sink_url,
        new_client(timeout=10.0) as http,
    ):
        fake.webhook_url = f"{sink_url}/v1/callbacks/openai"
        provider = OpenAiProvider(
            http, api_key=fake.api_key, webhook_secret=fake.webhook_secret, base_url=base_url
        )
        yield Rig(fake, sink, provider, http, base_url)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for value in _rig(OpenAiFake(clock=lambda: T0, blocked_words=("forbidden",))):
        yield value


def documented(request: RecordedRequest) -> bool:
    if request.raw_path != request.path or request.query:
        return False
    return any(m == request.method and re.fullmatch(p, request.path) for m, p in ROUTES)


def assert_documented(fake: OpenAiFake) -> None:
    stray = [(r.method, r.raw_path, r.query) for r in fake.requests if not documented(r)]
    assert stray == [], stray


def image_of(uri: str) -> Image.Image:
    _, _, data = uri.partition(",")
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


# -- submission ---------------------------------------------------------------------------------


async def test_submit_sends_a_background_stored_response_forcing_the_image_tool(rig: Rig) -> None:
    job_id = await rig.submitted(
        inputs=("https://in.example/a.png", "data:image/png;base64,iVBORw0KGgo="),
        params={"quality": "high", "output_format": "webp", "seed": 7, "image_key": "image"},
        task_id="task-42",
        attempt=3,
    )
    [request] = rig.fake.creates()
    assert request.headers["authorization"] == f"Bearer {rig.fake.api_key}"
    assert request.json() == {
        "model": "gpt-4.1-mini",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a lighthouse at dusk"},
                    {
                        "type": "input_image",
                        "image_url": "https://in.example/a.png",
                        "detail": "auto",
                    },
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,iVBORw0KGgo=",
                        "detail": "auto",
                    },
                ],
            }
        ],
        "background": True,
        "store": True,
        "tools": [
            {"type": "image_generation", "model": MODEL, "quality": "high", "output_format": "webp"}
        ],
        "tool_choice": {"type": "image_generation"},
        "metadata": {"hookline_task": "task-42", "attempt": "3"},
    }
    assert job_id == rig.fake.latest().id and checked_response_id(job_id) == job_id


async def test_width_and_height_become_the_standard_size_of_their_orientation(rig: Rig) -> None:
    for (width, height), size in {
        (1024, 1024): "1024x1024",
        (1600, 900): "1536x1024",
        (768, 1024): "1024x1536",
    }.items():
        await rig.submitted(params={"width": width, "height": height})
        assert rig.fake.creates()[-1].json()["tools"][0]["size"] == size
    await rig.submitted(params={"width": 1024, "height": 768, "size": "auto"})
    assert rig.fake.creates()[-1].json()["tools"][0]["size"] == "auto"  # an explicit size wins


async def test_a_negative_prompt_is_an_instruction_in_the_text(rig: Rig) -> None:
    await rig.submitted(negative_prompt="text, watermarks", model="gpt-image-1-mini")
    body = rig.fake.creates()[-1].json()
    assert body["input"][0]["content"] == [
        {"type": "input_text", "text": "a lighthouse at dusk\n\nAvoid: text, watermarks"}
    ]
    assert body["tools"][0]["model"] == "gpt-image-1-mini"


async def test_what_openai_cannot_do_is_refused_before_any_request(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError, match="one image per response"):
        await rig.submitted(num_outputs=2)
    with pytest.raises(PermanentProviderError, match="at most 16"):
        await rig.submitted(inputs=tuple(f"https://in.example/{i}.png" for i in range(17)))
    assert rig.fake.requests == []


def test_the_responses_model_follows_a_grammar_too() -> None:
    http = httpx.AsyncClient()
    assert OpenAiProvider(http, api_key="k", responses_model="gpt-5")
    for model in ("../responses", "gpt-4.1?x=1", "GPT-5", ""):
        with pytest.raises(InvalidModel):
            OpenAiProvider(http, api_key="k", responses_model=model)
    with pytest.raises(ValueError):
        OpenAiProvider(http, api_key="k", webhook_secret="whsec_not base64!")


# -- webhooks -------------------------------------------------------------------------------------


async def test_a_signed_event_is_a_trigger_naming_the_response(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id)
    got = rig.sink.last
    assert got.path == "/v1/callbacks/openai"
    event = got.json()
    assert event["type"] == "response.completed" and event["data"] == {"id": job_id}
    assert event["id"].startswith("evt_") and event["object"] == "event"
    assert await rig.delivery(got) == Delivery(got.headers["webhook-id"], job_id, None)


async def test_the_fakes_events_are_accepted_by_the_reference_verifiers() -> None:
    """Cross-check: what the fake signs, the openai SDK's ``webhooks.unwrap`` and the
    ``standardwebhooks`` library accept too (both read the wall clock, so this fake does)."""
    async for rig in _rig(OpenAiFake()):
        job_id = await rig.submitted()
        await rig.fake.complete(job_id)
        got = rig.sink.last
        client = openai.OpenAI(api_key="x", webhook_secret=rig.fake.webhook_secret)
        event = client.webhooks.unwrap(got.body, got.headers)
        assert isinstance(event, ResponseCompletedWebhookEvent)
        assert event.data.id == job_id
        standardwebhooks.Webhook(rig.fake.webhook_secret).verify(got.body, got.headers)
        assert (await rig.delivery(got, time.time())).job_id == job_id


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled", "incomplete"])
async def test_each_terminal_event_type_is_a_trigger(rig: Rig, status: str) -> None:
    job_id = await rig.submitted()
    body = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "created_at": 1,
            "type": f"response.{status}",
            "data": {"id": job_id},
        }
    ).encode()
    delivery = await rig.provider.verify(rig.fake.sign(body, "wh_1", int(T0)), body, T0)
    assert delivery == Delivery("wh_1", job_id, None)


@pytest.mark.parametrize(
    "kind", ["batch.completed", "fine_tuning.job.succeeded", "response.created", "eval.run.failed"]
)
async def test_other_event_types_are_ignored_not_malformed(rig: Rig, kind: str) -> None:
    body = json.dumps({"id": "evt_1", "type": kind, "data": {"id": "batch_abc"}}).encode()
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify(rig.fake.sign(body, "wh_1", int(T0)), body, T0)
    assert info.value.code == "ignored_event"


async def test_duplicated_events_share_a_delivery_id(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, duplicated=True)
    await rig.fake.deliver(job_id)  # OpenAI's retry of the same event
    ids = {(await rig.delivery(r)).delivery_id for r in rig.sink.received}
    assert len(rig.sink.received) == 3 and len(ids) == 1
    assert {r.json()["id"] for r in rig.sink.received} == {rig.sink.last.json()["id"]}


async def test_a_lost_event_leaves_the_outcome_to_the_poll(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id, lost=True)
    assert rig.sink.received == []
    outcome = await rig.provider.poll(job_id, MODEL)
    assert outcome.status == "succeeded"


async def test_a_delivery_is_verified_over_its_raw_bytes(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id)
    got = rig.sink.last
    reserialised = json.dumps(json.loads(got.body), separators=(",", ":")).encode()
    assert reserialised != got.body
    cases: list[tuple[dict[str, str], bytes, float, str]] = [
        (got.headers, reserialised, T0, "bad_signature"),
        (got.headers, got.body.replace(job_id.encode(), b"resp_other"), T0, "bad_signature"),
        (got.headers, got.body, T0 + 301, "stale_timestamp"),
        (got.headers, got.body, T0 - 301, "stale_timestamp"),
        (
            {k: v for k, v in got.headers.items() if k != "webhook-signature"},
            got.body,
            T0,
            "missing_headers",
        ),
        ({**got.headers, "webhook-id": "wh_other"}, got.body, T0, "bad_signature"),
    ]
    for headers, body, now, code in cases:
        with pytest.raises(WebhookRejected) as info:
            await rig.provider.verify(headers, body, now)
        assert info.value.code == code
    other = OpenAiProvider(rig.http, api_key="k", webhook_secret=OpenAiFake().webhook_secret)
    with pytest.raises(WebhookRejected) as wrong:
        await other.verify(got.headers, got.body, T0)
    assert wrong.value.code == "bad_signature"
    unconfigured = OpenAiProvider(rig.http, api_key="k")
    with pytest.raises(WebhookRejected) as missing:
        await unconfigured.verify(got.headers, got.body, T0)
    assert missing.value.code == "bad_signature"
    assert (await rig.delivery(got, T0 + 300)).job_id == job_id  # the window's edge


async def test_a_rotated_secret_still_verifies(rig: Rig) -> None:
    old = rig.fake.webhook_secret
    rig.fake.webhook_secret = OpenAiFake().webhook_secret
    rig.fake.extra_secrets = [old]  # OpenAI signs with both while the project rotates
    job_id = await rig.submitted()
    await rig.fake.complete(job_id)
    assert (await rig.delivery(rig.sink.last)).job_id == job_id


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[]",
        b'{"type": "response.completed"}',
        b'{"type": 1}',
        b'{"type": "response.completed", "data": {"id": 42}}',
        b"[" * 5000,
    ],
)
async def test_a_signed_body_that_is_no_event_is_malformed(rig: Rig, body: bytes) -> None:
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify(rig.fake.sign(body, "wh_1", int(T0)), body, T0)
    assert info.value.code == "malformed_body"


# -- polling --------------------------------------------------------------------------------------


async def test_poll_follows_queued_in_progress_and_completed_with_the_image_bytes(
    rig: Rig,
) -> None:
    job_id = await rig.submitted()
    assert await rig.provider.poll(job_id, MODEL) == Outcome("running", job_id)
    rig.fake.start(job_id)
    assert await rig.provider.poll(job_id, MODEL) == Outcome("running", job_id)
    await rig.fake.complete(job_id)
    outcome = await rig.provider.poll(job_id, MODEL)
    assert outcome.status == "succeeded" and len(outcome.outputs) == 1
    assert PNG_URI.fullmatch(outcome.outputs[0])
    image = image_of(outcome.outputs[0])
    assert (image.format, image.size) == ("PNG", (16, 16))
    assert all(
        r.headers["authorization"] == f"Bearer {rig.fake.api_key}" for r in rig.fake.requests
    )
    assert rig.provider.fetch_headers(outcome.outputs[0]) == {}


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_the_output_format_names_the_data_uri_type(rig: Rig, fmt: str, pil: str) -> None:
    job_id = await rig.submitted(params={"output_format": fmt})
    await rig.fake.complete(job_id)
    [output] = (await rig.provider.poll(job_id, MODEL)).outputs
    assert output.startswith(f"data:image/{fmt};base64,")
    assert image_of(output).format == pil
    assert base64.b64decode(output.partition(",")[2]) == image_bytes(fmt)


async def test_failures_are_retryable_unless_content_or_input_is_the_cause(rig: Rig) -> None:
    cases = [
        ("server_error", True),
        ("rate_limit_exceeded", True),
        ("image_content_policy_violation", False),
        ("invalid_prompt", False),
        ("invalid_image_url", False),
        ("image_too_large", False),
    ]
    for code, retryable in cases:
        job_id = await rig.submitted()
        await rig.fake.fail(job_id, code, "it went wrong")
        outcome = await rig.provider.poll(job_id, MODEL)
        assert (outcome.status, outcome.retryable) == ("failed", retryable), code
        assert outcome.reason == f"{code}: it went wrong"
    job_id = await rig.submitted()
    await rig.fake.moderate(job_id)
    moderated = await rig.provider.poll(job_id, MODEL)
    assert (moderated.status, moderated.retryable) == ("failed", False)
    assert moderated.reason is not None and "image_content_policy_violation" in moderated.reason


async def test_incomplete_responses(rig: Rig) -> None:
    filtered = await rig.submitted()
    await rig.fake.incomplete(filtered, "content_filter", with_image=True)
    assert await rig.provider.poll(filtered, MODEL) == Outcome(
        "failed", filtered, reason="incomplete: content_filter", retryable=False
    )
    short = await rig.submitted()
    await rig.fake.incomplete(short, "max_output_tokens")
    assert await rig.provider.poll(short, MODEL) == Outcome(
        "failed", short, reason="incomplete: max_output_tokens", retryable=True
    )
    made = await rig.submitted()
    await rig.fake.incomplete(made, "max_output_tokens", with_image=True)
    assert (await rig.provider.poll(made, MODEL)).status == "succeeded"  # the image was made


async def test_completed_without_an_image_is_a_failure(rig: Rig) -> None:
    texted = await rig.submitted()
    await rig.fake.answer_in_text(texted, "Which lighthouse?")
    assert await rig.provider.poll(texted, MODEL) == Outcome(
        "failed", texted, reason="completed without an image: Which lighthouse?", retryable=True
    )
    refused = await rig.submitted()
    await rig.fake.refuse(refused)
    outcome = await rig.provider.poll(refused, MODEL)
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert outcome.reason is not None and outcome.reason.startswith("refused: I'm sorry")


async def test_a_forgotten_response_is_gone_for_good(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.fake.complete(job_id)
    rig.fake.forget(job_id)
    with pytest.raises(PermanentProviderError) as info:
        await rig.provider.poll(job_id, MODEL)
    assert info.value.details["status"] == 404


async def test_a_poll_answered_about_another_response_is_not_this_jobs_outcome(rig: Rig) -> None:
    job_id = await rig.submitted()
    other = await rig.submitted()
    await rig.fake.complete(other)
    rig.fake.faults.add(200, body=rig.fake.responses[other].answer())
    with pytest.raises(RetryableProviderError):
        await rig.provider.poll(job_id, MODEL)


async def test_auto_complete_after_lets_a_polled_job_finish_on_its_own() -> None:
    async for rig in _rig(OpenAiFake(clock=lambda: T0, auto_complete_after=2)):
        job_id = await rig.submitted()
        assert (await rig.provider.poll(job_id, MODEL)).status == "running"
        assert (await rig.provider.poll(job_id, MODEL)).status == "succeeded"
        assert rig.sink.received == []


# -- cancel ---------------------------------------------------------------------------------------


async def test_cancel_cancels_a_running_response_and_sends_its_event(rig: Rig) -> None:
    job_id = await rig.submitted()
    await rig.provider.cancel(job_id, MODEL)
    assert rig.fake.requests[-1].path == f"/responses/{job_id}/cancel"
    assert rig.sink.last.json()["type"] == "response.cancelled"
    assert (await rig.delivery(rig.sink.last)).job_id == job_id
    assert await rig.provider.poll(job_id, MODEL) == Outcome(
        "cancelled", job_id, reason="cancelled"
    )
    await rig.provider.cancel(job_id, MODEL)  # a finished one is answered unchanged
    assert len(rig.sink.received) == 1


# -- errors ---------------------------------------------------------------------------------------


async def test_bad_credentials_are_a_permanent_auth_failure(rig: Rig) -> None:
    wrong = OpenAiProvider(rig.http, api_key="sk-wrong-key", base_url=rig.base_url)
    with pytest.raises(PermanentProviderError) as info:
        await wrong.submit(rig.submission())
    assert info.value.code == "provider_auth_failed"
    assert info.value.details["openai_code"] == "invalid_api_key"
    assert "sk-wrong-key" not in info.value.message


async def test_rate_limits_wait_and_a_spent_quota_does_not(rig: Rig) -> None:
    limited = openai_error("Rate limit reached", type="requests", code="rate_limit_exceeded")
    rig.fake.faults.add(429, retry_after="3", body=limited)
    with pytest.raises(ProviderRateLimited) as info:
        await rig.submitted()
    assert info.value.retry_after_s == 3
    spent = openai_error(
        "You exceeded your current quota", type="insufficient_quota", code="insufficient_quota"
    )
    rig.fake.faults.add(429, retry_after="1", body=spent)
    with pytest.raises(PermanentProviderError) as quota:
        await rig.submitted()
    assert quota.value.code == "provider_account" and not quota.value.retryable


async def test_a_moderation_refusal_at_submit_is_permanent_and_says_so(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError) as info:
        await rig.submitted(prompt="something forbidden")
    assert info.value.code == "provider_moderated"
    assert "moderation_blocked" in info.value.message
    assert rig.fake.responses == {}


async def test_other_http_errors_follow_the_status(rig: Rig) -> None:
    rig.fake.faults.add(500, body=openai_error("The server had an error", type="server_error"))
    with pytest.raises(RetryableProviderError):
        await rig.submitted()
    rig.fake.faults.add(503)
    with pytest.raises(RetryableProviderError):
        await rig.provider.poll("resp_abc123", MODEL)
    with pytest.raises(PermanentProviderError) as bad:  # a genuine 400 from the fake
        await rig.submitted(params={"size": "4096x4096"})
    assert (bad.value.code, bad.value.details["openai_code"]) == (
        "provider_rejected",
        "invalid_value",
    )


# -- what may reach a URL -------------------------------------------------------------------------


async def test_hostile_models_reach_no_route(rig: Rig) -> None:
    for model in HOSTILE_MODELS + OPENAI_HOSTILE:
        with pytest.raises(InvalidModel):
            await rig.submitted(model=model)
        with pytest.raises(InvalidModel):
            checked_model(rig.provider, model)
    assert rig.fake.requests == []
    for model in ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"):
        assert openai_model(model) == model
        job_id = await rig.submitted(model=model)
        await rig.provider.poll(job_id, model)
        await rig.provider.cancel(job_id, model)
    assert openai_model("chatgpt-image-latest") == "chatgpt-image-latest"
    assert_documented(rig.fake)


async def test_hostile_response_ids_reach_no_route(rig: Rig) -> None:
    """From a stored task (poll, cancel), a submit answer, or a correctly signed event: the
    project-level route has no task id, so the event's id is all that names the job."""
    for job_id in HOSTILE_JOB_IDS + OPENAI_HOSTILE_IDS:
        with pytest.raises(InvalidJobId):
            await rig.provider.poll(job_id, MODEL)
        with pytest.raises(InvalidJobId):
            await rig.provider.cancel(job_id, MODEL)
        body = json.dumps({"id": "evt_1", "type": "response.completed", "data": {"id": job_id}})
        raw = body.encode()
        with pytest.raises(WebhookRejected) as info:
            await rig.provider.verify(rig.fake.sign(raw, "wh_1", int(T0)), raw, T0)
        assert info.value.code == "malformed_body"
    assert rig.fake.requests == []
    for job_id in HOSTILE_JOB_IDS + OPENAI_HOSTILE_IDS:
        if not job_id:
            continue  # an answer without an id is the provider's transient fault
        rig.fake.faults.add(200, body={"id": job_id, "object": "response", "status": "queued"})
        with pytest.raises(InvalidJobId):
            await rig.submitted()
    assert_documented(rig.fake)
    assert {r.path for r in rig.fake.requests} == {"/responses"}
