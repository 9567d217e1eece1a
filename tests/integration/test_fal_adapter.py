"""FalProvider against the fal fake over real HTTP, with a real webhook receiver.

The fake signs with an ED25519 key generated here and serves its JWKS; ``jwks_hits`` counts the
fetches, so caching and the single re-fetch on a key miss are observable.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from callbacks.errors import (
    PermanentProviderError,
    ProviderRateLimited,
    RetryableProviderError,
    WebhookRejected,
)
from callbacks.fal import FalProvider, app_path
from callbacks.provider import Delivery, Outcome, Submission
from callbacks.transport import new_client
from tests.fakes import WebhookSink
from tests.fakes.fal_fake import FalFake
from tests.support.server import serve_app

T0 = 1_750_000_000.0
MODEL = "fal-ai/flux/dev"
URL_A = "https://v3.fal.media/files/rabbit/a.jpg"
URL_B = "https://v3.fal.media/files/rabbit/b.jpg"


@dataclass
class Rig:
    fake: FalFake
    sink: WebhookSink
    provider: FalProvider
    http: httpx.AsyncClient
    base_url: str
    hook_url: str

    async def submitted(self, **kw: Any) -> str:
        fields: dict[str, Any] = {
            "task_id": "t1",
            "attempt": 1,
            "model": MODEL,
            "prompt": "a portrait in oil",
            "callback_url": self.hook_url,
            **kw,
        }
        return await self.provider.submit(Submission(**fields))

    async def delivered(self, now: float = T0, provider: FalProvider | None = None) -> Delivery:
        got = self.sink.last
        return await (provider or self.provider).verify(got.headers, got.body, now)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fake = FalFake(clock=lambda: T0)
    sink = WebhookSink()
    async with (
        serve_app(fake.app) as base_url,
        serve_app(sink.app) as sink_url,
        new_client(timeout=10.0) as http,
    ):
        provider = FalProvider(
            http, key=fake.key, base_url=base_url, jwks_url=f"{base_url}/.well-known/jwks.json"
        )
        hook_url = f"{sink_url}/v1/callbacks/fal/t1?token=tok%2Fen"
        yield Rig(fake, sink, provider, http, base_url, hook_url)


def test_status_paths_drop_the_subpath() -> None:
    assert app_path("fal-ai/flux/dev") == "fal-ai/flux"
    assert app_path("fal-ai/flux-pro/v1.1/ultra") == "fal-ai/flux-pro"
    assert app_path("fal-ai/fast-sdxl") == "fal-ai/fast-sdxl"
    with pytest.raises(PermanentProviderError):
        app_path("flux")


# -- submission ---------------------------------------------------------------------------------


async def test_submit_posts_the_model_input_with_the_webhook_in_the_query(rig: Rig) -> None:
    request_id = await rig.submitted(
        inputs=("https://in.example/a.png",), num_outputs=2, params={"guidance_scale": 3.5}
    )
    [request] = [r for r in rig.fake.requests if r.method == "POST"]
    assert request.path == f"/{MODEL}"
    assert request.headers["authorization"] == f"Key {rig.fake.key}"
    assert request.query["fal_webhook"] == rig.hook_url  # url-encoded on the wire, intact here
    assert parse_qs(urlsplit(rig.hook_url).query)["token"] == ["tok/en"]
    assert request.json() == {
        "prompt": "a portrait in oil",
        "num_images": 2,
        "image_url": "https://in.example/a.png",
        "guidance_scale": 3.5,
    }
    assert rig.fake.jobs[request_id].app == "fal-ai/flux"


# -- webhooks -----------------------------------------------------------------------------------


async def test_ok_webhook_verifies_into_a_success(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A, URL_B])
    delivery = await rig.delivered()
    assert delivery == Delivery(
        request_id, request_id, Outcome("succeeded", request_id, outputs=(URL_A, URL_B))
    )


async def test_error_webhooks_are_failures(rig: Rig) -> None:
    first = await rig.submitted()
    await rig.fake.fail(first, "GPU worker crashed")
    crashed = (await rig.delivered()).outcome
    assert crashed is not None and (crashed.status, crashed.retryable) == ("failed", True)

    second = await rig.submitted()
    detail = [{"loc": ["body", "image_size"], "msg": "invalid size", "type": "value_error"}]
    await rig.fake.fail(second, "Invalid status code: 422", detail=detail)
    invalid = (await rig.delivered()).outcome
    assert invalid is not None and (invalid.status, invalid.retryable) == ("failed", False)

    third = await rig.submitted()
    await rig.fake.fail_payload(third, "payload too large to deliver")
    lost = (await rig.delivered()).outcome
    assert lost is not None and lost.status == "failed"
    assert lost.reason == "payload too large to deliver"


async def test_forged_stale_and_incomplete_deliveries_are_rejected(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    got = rig.sink.last
    hdrs = dict(got.headers)
    no_sig = {k: v for k, v in hdrs.items() if k != "x-fal-webhook-signature"}
    cases: list[tuple[dict[str, str], bytes, float, str]] = [
        (hdrs, got.body.replace(b"a.jpg", b"x.jpg"), T0, "bad_signature"),
        ({**hdrs, "x-fal-webhook-user-id": "someone_else"}, got.body, T0, "bad_signature"),
        ({**hdrs, "x-fal-webhook-signature": "zz-not-hex"}, got.body, T0, "bad_signature"),
        (hdrs, got.body, T0 + 301, "stale_timestamp"),
        (hdrs, got.body, T0 - 301, "stale_timestamp"),
        (no_sig, got.body, T0, "missing_headers"),
    ]
    for headers, body, now, code in cases:
        with pytest.raises(WebhookRejected) as info:
            await rig.provider.verify(headers, body, now)
        assert info.value.code == code, (headers, now)


async def test_a_validly_signed_non_webhook_body_is_malformed(rig: Rig) -> None:
    request_id = await rig.submitted()
    body = b'{"hello": "world"}'
    headers = rig.fake.sign(request_id, int(T0), body)
    with pytest.raises(WebhookRejected) as info:
        await rig.provider.verify(headers, body, T0)
    assert info.value.code == "malformed_body"


async def test_the_jwks_is_fetched_once_and_cached(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    for offset in (0, 1, 200):
        await rig.delivered(T0 + offset - 200)
    assert rig.fake.jwks_hits == 1


async def test_concurrent_first_deliveries_share_one_jwks_fetch(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    await asyncio.gather(*(rig.delivered() for _ in range(5)))
    assert rig.fake.jwks_hits == 1


async def test_key_rotation_refetches_once_on_a_miss_and_not_on_every_call(rig: Rig) -> None:
    fake = rig.fake
    first = await rig.submitted()
    await fake.complete(first, [URL_A])
    await rig.delivered(T0)
    assert fake.jwks_hits == 1

    fake.rotate_key()  # the old key is withdrawn, a new one signs
    fake.clock = lambda: T0 + 120
    second = await rig.submitted()
    await fake.complete(second, [URL_B])
    delivery = await rig.delivered(T0 + 120)
    assert delivery.job_id == second
    assert fake.jwks_hits == 2  # one re-fetch on the miss

    await rig.delivered(T0 + 121)
    assert fake.jwks_hits == 2  # the new key is cached now

    forged = {**rig.sink.last.headers, "x-fal-webhook-signature": "00" * 64}
    for now in (T0 + 122, T0 + 123, T0 + 124):
        with pytest.raises(WebhookRejected):
            await rig.provider.verify(forged, rig.sink.last.body, now)
    assert fake.jwks_hits == 2  # forged deliveries do not hammer the JWKS endpoint


async def test_an_expired_jwks_cache_is_refreshed(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    await rig.delivered(T0)
    rig.fake.clock = lambda: T0 + 24 * 3600
    await rig.fake.deliver(request_id)
    await rig.delivered(T0 + 24 * 3600)
    assert rig.fake.jwks_hits == 2


async def test_every_published_key_is_tried(rig: Rig) -> None:
    old_key = rig.fake.signing_key
    rig.fake.rotate_key(keep_old=True)
    rig.fake.signing_key = old_key  # still signing with the first of two published keys
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    assert len(rig.fake.published) == 2
    assert (await rig.delivered()).job_id == request_id


async def test_jwks_fetch_failures_are_provider_errors(rig: Rig) -> None:
    """A JWKS URL answering 404 is misconfiguration (permanent); an unreachable one is transient
    (the receiver answers 5xx and fal delivers again)."""
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    missing = FalProvider(
        rig.http, key=rig.fake.key, base_url=rig.base_url, jwks_url=f"{rig.base_url}/nothing-here"
    )
    with pytest.raises(PermanentProviderError):
        await rig.delivered(provider=missing)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    unreachable = FalProvider(rig.http, key=rig.fake.key, base_url=rig.base_url, jwks_url=closed)
    with pytest.raises(RetryableProviderError):
        await rig.delivered(provider=unreachable)


# -- poll and cancel ----------------------------------------------------------------------------


async def test_poll_reads_status_without_the_subpath_then_the_result(rig: Rig) -> None:
    request_id = await rig.submitted()
    assert await rig.provider.poll(request_id, MODEL) == Outcome("running", request_id)
    rig.fake.start(request_id)
    assert await rig.provider.poll(request_id, MODEL) == Outcome("running", request_id)
    await rig.fake.complete(request_id, [URL_A])
    assert await rig.provider.poll(request_id, MODEL) == Outcome(
        "succeeded", request_id, outputs=(URL_A,)
    )
    gets = [r.path for r in rig.fake.requests if r.method == "GET"]
    assert gets[-2:] == [
        f"/fal-ai/flux/requests/{request_id}/status",
        f"/fal-ai/flux/requests/{request_id}",
    ]


async def test_completed_with_error_is_a_failure_without_fetching_the_result(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.fake.fail(request_id, "Request timed out", error_type="request_timeout")
    outcome = await rig.provider.poll(request_id, MODEL)
    assert (outcome.status, outcome.retryable, outcome.reason) == (
        "failed",
        True,
        "Request timed out",
    )
    assert rig.fake.requests[-1].path.endswith("/status")


async def test_poll_of_an_unknown_request_is_a_retryable_failure(rig: Rig) -> None:
    outcome = await rig.provider.poll("00000000-0000-0000-0000-000000000000", MODEL)
    assert (outcome.status, outcome.retryable) == ("failed", True)


async def test_cancel_puts_to_the_app_path(rig: Rig) -> None:
    request_id = await rig.submitted()
    await rig.provider.cancel(request_id, MODEL)
    assert rig.fake.jobs[request_id].cancelled
    last = rig.fake.requests[-1]
    assert (last.method, last.path) == ("PUT", f"/fal-ai/flux/requests/{request_id}/cancel")


# -- errors -------------------------------------------------------------------------------------


async def test_http_errors_are_translated(rig: Rig) -> None:
    rig.fake.faults.add(500)
    with pytest.raises(RetryableProviderError):
        await rig.submitted()
    rig.fake.faults.add(429, retry_after="12")
    with pytest.raises(ProviderRateLimited) as limited:
        await rig.submitted()
    assert limited.value.retry_after_s == 12
    rig.fake.faults.add(422, body={"detail": [{"msg": "prompt too long"}]})
    with pytest.raises(PermanentProviderError) as rejected:
        await rig.submitted()
    assert "prompt too long" in rejected.value.message
    with pytest.raises(PermanentProviderError):  # a wrong key
        await FalProvider(rig.http, key="nope", base_url=rig.base_url).submit(
            Submission("t", 1, MODEL, "p", rig.hook_url)
        )


async def test_a_success_answer_without_a_request_id_is_retryable(rig: Rig) -> None:
    rig.fake.faults.add(200, body={"status": "IN_QUEUE"})
    with pytest.raises(RetryableProviderError):
        await rig.submitted()


async def test_a_delivery_signed_for_another_fal_account_is_wrong_account(rig: Rig) -> None:
    """The user id is part of what fal signs: a genuine signature for another account is
    ``wrong_account``; a user id changed after signing is a bad signature; ours is accepted."""
    request_id = await rig.submitted()
    await rig.fake.complete(request_id, [URL_A])
    got = rig.sink.last
    jwks = f"{rig.base_url}/.well-known/jwks.json"

    def account(user_id: str) -> FalProvider:
        return FalProvider(
            rig.http, key=rig.fake.key, base_url=rig.base_url, jwks_url=jwks, user_id=user_id
        )

    with pytest.raises(WebhookRejected) as info:
        await account("user_ours").verify(got.headers, got.body, T0)
    assert info.value.code == "wrong_account"
    relabelled = {**got.headers, "x-fal-webhook-user-id": "user_ours"}
    with pytest.raises(WebhookRejected) as info:
        await account("user_ours").verify(relabelled, got.body, T0)
    assert info.value.code == "bad_signature"
    delivery = await account(rig.fake.user_id).verify(got.headers, got.body, T0)
    assert delivery.job_id == request_id
