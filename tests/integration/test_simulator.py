"""The provider simulator as a real HTTP peer: Replicate's predictions contract, Standard Webhooks
signatures, expiring output files, and every configured fault.

The simulator and a webhook receiver each run on a loopback port; the tests speak plain httpx (no
hookline adapter). The receiver is the one webhook host the simulator may call and the one host it
may fetch URL inputs from (through hookline's SSRF-safe fetcher, as hookline wires it). Simulated
time is 1 s × time_scale 0.01; webhooks are awaited on a queue.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from callbacks.simulator import SimConfig, Simulator, create_simulator_app
from callbacks.simulator.engine import PredictionRequest, SimError
from service.media.fetch import SafeFetcher
from service.providers import fetch_input_through
from tests.support.server import serve_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 15.0  # generous: only ever reached when something is broken
FAST: dict[str, Any] = {"latency": "fixed:1", "time_scale": 0.01, "api_token": TOKEN}
SMALL = {"width": 64, "height": 48}

T = TypeVar("T")


@dataclass(frozen=True)
class Captured:
    """One webhook request as the receiver saw it."""

    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def prediction(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class Receiver:
    """A webhook endpoint (answers from ``answers`` first, then 200) and a small image host."""

    deliveries: asyncio.Queue[Captured] = field(default_factory=asyncio.Queue)
    answers: list[int] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    async def hook(self, request: Request) -> Response:
        self.deliveries.put_nowait(Captured(dict(request.headers), await request.body()))
        return Response(status_code=self.answers.pop(0) if self.answers else 200)

    async def image(self, request: Request) -> Response:
        data = self.images.get(request.path_params["name"])
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/hook", self.hook, methods=["POST"]),
                Route("/images/{name}", self.image, methods=["GET"]),
            ]
        )

    async def next(self) -> Captured:
        return await asyncio.wait_for(self.deliveries.get(), WAIT_S)


class FakeClock:
    """The simulator's clock for file-URL expiry and data retention."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    api: str  # the simulator's API base, …/v1
    client: httpx.AsyncClient
    receiver: Receiver
    receiver_url: str
    sim: Simulator
    clock: FakeClock

    @property
    def hook_url(self) -> str:
        return f"{self.receiver_url}/hook"

    async def create(self, **input_: Any) -> dict[str, Any]:
        body = {
            "input": {"prompt": "a lighthouse at dusk", **SMALL, **input_},
            "webhook": self.hook_url,
            "webhook_events_filter": ["completed"],
        }
        response = await self.client.post(
            f"{self.api}/models/acme/painter/predictions", json=body, headers={"Prefer": "wait"}
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def get(self, prediction_id: str) -> dict[str, Any]:
        response = await self.client.get(f"{self.api}/predictions/{prediction_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def finished(self, prediction_id: str) -> dict[str, Any]:
        """Poll until the prediction is terminal (for tests where no webhook arrives)."""
        prediction = await eventually(lambda: self.get(prediction_id), _terminal)
        return prediction

    async def secret(self) -> str:
        response = await self.client.get(f"{self.api}/webhooks/default/secret")
        assert response.status_code == 200
        key: str = response.json()["key"]
        return key


def _terminal(prediction: dict[str, Any]) -> bool:
    return prediction["status"] in {"succeeded", "failed", "canceled", "aborted"}


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = WAIT_S
) -> T:
    """Re-run ``probe`` until ``done`` holds (a bounded poll, not a timing assumption)."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = await probe()
            if done(value):
                return value
            await asyncio.sleep(0.01)


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a simulator with the given SimConfig fields (plus FAST) and a receiver."""
    async with AsyncExitStack() as stack:

        async def _start(**config: Any) -> Harness:
            clock = FakeClock()
            receiver = Receiver()
            receiver_url = await stack.enter_async_context(serve_app(receiver.app()))
            receiver_host = receiver_url.removeprefix("http://")
            fetcher = SafeFetcher(
                None, allow_hosts={receiver_host}, max_bytes=10_000_000, timeout_s=10
            )
            stack.push_async_callback(fetcher.aclose)
            app = create_simulator_app(
                SimConfig(**{"webhook_hosts": frozenset({receiver_host}), **FAST, **config}),
                fetch_input=fetch_input_through(fetcher),
                clock=clock,
            )
            sim_url = await stack.enter_async_context(serve_app(app))
            client = await stack.enter_async_context(httpx.AsyncClient(headers=AUTH))
            return Harness(f"{sim_url}/v1", client, receiver, receiver_url, app.state.sim, clock)

        yield _start


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- the contract --------------------------------------------------------------------------------


async def test_submit_answers_201_with_the_replicate_prediction_object(start: Start) -> None:
    h = await start()
    prediction = await h.create()  # with "Prefer: wait", which must not hold the request

    assert set(prediction) == {
        "id", "status", "model", "version", "input", "output", "error", "logs", "metrics",
        "data_removed", "created_at", "started_at", "completed_at", "urls",
    }  # fmt: skip
    assert prediction["status"] == "starting"
    assert prediction["model"] == "acme/painter"
    assert prediction["version"]
    assert prediction["input"]["prompt"] == "a lighthouse at dusk"
    assert prediction["output"] is None and prediction["error"] is None
    assert prediction["data_removed"] is False
    assert datetime.fromisoformat(prediction["created_at"]).tzinfo is not None
    assert prediction["urls"]["get"] == f"{h.api}/predictions/{prediction['id']}"
    assert prediction["urls"]["cancel"] == f"{h.api}/predictions/{prediction['id']}/cancel"
    assert (await h.get(prediction["id"]))["id"] == prediction["id"]


async def test_version_route_takes_owner_name_and_version_from_version(start: Start) -> None:
    h = await start()
    body = {"version": "acme/painter:abc123", "input": {"prompt": "x", **SMALL}}
    response = await h.client.post(f"{h.api}/predictions", json=body)
    assert response.status_code == 201
    assert (response.json()["model"], response.json()["version"]) == ("acme/painter", "abc123")


async def test_completed_webhook_is_signed_with_the_published_secret(start: Start) -> None:
    h = await start()
    prediction = await h.create(num_outputs=2)

    delivery = await h.receiver.next()
    payload = Webhook(await h.secret()).verify(delivery.body, delivery.headers)

    assert payload["id"] == prediction["id"]
    assert payload["status"] == "succeeded"
    assert len(payload["output"]) == 2
    assert payload["completed_at"] and payload["started_at"]
    assert payload == await h.get(prediction["id"])  # the full prediction object, no envelope
    assert delivery.headers["webhook-signature"].startswith("v1,")
    stats = (await h.client.get(f"{h.api}/_sim/stats")).json()
    assert (stats["generations_completed"], stats["webhooks_sent"]) == (1, 1)


async def test_start_filter_sends_processing_then_completed(start: Start) -> None:
    h = await start()
    body = {
        "input": {"prompt": "x", **SMALL},
        "webhook": h.hook_url,
        "webhook_events_filter": ["start", "completed"],
    }
    response = await h.client.post(f"{h.api}/models/acme/painter/predictions", json=body)
    assert response.status_code == 201

    first, second = await h.receiver.next(), await h.receiver.next()
    assert [first.prediction["status"], second.prediction["status"]] == ["processing", "succeeded"]
    assert first.id != second.id


async def test_without_a_filter_output_and_completed_webhooks_are_sent(start: Start) -> None:
    h = await start()
    body = {"input": {"prompt": "x", **SMALL}, "webhook": h.hook_url}
    response = await h.client.post(f"{h.api}/models/acme/painter/predictions", json=body)
    assert response.status_code == 201

    deliveries = [(await h.receiver.next()).prediction for _ in range(2)]
    by_status = {d["status"]: d for d in deliveries}
    assert set(by_status) == {"processing", "succeeded"}
    assert by_status["processing"]["output"] == by_status["succeeded"]["output"]


async def test_outputs_are_real_pngs_whose_pixels_depend_on_the_input(start: Start) -> None:
    h = await start()
    h.receiver.images["blue.png"] = png((20, 40, 230))
    red = await h.create(image=data_uri(png((230, 20, 20))))
    blue = await h.create(image=f"{h.receiver_url}/images/blue.png?token=secret")
    red_again = await h.create(image=data_uri(png((230, 20, 20))))

    outputs = {}
    for prediction in (red, blue, red_again):
        done = await h.finished(prediction["id"])
        assert done["status"] == "succeeded", done["error"]
        response = await h.client.get(done["output"][0])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        outputs[prediction["id"]] = response.content

    image = Image.open(io.BytesIO(outputs[red["id"]]))
    assert (image.format, image.size) == ("PNG", (64, 48))
    assert outputs[red["id"]] != outputs[blue["id"]]
    assert outputs[red["id"]] == outputs[red_again["id"]]  # deterministic


async def test_an_input_that_cannot_be_fetched_fails_the_prediction(start: Start) -> None:
    h = await start()
    prediction = await h.create(image=f"{h.receiver_url}/images/missing.png?token=secret")

    delivery = await h.receiver.next()
    assert delivery.prediction["id"] == prediction["id"]
    assert delivery.prediction["status"] == "failed"
    assert "HTTP 404" in delivery.prediction["error"]
    assert "secret" not in delivery.prediction["error"]  # a signed URL's token is not echoed


async def test_an_input_that_is_not_an_image_fails_the_prediction(start: Start) -> None:
    h = await start()
    await h.create(image="data:image/png;base64," + base64.b64encode(b"not an image").decode())
    delivery = await h.receiver.next()
    assert delivery.prediction["status"] == "failed"
    assert "not a readable image" in delivery.prediction["error"]


async def test_file_urls_expire_and_refuse_tampering(start: Start) -> None:
    h = await start(output_url_ttl_s=600.0)
    prediction = await h.create()
    url = (await h.receiver.next()).prediction["output"][0]
    assert (await h.client.get(url)).status_code == 200

    tampered = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    assert (await h.client.get(tampered)).status_code == 403
    other_file = url.replace("/0.png", "/1.png")
    assert (await h.client.get(other_file)).status_code == 403
    assert (await h.client.get(url.split("?")[0])).status_code == 403
    unknown = url.replace(prediction["id"], "nosuchprediction")
    assert (await h.client.get(unknown)).status_code == 403

    h.clock.now += 601.0
    expired = await h.client.get(url)
    assert expired.status_code == 403
    assert "expired" in expired.json()["detail"]


async def test_data_is_removed_after_the_retention_period(start: Start) -> None:
    h = await start(data_retention_s=3600.0, output_url_ttl_s=7200.0)
    prediction = await h.create()
    url = (await h.receiver.next()).prediction["output"][0]

    h.clock.now += 3601.0
    removed = await h.get(prediction["id"])
    assert removed["data_removed"] is True
    assert removed["output"] is None
    assert (await h.client.get(url)).status_code == 404


# -- faults ----------------------------------------------------------------------------------


async def test_lost_webhook_is_never_sent_but_the_prediction_succeeds(start: Start) -> None:
    h = await start(webhook_loss=1.0)
    prediction = await h.create()

    assert (await h.finished(prediction["id"]))["status"] == "succeeded"
    stats = await eventually(
        lambda: h.client.get(f"{h.api}/_sim/stats"), lambda r: r.json()["webhooks_lost"] == 1
    )
    assert stats.json()["webhooks_sent"] == 0
    assert h.receiver.deliveries.empty()


async def test_duplicate_webhook_is_delivered_twice_with_the_same_id(start: Start) -> None:
    h = await start(webhook_duplicate=1.0)
    await h.create()

    first, second = await h.receiver.next(), await h.receiver.next()
    assert first.id == second.id
    assert first.body == second.body
    assert first.prediction["status"] == "succeeded"


async def test_bad_signature_fails_verification(start: Start) -> None:
    h = await start(webhook_bad_signature=1.0)
    await h.create()

    delivery = await h.receiver.next()
    with pytest.raises(WebhookVerificationError):
        Webhook(await h.secret()).verify(delivery.body, delivery.headers)


async def test_reorder_sends_a_stale_processing_webhook_after_the_terminal_one(
    start: Start,
) -> None:
    h = await start(webhook_reorder=1.0, webhook_delay_s=1.0)
    prediction = await h.create()
    verifier = Webhook(await h.secret())

    terminal, stale = await h.receiver.next(), await h.receiver.next()
    assert verifier.verify(terminal.body, terminal.headers)["status"] == "succeeded"
    stale_payload = verifier.verify(stale.body, stale.headers)
    assert stale_payload["status"] == "processing"
    assert stale_payload["id"] == prediction["id"]
    assert stale_payload["output"] is None
    assert stale.id != terminal.id


async def test_refused_webhooks_are_retried_with_the_same_id(start: Start) -> None:
    h = await start()
    h.receiver.answers.extend([500, 401])
    await h.create()

    attempts = [await h.receiver.next() for _ in range(3)]
    assert len({a.id for a in attempts}) == 1
    stats = (await h.client.get(f"{h.api}/_sim/stats")).json()
    assert (stats["webhooks_failed"], stats["webhooks_delivered"]) == (2, 1)


async def test_output_fetch_fails_with_503_then_succeeds(start: Start) -> None:
    h = await start(output_5xx=1.0, output_5xx_max_consecutive=2)
    await h.create()
    url = (await h.receiver.next()).prediction["output"][0]

    codes = [(await h.client.get(url)).status_code for _ in range(3)]
    assert codes == [503, 503, 200]


async def test_failure_rate_one_fails_every_prediction_with_an_error(start: Start) -> None:
    h = await start(failure_rate=1.0)
    prediction = await h.create()

    payload = (await h.receiver.next()).prediction
    assert payload["id"] == prediction["id"]
    assert payload["status"] == "failed"
    assert payload["error"]
    assert payload["output"] is None
    assert (await h.client.get(f"{h.api}/_sim/stats")).json()["predictions_failed"] == 1


async def test_seeded_simulators_share_their_fate(start: Start) -> None:
    fates = []
    for _ in range(2):
        h = await start(seed=5, latency="uniform:1:20", failure_rate=0.5)
        predictions = [await h.create() for _ in range(6)]
        done = [await h.finished(p["id"]) for p in predictions]
        fates.append([(d["status"], d["metrics"].get("predict_time")) for d in done])
    assert fates[0] == fates[1]
    assert {status for status, _ in fates[0]} == {"succeeded", "failed"}


# -- cancel, limits, auth, validation --------------------------------------------------------


async def test_cancel_stops_the_prediction_and_sends_a_canceled_webhook(start: Start) -> None:
    h = await start(latency="fixed:100000")
    prediction = await h.create()

    response = await h.client.post(prediction["urls"]["cancel"])
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert (await h.receiver.next()).prediction["status"] == "canceled"
    again = await h.client.post(prediction["urls"]["cancel"])
    assert again.json()["status"] == "canceled"
    stats = (await h.client.get(f"{h.api}/_sim/stats")).json()
    assert (stats["predictions_canceled"], stats["in_flight"]) == (1, 0)


async def test_beyond_max_in_flight_answers_429_with_retry_after(start: Start) -> None:
    h = await start(latency="fixed:100000", max_in_flight=1)
    await h.create()
    body = {"input": {"prompt": "x"}}
    response = await h.client.post(f"{h.api}/models/acme/painter/predictions", json=body)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1


async def test_a_full_simulator_answers_429_before_judging_the_body(start: Start) -> None:
    h = await start(latency="fixed:100000", max_in_flight=1)
    await h.create()
    response = await h.client.post(f"{h.api}/models/acme/painter/predictions", json={})
    assert response.status_code == 429
    assert h.sim.stats.predictions_rejected == 1


PROTECTED = [
    ("POST", "/predictions"),
    ("POST", "/models/acme/painter/predictions"),
    ("GET", "/predictions/abc"),
    ("POST", "/predictions/abc/cancel"),
    ("GET", "/webhooks/default/secret"),
]
BAD_AUTH = [None, "Bearer wrong-token", f"Token {TOKEN}", "Bearer"]

BAD_BODIES: list[Any] = [
    [],
    {},
    {"input": "a cat"},
    {"input": {}},
    {"input": {"prompt": ""}},
    {"input": {"prompt": "x", "num_outputs": 9}},
    {"input": {"prompt": "x", "num_outputs": True}},
    {"input": {"prompt": "x", "width": "wide"}},
    {"input": {"prompt": "x", "width": 100_000, "height": 100_000}},  # no huge renders
    {"input": {"prompt": "x", "height": 8}},
    {"input": {"prompt": "x" * 10_001}},
    {"input": {"prompt": "x", "image": "ftp://example.com/a.png"}},
    {"input": {"prompt": "x"}, "webhook": "not a url"},
    {"input": {"prompt": "x"}, "webhook": 42},
    {"input": {"prompt": "x"}, "webhook_events_filter": ["finished"]},
    {"input": {"prompt": "x"}, "webhook_events_filter": "completed"},
    {"input": {"prompt": "x"}, "surprise": True},
]


async def test_the_api_requires_the_bearer_token(start: Start) -> None:
    h = await start()
    async with httpx.AsyncClient() as anonymous:
        for (method, path), auth in itertools.product(PROTECTED, BAD_AUTH):
            headers = {"Authorization": auth} if auth else {}
            response = await anonymous.request(
                method, f"{h.api}{path}", json={"input": {"prompt": "x"}}, headers=headers
            )
            assert response.status_code == 401, (method, path, auth)
            assert response.json()["detail"]
    assert h.sim.stats.predictions_created == 0


async def test_bad_bodies_are_refused_with_422_and_create_nothing(start: Start) -> None:
    h = await start()
    for body in BAD_BODIES:
        response = await h.client.post(f"{h.api}/models/acme/painter/predictions", json=body)
        assert response.status_code == 422, body
        assert response.json()["detail"]
    assert (await h.client.get(f"{h.api}/_sim/stats")).json()["predictions_created"] == 0


async def test_the_version_route_requires_a_version(start: Start) -> None:
    h = await start()
    response = await h.client.post(f"{h.api}/predictions", json={"input": {"prompt": "x"}})
    assert response.status_code == 422


async def test_malformed_json_is_refused_with_400(start: Start) -> None:
    h = await start()
    response = await h.client.post(f"{h.api}/predictions", content=b"{nope")
    assert response.status_code == 400


async def test_unknown_prediction_is_404(start: Start) -> None:
    h = await start()
    response = await h.client.get(f"{h.api}/predictions/doesnotexist")
    assert response.status_code == 404
    assert response.json()["detail"]


# -- the engine without its routes -----------------------------------------------------------


async def test_the_engine_runs_predictions_without_its_http_face() -> None:
    """Simulator is driven directly: a validated request in, SimError (not a response) out."""
    sim = Simulator(SimConfig(**{**FAST, "latency": "fixed:100000", "max_in_flight": 1}))
    try:
        request = PredictionRequest(model="acme/painter", version="v1", input={"prompt": "x"})
        prediction = sim.create(request, base_url="http://sim.test")
        assert sim.get(prediction.id) is prediction
        assert prediction.to_json()["urls"]["get"].startswith("http://sim.test/v1/predictions/")
        with pytest.raises(SimError) as full:
            sim.create(request, base_url="http://sim.test")
        assert (full.value.status, full.value.headers["Retry-After"]) == (429, "1")
        assert sim.cancel(prediction.id).status == "canceled"
        with pytest.raises(SimError) as missing:
            sim.get("doesnotexist")
        assert missing.value.status == 404
    finally:
        await sim.close()
    assert sim.pending_tasks == 0


# -- mounted in a host app -------------------------------------------------------------------


async def test_mounted_simulator_builds_urls_under_the_mount_and_closes_cleanly() -> None:
    """A mounted app's lifespan never runs: tasks start lazily, the host calls close()."""
    sim_app = create_simulator_app(SimConfig(**{**FAST, "latency": "fixed:100000"}))
    host = Starlette(routes=[Mount("/sim", app=sim_app)])
    sim: Simulator = sim_app.state.sim
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://hookline") as client:
        body = {"input": {"prompt": "x"}}
        response = await client.post("/sim/v1/models/a/b/predictions", json=body, headers=AUTH)
        assert response.status_code == 201
        prediction = response.json()
        assert prediction["urls"]["get"] == f"http://hookline/sim/v1/predictions/{prediction['id']}"
        got = await client.get(prediction["urls"]["get"], headers=AUTH)
        assert got.json()["status"] in {"starting", "processing"}
        assert sim.in_flight == 1

        await sim.close()
        await sim.close()  # idempotent

        assert sim.pending_tasks == 0
        refused = await client.post("/sim/v1/models/a/b/predictions", json=body, headers=AUTH)
        assert refused.status_code == 503
