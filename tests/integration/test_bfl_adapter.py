"""BflProvider against the BFL fake over real HTTP, with a real webhook receiver.

A BFL webhook is a trigger: verify gives the task id and no outcome; polling gives the outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from callbacks.bfl import BflProvider
from callbacks.errors import (
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.provider import Delivery, Outcome, Submission
from callbacks.transport import new_client
from tests.fakes import WebhookSink
from tests.fakes.bfl_fake import BflFake
from tests.support.server import serve_app

T0 = 1_750_000_000.0
MODEL = "flux-pro-1.1"
SAMPLE = "https://delivery-eu1.bfl.ai/results/ab/cd/sample.jpeg?se=2025&sig=x"


@dataclass
class Rig:
    fake: BflFake
    sink: WebhookSink
    provider: BflProvider
    http: httpx.AsyncClient
    base_url: str
    hook_url: str

    def submission(self, **kw: Any) -> Submission:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": MODEL,
            "prompt": "a portrait in oil",
            "callback_url": self.hook_url,
            **kw,
        }
        return Submission(**fields)

    async def submitted(self, **kw: Any) -> str:
        return await self.provider.submit(self.submission(**kw))


async def _rig(fake: BflFake, webhook_secret: str | None = None) -> AsyncIterator[Rig]:
    sink = WebhookSink()
    async with (
        serve_app(fake.app) as base_url,
        serve_app(sink.app) as sink_url,
        new_client(timeout=10.0) as http,
    ):
        provider = BflProvider(
            http, api_key=fake.key, base_url=base_url, webhook_secret=webhook_secret
        )
        yield Rig(fake, sink, provider, http, base_url, f"{sink_url}/v1/callbacks/bfl/t1?token=k")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for value in _rig(BflFake()):
        yield value


@pytest.fixture
async def regional_rig() -> AsyncIterator[Rig]:
    async for value in _rig(BflFake(regional_polling=True), webhook_secret="s3cret"):
        yield value


# -- submission ---------------------------------------------------------------------------------


async def test_submit_sends_params_prompt_and_webhook_with_the_key(rig: Rig) -> None:
    task_id = await rig.submitted(
        inputs=("https://in.example/a.png",),
        negative_prompt="not supported by FLUX, not sent",
        params={"width": 1024, "height": 768, "safety_tolerance": 2},
    )
    [request] = [r for r in rig.fake.requests if r.method == "POST"]
    assert request.path == f"/{MODEL}"
    assert request.headers["x-key"] == rig.fake.key
    assert request.json() == {
        "width": 1024,
        "height": 768,
        "safety_tolerance": 2,
        "prompt": "a portrait in oil",
        "image_prompt": "https://in.example/a.png",
        "webhook_url": rig.hook_url,
    }
    assert task_id in rig.fake.tasks


async def test_kontext_takes_an_input_image_and_a_secret_is_passed_on(regional_rig: Rig) -> None:
    await regional_rig.submitted(model="flux-kontext-pro", inputs=("https://in.example/a.png",))
    body = regional_rig.fake.requests[-1].json()
    assert body["input_image"] == "https://in.example/a.png"
    assert body["webhook_secret"] == "s3cret"


async def test_more_than_one_output_is_refused_before_any_request(rig: Rig) -> None:
    with pytest.raises(PermanentProviderError):
        await rig.submitted(num_outputs=2)
    assert rig.fake.requests == []


# -- webhooks -----------------------------------------------------------------------------------


async def test_a_webhook_is_a_trigger_without_an_outcome(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.fake.complete(task_id, SAMPLE)
    got = rig.sink.last
    assert got.json() == {"id": task_id, "status": "Ready", "result": {"sample": SAMPLE}}
    delivery = await rig.provider.verify(got.headers, got.body, T0)
    assert delivery == Delivery(f"{task_id}:Ready", task_id, None)


async def test_duplicate_webhooks_share_a_delivery_id_and_statuses_differ(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.fake.deliver(task_id)  # an early trigger while still Pending
    await rig.fake.error(task_id)
    await rig.fake.deliver(task_id)  # a retry of the same delivery
    ids = [
        (await rig.provider.verify(r.headers, r.body, T0)).delivery_id for r in rig.sink.received
    ]
    assert ids == [f"{task_id}:Pending", f"{task_id}:Error", f"{task_id}:Error"]


@pytest.mark.parametrize("body", [b"<html>", b"[]", b'{"status": "Ready"}', b'{"id": 42}'])
async def test_a_body_without_a_task_id_is_malformed(rig: Rig, body: bytes) -> None:
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify({}, body, T0)
    assert info.value.code == "malformed_body"


# -- polling ------------------------------------------------------------------------------------


async def test_poll_follows_pending_to_ready(rig: Rig) -> None:
    task_id = await rig.submitted()
    assert await rig.provider.poll(task_id, MODEL) == Outcome("running", task_id)
    await rig.fake.complete(task_id, SAMPLE)
    assert await rig.provider.poll(task_id, MODEL) == Outcome(
        "succeeded", task_id, outputs=(SAMPLE,)
    )
    assert all(r.headers["x-key"] == rig.fake.key for r in rig.fake.polls())


@pytest.mark.parametrize("status", ["Request Moderated", "Content Moderated"])
async def test_moderation_is_a_permanent_failure(rig: Rig, status: str) -> None:
    task_id = await rig.submitted()
    await rig.fake.moderate(task_id, status, reasons=("Derivative Works Filter",))
    outcome = await rig.provider.poll(task_id, MODEL)
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert outcome.reason is not None and status in outcome.reason
    assert "Derivative Works Filter" in outcome.reason


async def test_error_and_task_not_found_are_retryable_failures(rig: Rig) -> None:
    task_id = await rig.submitted()
    await rig.fake.error(task_id, "GPU fell over")
    errored = await rig.provider.poll(task_id, MODEL)
    assert (errored.status, errored.retryable) == ("failed", True)
    lost = await rig.provider.poll("no-such-task", MODEL)
    assert (lost.status, lost.retryable, lost.reason) == ("failed", True, "task not found")


async def test_poll_uses_the_returned_polling_url_then_falls_back_to_get_result(
    regional_rig: Rig,
) -> None:
    task_id = await regional_rig.submitted()
    await regional_rig.provider.poll(task_id, MODEL)
    assert regional_rig.fake.polls()[-1].path == "/us1/get_result"

    # another process (no cache) polls the documented endpoint
    other = BflProvider(regional_rig.http, api_key="bfl-fake-key", base_url=regional_rig.base_url)
    await regional_rig.fake.complete(task_id, SAMPLE)
    outcome = await other.poll(task_id, MODEL)
    assert outcome == Outcome("succeeded", task_id, outputs=(SAMPLE,))
    last = regional_rig.fake.polls()[-1]
    assert (last.path, last.query) == ("/get_result", {"id": task_id})


async def test_an_answer_without_polling_url_is_polled_through_get_result() -> None:
    async for rig in _rig(BflFake(omit_polling_url=True)):
        task_id = await rig.submitted()
        assert (await rig.provider.poll(task_id, MODEL)).status == "running"
        assert rig.fake.polls()[-1].path == "/get_result"


async def test_the_polling_url_cache_is_bounded(regional_rig: Rig) -> None:
    rig = regional_rig
    small = BflProvider(rig.http, api_key=rig.fake.key, base_url=rig.base_url, polling_cache_size=2)
    ids = [await small.submit(rig.submission()) for _ in range(3)]
    for task_id in ids:
        assert (await small.poll(task_id, MODEL)).status == "running"
    # the oldest polling URL was evicted: that task fell back to the documented endpoint
    assert [r.path for r in rig.fake.polls()] == [
        "/get_result",
        "/us1/get_result",
        "/us1/get_result",
    ]


async def test_cancel_is_a_no_op_without_any_request(rig: Rig) -> None:
    task_id = await rig.submitted()
    before = len(rig.fake.requests)
    await rig.provider.cancel(task_id, MODEL)
    assert len(rig.fake.requests) == before
    assert rig.provider.fetch_headers(SAMPLE) == {}


# -- errors -------------------------------------------------------------------------------------


async def test_http_errors_are_translated(rig: Rig) -> None:
    rig.fake.faults.add(502)
    with pytest.raises(RetryableProviderError):
        await rig.submitted()
    rig.fake.faults.add(429, retry_after="3")
    with pytest.raises(ProviderRateLimited) as limited:
        await rig.provider.poll("any", MODEL)
    assert limited.value.retry_after_s == 3
    with pytest.raises(PermanentProviderError) as rejected:  # a genuine 422 from validation
        await rig.submitted(params={"width": 4096})
    assert rejected.value.details["status"] == 422
    with pytest.raises(PermanentProviderError):  # a wrong key
        await BflProvider(rig.http, api_key="wrong", base_url=rig.base_url).submit(rig.submission())
    with pytest.raises(PermanentProviderError):  # an unknown model
        await rig.submitted(model="flux-nonexistent")
