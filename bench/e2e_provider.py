"""The provider fake of ``bench_e2e``: Replicate's predictions contract in its own process.

``python -m bench.e2e_provider --port P --token T --secret whsec_…`` serves, under ``/v1``
(shared/PROVIDERS.md, "Replicate"; every route checks ``Authorization: Bearer T``):

- ``POST /v1/models/{owner}/{name}/predictions``, ``POST /v1/deployments/{owner}/{name}/
  predictions``, ``POST /v1/predictions`` (needs ``version``) → 201, the prediction object with
  ``status: "starting"``;
- ``GET /v1/predictions/{id}``; ``POST /v1/predictions/{id}/cancel``;
- ``GET /v1/webhooks/default/secret`` → ``{"key": "whsec_…"}``.

Unlike Replicate it never runs a model and never sends a webhook: it holds every prediction until
the bench's driver completes it, through control routes that are not Replicate's:

- ``GET /_bench/stats`` → counts (created, held, succeeded, canceled, output fetches, refusals);
- ``GET /_bench/held?after=SEQ`` → ``{"items": [{"seq", "id", "webhook"}], "last"}``: the
  predictions still ``starting``, in creation order, after ``SEQ`` and up to ``last`` (the seq
  before the first one whose inputs are still downloading);
- ``POST /_bench/complete`` ``{"ids": [...]}`` → ``{"items": [prediction, ...]}``: those
  predictions marked ``succeeded`` with ``output: [url]`` and returned whole — the body the
  driver signs and posts to each ``webhook``;
- ``GET /_bench/png``: the output image itself (not counted as an output fetch).

Like Replicate, the fake downloads every input given as an http(s) URL before the prediction
may start (a data URI it decodes, as a model would): a prediction is held (listed by
``/_bench/held``, counted in ``held``) only once its inputs are fetched, so a bench with
``HOOKLINE_INPUTS_BY_URL=always`` pays for hookline serving each input inside phase A, as a real
provider would make it pay. ``input_fetches`` / ``input_fetch_failures`` / ``input_fetched_bytes``
count them.

Each output URL (``/delivery/{id}/out-0.png`` on this host) serves one 256×256 PNG, made once at
start-up and served from memory; a wrong token on it is refused (Replicate's file outputs may need
the API token; hookline sends it to the API's own host).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import random
import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import uvicorn
from httpx_aiohttp import AiohttpTransport
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

OUTPUT_SIDE = 256
ID_ALPHABET = string.ascii_lowercase + string.digits
BODY_FIELDS = frozenset({"version", "input", "webhook", "webhook_events_filter", "stream"})


def output_png(side: int = OUTPUT_SIDE, seed: int = 7) -> bytes:
    """A photo-like PNG (gradients under fine noise, so it compresses like a real output)."""
    rng = random.Random(seed)
    gradient = Image.linear_gradient("L").resize((side, side))
    noise = Image.frombytes("L", (side, side), rng.randbytes(side * side))
    red = Image.blend(gradient, noise, 0.15)
    green = Image.blend(gradient.rotate(90), noise.rotate(180), 0.1)
    blue = Image.blend(gradient.rotate(225), Image.new("L", (side, side), rng.randrange(256)), 0.5)
    buf = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(buf, "PNG")
    return buf.getvalue()


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def problem(status: int, detail: str) -> Response:
    return json_response({"title": detail, "detail": detail, "status": status}, status)


@dataclass(slots=True)
class Counters:
    created: int = 0
    succeeded: int = 0
    canceled: int = 0
    gets: int = 0
    output_fetches: int = 0
    refused_auth: int = 0
    refused_body: int = 0
    data_uri_inputs: int = 0
    url_inputs: int = 0
    input_bytes: int = 0
    input_fetches: int = 0
    input_fetch_failures: int = 0
    input_fetched_bytes: int = 0


@dataclass(slots=True)
class Fake:
    """Every prediction made, in creation order, and what was asked of the fake."""

    base: str  # e.g. http://127.0.0.1:9000 (no /v1)
    token: str
    secret: str
    png: bytes
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    fetching: set[str] = field(default_factory=set)  # predictions whose inputs are downloading
    _fetches: set[asyncio.Task[None]] = field(default_factory=set)
    _client: httpx.AsyncClient | None = None

    def is_held(self, pid: str) -> bool:
        return self.predictions[pid]["status"] == "starting" and pid not in self.fetching

    def authorised(self, request: Request) -> bool:
        ok = secrets.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {self.token}"
        )
        if not ok:
            self.counters.refused_auth += 1
        return ok

    def new_id(self) -> str:
        # Replicate ids are 26 lowercase alphanumerics; a counter prefix keeps them unique
        tail = "".join(random.choices(ID_ALPHABET, k=16))
        return f"{next(self._ids):010d}{tail}"

    def create(self, model: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
        pid = self.new_id()
        api = f"{self.base}/v1/predictions/{pid}"
        prediction: dict[str, Any] = {
            "id": pid,
            "model": model,
            "version": version,
            "input": body["input"],
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": iso_now(),
            "started_at": None,
            "completed_at": None,
            "webhook": body.get("webhook"),
            "webhook_events_filter": body.get("webhook_events_filter"),
            "metrics": {},
            "urls": {
                "get": api,
                "cancel": f"{api}/cancel",
                "web": f"https://replicate.com/p/{pid}",
            },
        }
        self.predictions[pid] = prediction
        self.order.append(pid)
        self.counters.created += 1
        for value in body["input"].values():
            if isinstance(value, str) and value.startswith("data:"):
                self.counters.data_uri_inputs += 1
                self.counters.input_bytes += len(value)
                base64.b64decode(value.partition(",")[2])  # the model reads the image
            elif isinstance(value, str) and value.startswith(("http://", "https://")):
                self.counters.url_inputs += 1
                self.fetching.add(pid)
                fetch = asyncio.get_running_loop().create_task(self.fetch_input(pid, value))
                self._fetches.add(fetch)
                fetch.add_done_callback(self._fetches.discard)
        return prediction

    async def fetch_input(self, pid: str, url: str) -> None:
        """Download one input URL, as Replicate does before a model runs; then the prediction
        may be held (a failed fetch is counted: the bench reports it)."""
        if self._client is None:  # aiohttp underneath: the fake's CPU must not be the limit
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            self._client = httpx.AsyncClient(
                transport=AiohttpTransport(limits=limits, trust_env=False),
                timeout=30,
                limits=limits,
                trust_env=False,
            )
        try:
            answer = await self._client.get(url)
            if answer.status_code == 200:
                self.counters.input_fetches += 1
                self.counters.input_fetched_bytes += len(answer.content)
            else:
                self.counters.input_fetch_failures += 1
        except httpx.HTTPError:
            self.counters.input_fetch_failures += 1
        finally:
            self.fetching.discard(pid)

    def complete(self, pid: str) -> dict[str, Any] | None:
        prediction = self.predictions.get(pid)
        if prediction is None:
            return None
        if prediction["status"] == "starting":
            now = iso_now()
            prediction.update(
                status="succeeded",
                output=[f"{self.base}/delivery/{pid}/out-0.png"],
                started_at=now,
                completed_at=now,
                metrics={"predict_time": 0.0},
            )
            self.counters.succeeded += 1
        return prediction


def check_body(body: Any, *, needs_version: bool) -> str | None:
    """Why Replicate would refuse this create body (422), or None."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    unknown = set(body) - BODY_FIELDS
    if unknown:
        return f"Unknown fields: {', '.join(sorted(unknown))}."
    if needs_version and not isinstance(body.get("version"), str):
        return "version is required."
    if not isinstance(body.get("input"), dict):
        return "input is required and must be an object."
    webhook = body.get("webhook")
    if webhook is not None and not (
        isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
    ):
        return "webhook must be an http(s) URL."
    return None


def create_app(fake: Fake) -> Starlette:
    async def create(request: Request) -> Response:
        if not fake.authorised(request):
            return problem(401, "Unauthenticated")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            fake.counters.refused_body += 1
            return problem(400, "Invalid JSON")
        params = request.path_params
        why = check_body(body, needs_version="owner" not in params)
        if why:
            fake.counters.refused_body += 1
            return problem(422, why)
        if "owner" in params:
            model, version = f"{params['owner']}/{params['name']}", "latest"
        else:
            model, _, version = str(body["version"]).rpartition(":")
        return json_response(fake.create(model or "unknown/unknown", version, body), 201)

    async def get(request: Request) -> Response:
        if not fake.authorised(request):
            return problem(401, "Unauthenticated")
        fake.counters.gets += 1
        prediction = fake.predictions.get(request.path_params["id"])
        return json_response(prediction) if prediction else problem(404, "Not found")

    async def cancel(request: Request) -> Response:
        if not fake.authorised(request):
            return problem(401, "Unauthenticated")
        prediction = fake.predictions.get(request.path_params["id"])
        if prediction is None:
            return problem(404, "Not found")
        if prediction["status"] in ("starting", "processing"):
            prediction.update(status="canceled", completed_at=iso_now())
            fake.counters.canceled += 1
        return json_response(prediction)

    async def secret(request: Request) -> Response:
        if not fake.authorised(request):
            return problem(401, "Unauthenticated")
        return json_response({"key": fake.secret})

    async def delivery(request: Request) -> Response:
        sent = request.headers.get("authorization")
        if sent is not None and not fake.authorised(request):
            return problem(401, "Unauthenticated")
        prediction = fake.predictions.get(request.path_params["id"])
        if prediction is None or prediction["status"] != "succeeded":
            return problem(404, "Not found")
        fake.counters.output_fetches += 1
        return Response(fake.png, media_type="image/png")

    async def png(request: Request) -> Response:  # the output as made, for the bench's checks
        return Response(fake.png, media_type="image/png")

    async def stats(request: Request) -> Response:
        held = sum(1 for pid in fake.predictions if fake.is_held(pid))
        counts = {name: getattr(fake.counters, name) for name in Counters.__slots__}
        return json_response({**counts, "held": held, "png_bytes": len(fake.png)})

    async def held(request: Request) -> Response:
        after = int(request.query_params.get("after", "-1"))
        items, last = [], len(fake.order) - 1
        for seq, pid in enumerate(fake.order[after + 1 :], start=after + 1):
            if pid in fake.fetching:  # held later: "last" stops before it, so it is not skipped
                last = min(last, seq - 1)
            elif fake.is_held(pid):
                items.append({"seq": seq, "id": pid, "webhook": fake.predictions[pid]["webhook"]})
        items = [item for item in items if item["seq"] <= last]
        return json_response({"items": items, "last": last})

    async def complete(request: Request) -> Response:
        ids = orjson.loads(await request.body()).get("ids", [])
        done = [p for p in (fake.complete(str(i)) for i in ids) if p is not None]
        return json_response({"items": done})

    return Starlette(
        routes=[
            Route("/v1/predictions", create, methods=["POST"]),
            Route("/v1/models/{owner}/{name}/predictions", create, methods=["POST"]),
            Route("/v1/deployments/{owner}/{name}/predictions", create, methods=["POST"]),
            Route("/v1/predictions/{id}", get, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", cancel, methods=["POST"]),
            Route("/v1/webhooks/default/secret", secret, methods=["GET"]),
            Route("/delivery/{id}/out-0.png", delivery, methods=["GET"]),
            Route("/_bench/png", png, methods=["GET"]),
            Route("/_bench/stats", stats, methods=["GET"]),
            Route("/_bench/held", held, methods=["GET"]),
            Route("/_bench/complete", complete, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e_provider", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True, help="the Bearer token every /v1 call must carry")
    p.add_argument("--secret", required=True, help="the account's whsec_ webhook secret")
    args = p.parse_args(argv)
    fake = Fake(f"http://{args.host}:{args.port}", args.token, args.secret, output_png())
    uvicorn.run(
        create_app(fake), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
