"""A fake of Replicate's predictions API (shared/PROVIDERS.md, "Replicate").

Routes (relative to the served base URL, which plays ``https://api.replicate.com/v1``):
``POST /predictions`` (needs ``version``), ``POST /models/{owner}/{name}/predictions``,
``POST /deployments/{owner}/{name}/predictions``, ``GET /predictions/{id}``,
``POST /predictions/{id}/cancel``, ``GET /webhooks/default/secret``. Every route needs
``Authorization: Bearer <token>``; any other path is recorded too and answered 404. Webhooks
carry the full prediction object, Standard Webhooks headers signed with the fake's ``whsec_``
secret (several when rotating), and a ``webhook-id`` that stays the same across redeliveries.
Only events named in ``webhook_events_filter`` are sent; without a filter, Replicate's default
(``output`` and ``completed``) applies.

One deviation: Replicate requires an HTTPS webhook; this fake also takes http on loopback hosts,
where the tests' receiver listens.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbacks import standard_webhooks
from tests.fakes import ANY_METHOD, FaultPlan, HttpClientLifespan, RecordedRequest, record

EVENTS = frozenset({"start", "output", "logs", "completed"})
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse({"title": title, "detail": detail, "status": status}, status_code=status)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


@dataclass
class _Hook:
    url: str | None
    events: frozenset[str]
    msg_id: str = field(default_factory=lambda: "msg_" + secrets.token_hex(12))


@dataclass(frozen=True)
class Delivered:
    prediction_id: str
    msg_id: str
    status: int | None  # None: the receiver could not be reached


class ReplicateFake(HttpClientLifespan):
    """Predictions in memory, controls for tests, signed webhooks to the given URL."""

    def __init__(
        self,
        *,
        token: str = "r8_fake_token",
        webhook_secret: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.webhook_secret = webhook_secret or standard_webhooks.generate_secret()
        self.extra_secrets: list[str] = []  # signed with too, after the main one (rotation)
        self.clock = clock
        self.predictions: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self.deliveries: list[Delivered] = []
        self.secret_hits = 0
        self.faults = FaultPlan()
        self._hooks: dict[str, _Hook] = {}
        self._http: httpx.AsyncClient | None = None
        self.app = Starlette(
            routes=[
                Route("/predictions", self._create, methods=["POST"]),
                Route("/models/{owner}/{name}/predictions", self._create, methods=["POST"]),
                Route("/deployments/{owner}/{name}/predictions", self._create, methods=["POST"]),
                Route("/predictions/{id}", self._get, methods=["GET"]),
                Route("/predictions/{id}/cancel", self._cancel, methods=["POST"]),
                Route("/webhooks/default/secret", self._secret, methods=["GET"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ],
            lifespan=self._lifespan,
        )

    # -- the API --------------------------------------------------------------------------------

    async def _gate(self, request: Request) -> Response | None:
        """Record the request; answer 401 without the token, or a planned fault."""
        self.requests.append(await record(request))
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not secrets.compare_digest(token, self.token):
            return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        return self.faults.next_response()

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return _problem(404, "Not found", "The requested resource could not be found")

    async def _create(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _problem(400, "Invalid JSON", "The request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return _problem(422, "Input validation failed", "input is required")
        params = request.path_params
        model = f"{params['owner']}/{params['name']}" if "owner" in params else "unknown/model"
        version: Any = "latest-version-id" if "owner" in params else body.get("version")
        if not isinstance(version, str) or not version:
            return _problem(422, "Invalid version", "version is required")
        hook, error = self._parse_hook(body)
        if error is not None:
            return _problem(422, "Invalid webhook", error)
        pid = base64.b32encode(secrets.token_bytes(16)).decode().lower()[:26]
        base = str(request.base_url).rstrip("/")
        self.predictions[pid] = {
            "id": pid,
            "model": model,
            "version": version,
            "input": body["input"],
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": _iso(self.clock()),
            "started_at": None,
            "completed_at": None,
            "metrics": {},
            "urls": {
                "get": f"{base}/predictions/{pid}",
                "cancel": f"{base}/predictions/{pid}/cancel",
                "web": f"https://replicate.com/p/{pid}",
            },
        }
        self._hooks[pid] = hook
        return JSONResponse(self.predictions[pid], status_code=201)

    @staticmethod
    def _parse_hook(body: dict[str, Any]) -> tuple[_Hook, str | None]:
        url = body.get("webhook")
        events = body.get("webhook_events_filter")
        if events is None:
            events = ["output", "completed"]  # Replicate's default without a filter
        if not isinstance(events, list) or not set(events) <= EVENTS:
            return _Hook(None, frozenset()), f"webhook_events_filter must be a subset of {EVENTS}"
        if url is not None:
            parsed = httpx.URL(str(url))
            if parsed.scheme != "https" and not (
                parsed.scheme == "http" and parsed.host in LOOPBACK
            ):
                return _Hook(None, frozenset()), "webhook must be an HTTPS URL"
        return _Hook(str(url) if url is not None else None, frozenset(events)), None

    async def _get(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return _problem(404, "Not found", "The requested resource could not be found")
        return JSONResponse(prediction)

    async def _cancel(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        pid = request.path_params["id"]
        if pid not in self.predictions:
            return _problem(404, "Not found", "The requested resource could not be found")
        if self.predictions[pid]["status"] not in TERMINAL:
            await self._finish(pid, "canceled")
        return JSONResponse(self.predictions[pid])

    async def _secret(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        self.secret_hits += 1
        return JSONResponse({"key": self.webhook_secret})

    # -- controls for tests ---------------------------------------------------------------------

    def submitted(self, path_suffix: str = "predictions") -> list[RecordedRequest]:
        """The submission requests received (POSTs ending in ``path_suffix``)."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith(path_suffix)]

    async def start(self, pid: str) -> None:
        """``starting`` → ``processing`` (a ``start`` webhook only if the filter asks for it)."""
        self.predictions[pid].update(status="processing", started_at=_iso(self.clock()))
        if "start" in self._hooks[pid].events:
            await self.deliver(pid)

    async def complete(self, pid: str, output: str | Sequence[str] | None) -> None:
        """Succeed with ``output`` (a URL or a list of URLs) and send the terminal webhook."""
        value = output if isinstance(output, str) or output is None else list(output)
        await self._finish(pid, "succeeded", output=value, metrics={"predict_time": 1.5})

    async def fail(self, pid: str, error: str) -> None:
        await self._finish(pid, "failed", error=error)

    async def abort(self, pid: str) -> None:
        await self._finish(pid, "aborted")

    def remove_data(self, pid: str) -> None:
        """What Replicate does about an hour after completion (no webhook)."""
        self.predictions[pid].update(output=None, data_removed=True)

    async def _finish(self, pid: str, status: str, **fields: Any) -> None:
        self.predictions[pid].update(status=status, completed_at=_iso(self.clock()), **fields)
        if "completed" in self._hooks[pid].events:
            await self.deliver(pid)

    async def deliver(self, pid: str) -> int | None:
        """(Re)send the webhook for the prediction as it stands, with its stable webhook-id."""
        hook = self._hooks[pid]
        if hook.url is None:
            return None
        assert self._http is not None, "serve the fake before sending webhooks"
        body = json.dumps(self.predictions[pid]).encode()
        keys: list[str | bytes] = [self.webhook_secret, *self.extra_secrets]
        headers = standard_webhooks.sign_headers(keys, hook.msg_id, int(self.clock()), body)
        headers["content-type"] = "application/json"
        try:
            response = await self._http.post(hook.url, content=body, headers=headers)
            status: int | None = response.status_code
        except httpx.HTTPError:
            status = None
        self.deliveries.append(Delivered(pid, hook.msg_id, status))
        return status
