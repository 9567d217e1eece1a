"""The simulator's HTTP face: Replicate's predictions routes over a ``Simulator`` (engine.py).

Here are the routes, the checks of a create body that Replicate makes (answered 422), the one
place ``SimError`` and Starlette's own errors become problem-JSON answers, and the app factory.
hookline's Replicate adapter drives it unchanged (shared/PROVIDERS.md, "Replicate" and "Standard
Webhooks").

It is a development tool, so it trusts little: one Bearer token (random unless configured), the
webhook hosts of ``SimConfig.webhook_hosts`` only, URL inputs only through an injected
``fetch_input`` (hookline's SSRF-safe fetcher), and inputs within bounds a model's schema would
set (``MAX_PROMPT_CHARS``, 16-2048 pixels a side, 1-4 outputs), so a caller cannot make it burn
CPU or memory.

Two ways to run it:
- standalone (``hookline simulator`` → ``run_simulator``): its lifespan closes the simulator;
- mounted in another Starlette app (``Mount("/sim", create_simulator_app(...))``): a mounted app's
  lifespan never runs, so tasks are created lazily by requests and the host app must call
  ``await sim_app.state.sim.close()`` from its own lifespan.

Routes (relative to the mount): ``POST /v1/predictions``, ``POST /v1/models/{owner}/{name}/
predictions``, ``POST /v1/deployments/{owner}/{name}/predictions``, ``GET /v1/predictions/{id}``,
``POST /v1/predictions/{id}/cancel``, ``GET /v1/webhooks/default/secret``, ``GET /v1/files/{id}/
{n}.png?exp=&sig=`` (expiring signed output URLs) and ``GET /v1/_sim/stats`` (not Replicate's).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbacks.simulator.config import SimConfig
from callbacks.simulator.engine import (
    DEFAULT_EVENTS,
    EVENTS,
    IMAGE_KEYS,
    FetchInput,
    PredictionRequest,
    SimError,
    Simulator,
)
from callbacks.simulator.images import output_size

BODY_FIELDS = frozenset({"version", "input", "webhook", "webhook_events_filter", "stream"})
MAX_OUTPUTS = 4
MAX_PROMPT_CHARS = 10_000  # hookline's own prompts are at most 2,000 plus the style's template


def _invalid(detail: str) -> SimError:
    return SimError(422, "Input validation failed", detail)


def parse_create(body: Any, *, model: str | None) -> PredictionRequest:
    """Check a create body the way Replicate does (``SimError`` 422). ``model`` comes from the
    path of the models/deployments routes; without it the body's ``version`` names one."""
    fields = _validate_body(body, needs_version=model is None)
    model_name, version = _model_and_version(model, fields.get("version"))
    return PredictionRequest(
        model=model_name,
        version=version,
        input=fields["input"],
        webhook=fields.get("webhook"),
        events=fields["events"],
    )


def _model_and_version(model: str | None, version: Any) -> tuple[str, str]:
    """``model`` from the path wins; else ``version`` is ``owner/name:id``, ``owner/name`` or
    a bare version id."""
    if model is None:
        spec = str(version)
        if ":" in spec:
            model, _, version_id = spec.partition(":")
            return model, version_id
        if "/" not in spec:
            return "sim/image", spec
        model = spec
    return model, hashlib.sha256(model.encode()).hexdigest()


def _validate_body(body: Any, *, needs_version: bool) -> dict[str, Any]:
    """Check a create body the way Replicate does; return its fields with ``events`` parsed."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    unknown = set(body) - BODY_FIELDS
    if unknown:
        raise _invalid(f"Unknown fields: {', '.join(sorted(unknown))}.")
    if needs_version and not (isinstance(body.get("version"), str) and body["version"]):
        raise _invalid("version is required.")
    model_input = body.get("input")
    if not isinstance(model_input, dict):
        raise _invalid("input is required and must be an object.")
    _validate_input(model_input)
    webhook = body.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise _invalid("webhook must be an http(s) URL.")
    events = body.get("webhook_events_filter")
    if events is None:
        parsed = DEFAULT_EVENTS
    elif isinstance(events, list) and all(isinstance(e, str) and e in EVENTS for e in events):
        parsed = frozenset(events)
    else:
        raise _invalid(f"webhook_events_filter must be a list drawn from {sorted(EVENTS)}.")
    return {**body, "events": parsed}


def _validate_input(model_input: Mapping[str, Any]) -> None:
    prompt = model_input.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("input.prompt is required and must be a non-empty string.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid(f"input.prompt must be at most {MAX_PROMPT_CHARS} characters.")
    count = model_input.get("num_outputs", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_OUTPUTS:
        raise _invalid(f"input.num_outputs must be an integer from 1 to {MAX_OUTPUTS}.")
    try:
        output_size(model_input)
    except ValueError as exc:
        raise _invalid(str(exc)) from exc
    for name in IMAGE_KEYS:
        source = model_input.get(name)
        if source is not None and not (
            isinstance(source, str) and source.startswith(("http://", "https://", "data:"))
        ):
            raise _invalid(f"input.{name} must be an http(s) URL or a data URI.")


class _Routes:
    """The HTTP face of one ``Simulator``; handlers translate requests, never build errors."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self.sim.config.api_token
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            raise SimError(401, "Unauthenticated", "You did not pass a valid authentication token")

    def _base_url(self, request: Request) -> str:
        if self.sim.config.base_url:
            return self.sim.config.base_url.rstrip("/")
        # root_path is the mount prefix (e.g. /sim) when mounted inside the hookline app
        base = request.url.replace(path=request.scope.get("root_path", ""), query="")
        return str(base).rstrip("/")

    async def _body(self, request: Request) -> Any:
        # a data-URI input of max_input_bytes, base64-encoded, plus room for the rest
        limit = self.sim.config.max_input_bytes * 4 // 3 + 100_000
        body = await request.body()
        if len(body) > limit:
            raise SimError(413, "Payload Too Large", f"The body is over {limit} bytes.")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise SimError(400, "Bad Request", f"The body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # nested deeper than the parser's stack
            raise SimError(400, "Bad Request", "The body is nested too deeply.") from exc

    async def create(self, request: Request) -> Response:
        """``POST /v1/predictions`` and the models/deployments variants. ``Prefer: wait`` is
        ignored: the request is never held."""
        self._authorize(request)
        body = await self._body(request)
        params = request.path_params
        model = f"{params['owner']}/{params['name']}" if "owner" in params else None
        # refused (closing, at max_in_flight) before the body is judged: a full simulator
        # answers 429 whatever the body
        self.sim.admit()
        prediction = self.sim.create(
            parse_create(body, model=model), base_url=self._base_url(request)
        )
        return JSONResponse(prediction.to_json(), status_code=201)

    async def get(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self.sim.get(request.path_params["id"]).to_json())

    async def cancel(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self.sim.cancel(request.path_params["id"]).to_json())

    async def secret(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"key": self.sim.config.webhook_secret})

    async def file(self, request: Request) -> Response:
        content = self.sim.file(
            request.path_params["id"],
            request.path_params["name"],
            request.query_params.get("exp"),
            request.query_params.get("sig"),
        )
        return Response(content, media_type="image/png")

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.sim.snapshot())


async def _sim_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SimError)
    body = {"title": exc.title, "detail": exc.detail, "status": exc.status}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {"title": exc.detail, "detail": exc.detail, "status": exc.status_code}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def create_simulator_app(
    config: SimConfig,
    *,
    http: httpx.AsyncClient | None = None,
    fetch_input: FetchInput | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The simulator as an ASGI app; its state is ``app.state.sim`` (a ``Simulator``).

    ``http`` sends the webhooks (one is created, and closed by ``Simulator.close``, when
    omitted); ``fetch_input`` fetches URL inputs (without it only data URIs are accepted);
    ``clock`` times file-URL expiry and data retention.
    """
    sim = Simulator(config, http=http, fetch_input=fetch_input, clock=clock)
    routes = _Routes(sim)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # runs only standalone; a host app that mounts the simulator calls close() itself
        try:
            yield
        finally:
            await sim.close()

    app = Starlette(
        routes=[
            Route("/v1/predictions", routes.create, methods=["POST"]),
            Route("/v1/models/{owner}/{name}/predictions", routes.create, methods=["POST"]),
            Route("/v1/deployments/{owner}/{name}/predictions", routes.create, methods=["POST"]),
            Route("/v1/predictions/{id}", routes.get, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", routes.cancel, methods=["POST"]),
            Route("/v1/webhooks/default/secret", routes.secret, methods=["GET"]),
            Route("/v1/files/{id}/{name}", routes.file, methods=["GET"]),
            Route("/v1/_sim/stats", routes.stats, methods=["GET"]),
        ],
        exception_handlers={SimError: _sim_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.sim = sim
    return app


def run_simulator(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 8001,
    *,
    fetch_input: FetchInput | None = None,
    log_level: str = "info",
) -> None:
    """Serve the simulator standalone (``hookline simulator``) until interrupted."""
    app = create_simulator_app(config, fetch_input=fetch_input)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
