"""Provider URLs are never steered by users, provider answers or webhooks (issue 13, item 3).

Each adapter runs against its fake over real HTTP; the fake records every request it receives
(its path as routed and as sent, escapes kept). For a table of hostile strings — dot segments,
empty segments, queries, fragments, percent-escapes, backslashes, unicode dots, control
characters, the provider's other endpoints — every operation that would put the string into a URL
raises before any request, and every request a fake received in a test is one of the routes
PROVIDERS.md documents for it. Without the adapters' grammars, most of these strings reach the
fake (``../../v1/credits`` becomes ``POST /v1/credits`` with the operator's key).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbacks import standard_webhooks
from callbacks.bfl import BflProvider, trusted_polling_url
from callbacks.bfl import validate_model as bfl_model
from callbacks.dashscope import DashScopeProvider
from callbacks.errors import InvalidJobId, InvalidModel, WebhookRejected
from callbacks.fal import FalProvider
from callbacks.fal import validate_model as fal_model
from callbacks.hunyuan import HunyuanProvider
from callbacks.kling import KlingProvider
from callbacks.openai import OpenAiProvider
from callbacks.provider import Provider, Submission, checked_model
from callbacks.replicate import ReplicateProvider
from callbacks.replicate import validate_model as replicate_model
from callbacks.seedream import SeedreamProvider
from statemachine.states import State
from tests.fakes import RecordedRequest
from tests.fakes.bfl_fake import BflFake
from tests.fakes.fal_fake import FalFake
from tests.fakes.replicate_fake import ReplicateFake
from tests.support.hookline import running_hookline
from tests.support.server import serve_app

T0 = 1_750_000_000.0
HOOK = "https://hookline.example/v1/callbacks/x/t1?token=k"

# Refused by every adapter: what a path must never carry.
HOSTILE_MODELS = [
    "../../v1/credits",
    "..",
    ".",
    "x/../../..",
    "fal-ai/flux/../../credits",
    "a/./b",
    "%2e%2e/credits",
    "fal-ai/%2e%2e/%2e%2e/credits",
    "fal-ai/flux%2Fdev",
    "fal-ai/%66lux",
    "fal-ai//flux",
    "/fal-ai/flux",
    "fal-ai/flux/",
    "",
    "fal-ai\\..\\credits",
    "fal-ai/flux\\dev",
    "fal-ai/flux?y=",
    "fal-ai/flux?fal_webhook=https://evil.example/",
    "fal-ai/flux#frag",
    "fal-ai/flux\u2024\u2024/x",  # ONE DOT LEADER
    "fal-ai/\uff0e\uff0e/credits",  # FULLWIDTH FULL STOP
    "fal-ai/flux\u3002dev",  # IDEOGRAPHIC FULL STOP
    "fal-ai/\ufb02ux",  # the "fl" ligature
    "fal-ai/flux\n",
    "fal-ai/flux\r\nX-Injected: 1",
    "fal-ai/fl\x00ux",
    "fal-ai/flux dev",
    " fal-ai/flux",
    "fal-ai/flux\t",
    "http://evil.example/x",
    "//evil.example/x",
    "a/" + "b" * 300,
]
REPLICATE_HOSTILE = [
    "owner/name/extra",  # would be /models/owner/name/extra/predictions
    "predictions/abc/cancel",
    "webhooks/default/secret",
    "deployments/acme",
    "deployments/acme/portraits/predictions",
    "deployments/acme/portraits:5599ed30",
    "deployments/../predictions",
    "owner/name:",
    "owner/name:../../x",
    "owner/name:5599ed30/cancel",
    "owner/name:5599ed30?x=1",
    "not-a-version",
    "m",
]
FAL_HOSTILE = [
    "flux",  # one segment: no app
    "fal-ai/flux/requests/00000000-0000-0000-0000-000000000000/cancel",
    "fal-ai/flux/requests",
    "a/b/c/d/e/f/g/h/i",
]
BFL_HOSTILE = [
    "get_result",
    "credits",
    "finetune",
    "my_finetunes",
    "delete_finetune",
    "finetune_details",
    "flux-pro-1.1/../credits",
    "flux-pro-1.1/x",
    "v1/flux-pro-1.1",
    "FLUX-PRO-1.1",
    "flux",
    "flux-",
    "flux--pro",
    "flux-pro-1.1.",
    "flux_pro",
    "flux-" + "a" * 80,
]
HOSTILE_JOB_IDS = [
    "../../credits",
    "..",
    "a/b",
    "x?y=1",
    "x#y",
    "%2e%2e",
    "%2F",
    "",
    "a\\b",
    "id\n",
    "\u2024\u2024",
    "a b",
    "a.b",
    "requests/x/cancel",
    "x" * 200,
]

SEG = r"[A-Za-z0-9][A-Za-z0-9._-]*"
ID = r"[A-Za-z0-9][A-Za-z0-9_-]*"
REPLICATE_ROUTES = [
    ("POST", r"/predictions"),
    ("POST", rf"/models/{SEG}/{SEG}/predictions"),
    ("POST", rf"/deployments/{SEG}/{SEG}/predictions"),
    ("GET", rf"/predictions/{ID}"),
    ("POST", rf"/predictions/{ID}/cancel"),
    ("GET", r"/webhooks/default/secret"),
]
FAL_ROUTES = [
    ("POST", rf"/{SEG}/{SEG}(/{SEG}){{0,6}}"),
    ("GET", rf"/{SEG}/{SEG}/requests/{ID}/status"),
    ("GET", rf"/{SEG}/{SEG}/requests/{ID}"),
    ("PUT", rf"/{SEG}/{SEG}/requests/{ID}/cancel"),
    ("GET", r"/\.well-known/jwks\.json"),
]
BFL_ROUTES = [
    ("POST", r"/flux(-[a-z0-9]+|\.[a-z0-9]+)+"),
    ("GET", r"/get_result"),
    ("GET", r"/us1/get_result"),  # the fake's regional polling URL
]


def documented(request: RecordedRequest, routes: list[tuple[str, str]]) -> bool:
    """Whether a received request is one of ``routes``: its method and its path as sent (no
    escapes, no dot segments, no empty segments), and for BFL polls an ``id`` query only."""
    if request.raw_path != request.path or ".." in request.path or "//" in request.path:
        return False
    if request.path.endswith("/get_result") and set(request.query) != {"id"}:
        return False
    return any(m == request.method and re.fullmatch(p, request.path) for m, p in routes)


def assert_documented(requests: list[RecordedRequest], routes: list[tuple[str, str]]) -> None:
    stray = [(r.method, r.raw_path, r.query) for r in requests if not documented(r, routes)]
    assert stray == [], stray


def submission(model: str) -> Submission:
    return Submission("t1", 1, model, "a portrait in oil", HOOK)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


# -- Replicate ------------------------------------------------------------------------------------


@pytest.fixture
async def replicate(http: httpx.AsyncClient) -> AsyncIterator[tuple[ReplicateFake, Any]]:
    fake = ReplicateFake(clock=lambda: T0)
    async with serve_app(fake.app) as base_url:
        yield fake, ReplicateProvider(http, api_token=fake.token, base_url=base_url)


async def test_replicate_hostile_models_reach_no_route(
    replicate: tuple[ReplicateFake, ReplicateProvider],
) -> None:
    fake, provider = replicate
    for model in HOSTILE_MODELS + REPLICATE_HOSTILE:
        with pytest.raises(InvalidModel) as info:
            await provider.submit(submission(model))
        assert info.value.code == "invalid_model"
        with pytest.raises(InvalidModel):
            replicate_model(model)
        assert fake.requests == [], (model, fake.requests)


async def test_replicate_good_models_reach_only_the_documented_routes(
    replicate: tuple[ReplicateFake, ReplicateProvider],
) -> None:
    fake, provider = replicate
    paths = []
    for model in ("acme/flux-1.1-pro_x", "acme/painter:5599ed30", "5599ed30", "deployments/a/b"):
        assert replicate_model(model) == model
        job_id = await provider.submit(submission(model))
        await provider.poll(job_id, model)
        await provider.cancel(job_id, model)
        paths.append(fake.requests[-3].path)
    assert paths == [
        "/models/acme/flux-1.1-pro_x/predictions",
        "/predictions",
        "/predictions",
        "/deployments/a/b/predictions",
    ]
    assert_documented(fake.requests, REPLICATE_ROUTES)


async def test_replicate_hostile_job_ids_reach_no_route(
    replicate: tuple[ReplicateFake, ReplicateProvider],
) -> None:
    """From a stored task (poll, cancel), a submit answer, or a signed webhook body."""
    fake, provider = replicate
    for job_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await provider.poll(job_id, "acme/painter")
        with pytest.raises(InvalidJobId):
            await provider.cancel(job_id, "acme/painter")
    assert fake.requests == []
    for job_id in HOSTILE_JOB_IDS[:-1]:
        if not job_id:
            continue  # an answer without an id is the provider's transient fault, tested elsewhere
        fake.faults.add(200, body={"id": job_id, "status": "starting"})
        with pytest.raises(InvalidJobId):
            await provider.submit(submission("acme/painter"))
        body = json.dumps({"id": job_id, "status": "succeeded", "output": ["https://x/y"]})
        raw = body.encode()
        headers = standard_webhooks.sign_headers(fake.webhook_secret, "msg_1", int(T0), raw)
        with pytest.raises(WebhookRejected) as info:
            await provider.verify(headers, raw, T0)
        assert info.value.code == "malformed_body"
    assert_documented(fake.requests, REPLICATE_ROUTES)
    assert {r.path for r in fake.requests} == {
        "/models/acme/painter/predictions",
        "/webhooks/default/secret",
    }


# -- fal ------------------------------------------------------------------------------------------


@pytest.fixture
async def fal(http: httpx.AsyncClient) -> AsyncIterator[tuple[FalFake, FalProvider]]:
    fake = FalFake(clock=lambda: T0)
    async with serve_app(fake.app) as base_url:
        jwks = f"{base_url}/.well-known/jwks.json"
        yield fake, FalProvider(http, key=fake.key, base_url=base_url, jwks_url=jwks)


async def test_fal_hostile_models_reach_no_route(fal: tuple[FalFake, FalProvider]) -> None:
    """Submit, poll and cancel: fal puts the model into all three paths."""
    fake, provider = fal
    request_id = str(uuid.uuid4())
    for model in HOSTILE_MODELS + FAL_HOSTILE:
        with pytest.raises(InvalidModel) as info:
            await provider.submit(submission(model))
        assert info.value.code == "invalid_model"
        with pytest.raises(InvalidModel):
            await provider.poll(request_id, model)
        with pytest.raises(InvalidModel):
            await provider.cancel(request_id, model)
        with pytest.raises(InvalidModel):
            fal_model(model)
        assert fake.requests == [], (model, fake.requests)


async def test_fal_good_models_reach_only_the_documented_routes(
    fal: tuple[FalFake, FalProvider],
) -> None:
    fake, provider = fal
    for model in ("fal-ai/flux/dev", "fal-ai/flux-pro/v1.1-ultra", "fal-ai/bytedance/seedream/v4"):
        assert fal_model(model) == model
        request_id = await provider.submit(submission(model))
        await provider.poll(request_id, model)
        await provider.cancel(request_id, model)
        assert fake.requests[-3].path == f"/{model}"
    assert_documented(fake.requests, FAL_ROUTES)


async def test_fal_hostile_request_ids_reach_no_route(fal: tuple[FalFake, FalProvider]) -> None:
    fake, provider = fal
    for request_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await provider.poll(request_id, "fal-ai/flux/dev")
        with pytest.raises(InvalidJobId):
            await provider.cancel(request_id, "fal-ai/flux/dev")
    assert fake.requests == []
    for request_id in HOSTILE_JOB_IDS:
        if not request_id:
            continue
        fake.faults.add(200, body={"request_id": request_id})
        with pytest.raises(InvalidJobId):
            await provider.submit(submission("fal-ai/flux/dev"))
        if "\n" in request_id:
            continue  # not a header value an HTTP peer can send
        body = json.dumps({"request_id": request_id, "status": "OK", "payload": {}}).encode()
        with pytest.raises(WebhookRejected) as info:
            await provider.verify(fake.sign(request_id, int(T0), body), body, T0)
        assert info.value.code == "malformed_body"
    assert_documented(fake.requests, FAL_ROUTES)
    assert {r.path for r in fake.requests} == {"/fal-ai/flux/dev"}  # the JWKS is not recorded
    assert fake.jwks_hits == 1


# -- BFL ------------------------------------------------------------------------------------------


@pytest.fixture
async def bfl(http: httpx.AsyncClient) -> AsyncIterator[tuple[BflFake, BflProvider, str]]:
    fake = BflFake()
    async with serve_app(fake.app) as base_url:
        yield fake, BflProvider(http, api_key=fake.key, base_url=base_url), base_url


async def test_bfl_hostile_models_reach_no_route(bfl: tuple[BflFake, BflProvider, str]) -> None:
    fake, provider, _ = bfl
    for model in HOSTILE_MODELS + BFL_HOSTILE:
        with pytest.raises(InvalidModel) as info:
            await provider.submit(submission(model))
        assert info.value.code == "invalid_model"
        with pytest.raises(InvalidModel):
            bfl_model(model)
        assert fake.requests == [], (model, fake.requests)


async def test_bfl_good_models_reach_only_the_documented_routes(
    bfl: tuple[BflFake, BflProvider, str],
) -> None:
    fake, provider, _ = bfl
    for model in ("flux-pro-1.1", "flux-pro-1.1-ultra", "flux-kontext-pro", "flux-dev"):
        assert bfl_model(model) == model
        job_id = await provider.submit(submission(model))
        await provider.poll(job_id, model)
    assert_documented(fake.requests, BFL_ROUTES)


async def test_bfl_hostile_ids_reach_no_route(bfl: tuple[BflFake, BflProvider, str]) -> None:
    fake, provider, _ = bfl
    for job_id in HOSTILE_JOB_IDS:
        with pytest.raises(InvalidJobId):
            await provider.poll(job_id, "flux-pro-1.1")
        with pytest.raises(WebhookRejected) as info:
            await provider.verify({}, json.dumps({"id": job_id, "status": "Ready"}).encode(), T0)
        assert info.value.code == "malformed_body"
    assert fake.requests == []
    for job_id in HOSTILE_JOB_IDS:
        if job_id:
            fake.faults.add(200, body={"id": job_id, "polling_url": "http://127.0.0.1:9/x"})
            with pytest.raises(InvalidJobId):
                await provider.submit(submission("flux-pro-1.1"))
    assert_documented(fake.requests, BFL_ROUTES)


async def test_bfl_untrusted_polling_urls_are_ignored_for_the_documented_route(
    bfl: tuple[BflFake, BflProvider, str],
) -> None:
    """A submit answer's ``polling_url`` that points anywhere but a get_result URL for the job on
    BFL's API is never called (the ``x-key`` would go with it): the poll uses
    ``{base}/get_result?id=…``. The "evil" host is a second fake that must see nothing."""
    fake, provider, base = bfl
    evil_fake = BflFake(key="whatever")
    async with serve_app(evil_fake.app) as evil:
        job_id, other = str(uuid.uuid4()), str(uuid.uuid4())
        hostile = [
            f"{evil}/get_result?id={job_id}",
            f"{base}/credits?id={job_id}",
            f"{base}/flux-pro-1.1?id={job_id}",
            f"{base}/us1/../get_result?id={job_id}",
            f"{base}/%67et_result?id={job_id}",
            f"{base}//get_result?id={job_id}",
            f"{base}/get_result?id={other}",
            f"{base}/get_result?id={job_id}&id={other}",
            f"{base}/get_result?id={job_id}#x",
            f"{base}/get_result?id={job_id}&x-key=1",
            f"{base}/get_result\\?id={job_id}",
            f"http://user@{base.removeprefix('http://')}/get_result?id={job_id}",
            f"https://api.bfl.ai.{evil.removeprefix('http://')}/get_result?id={job_id}",
            f"ftp://{base.removeprefix('http://')}/get_result?id={job_id}",
            "/get_result?id=" + job_id,
        ]
        for url in hostile:
            fake.faults.add(200, body={"id": job_id, "polling_url": url})
            assert await provider.submit(submission("flux-pro-1.1")) == job_id
            await provider.poll(job_id, "flux-pro-1.1")
            last = fake.requests[-1]
            assert (last.path, last.query) == ("/get_result", {"id": job_id}), url
        assert evil_fake.requests == []
    assert_documented(fake.requests, BFL_ROUTES)


def test_bfl_regional_polling_urls_on_bfl_hosts_are_trusted() -> None:
    job = str(uuid.uuid4())
    base = "https://api.bfl.ai/v1"
    for host in ("api.us1.bfl.ai", "api.eu1.bfl.ai", "api.bfl.ai", "api.bfl.ml"):
        url = f"https://{host}/v1/get_result?id={job}"
        assert trusted_polling_url(url, job, base) == url
    for url in (
        f"https://evilbfl.ai/v1/get_result?id={job}",
        f"https://api.bfl.ai.evil.example/v1/get_result?id={job}",
        f"http://api.us1.bfl.ai/v1/get_result?id={job}",  # the key only over https
        f"https://api.us1.bfl.ai:8443/v1/get_result?id={job}",
        f"https://api.us1.bfl.ai/v1/credits?id={job}",
    ):
        assert trusted_polling_url(url, job, base) is None, url


def test_checked_model_applies_each_adapters_grammar(http: httpx.AsyncClient) -> None:
    """The one call the HTTP layer can make at creation time, whatever the provider."""
    providers: dict[str, Provider] = {
        "replicate": ReplicateProvider(http, api_token="t"),
        "fal": FalProvider(http, key="k"),
        "bfl": BflProvider(http, api_key="k"),
        "openai": OpenAiProvider(http, api_key="k"),
        "dashscope": DashScopeProvider(http, api_key="k"),
        "kling": KlingProvider(http, access_key="a", secret_key="s"),
        "hunyuan": HunyuanProvider(http, secret_id="i", secret_key="k"),
        "seedream": SeedreamProvider(http, api_key="k"),
    }
    good = {
        "replicate": "acme/painter",
        "fal": "fal-ai/flux/dev",
        "bfl": "flux-pro-1.1",
        "openai": "gpt-image-1",
        "dashscope": "wan2.2-t2i-flash",
        "kling": "kling-v2-1",
        "hunyuan": "hunyuan-image",
        "seedream": "doubao-seedream-4-0-250828",
    }
    for name, provider in providers.items():
        assert checked_model(provider, good[name]) == good[name]
        for model in ("../../v1/credits", good[name] + "?x=1", good[name] + "/.."):
            with pytest.raises(InvalidModel):
                checked_model(provider, model)


# -- through a running server -------------------------------------------------------------------


async def test_a_hostile_model_through_the_api_reaches_no_provider_route(tmp_path: Path) -> None:
    """Black box: an admin (who may choose any model) asks for BFL models that would name other
    endpoints. Each is refused at creation (422 ``invalid_model``) or fails with
    ``invalid_model`` and a refund; either way the provider saw no request and no credit moved."""
    fake = BflFake()
    async with (
        serve_app(fake.app) as bfl_url,
        running_hookline(tmp_path, bfl_api_key=fake.key, bfl_base_url=bfl_url) as hl,
    ):
        key = await hl.create_user("root", credits=100, admin=True)
        for model in ("flux-pro-1.1/../../credits", "credits", "x/../../..", "finetune"):
            r = await hl.client.post(
                "/v1/tasks",
                json={
                    "inputs": [{"upload": await hl.upload(key)}],
                    "prompt": "a lighthouse",
                    "provider": "bfl",
                    "model": model,
                },
                headers=hl.auth(key),
            )
            if r.status_code == 422:
                assert r.json()["error"]["code"] == "invalid_model", r.text
                continue
            assert r.status_code == 202, r.text
            done = await hl.wait_terminal(key, r.json()["id"])
            assert (done["state"], done["error"]["code"], done["refunded"]) == (
                State.FAILED.value,
                "invalid_model",
                True,
            ), done
        me = await hl.client.get("/v1/me", headers=hl.auth(key))
        assert me.json()["balance"] == 100
    assert fake.requests == []
