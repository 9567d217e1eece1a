"""A fake of the Black Forest Labs FLUX API (shared/PROVIDERS.md, "Black Forest Labs").

Routes (relative to the served base URL, which plays ``https://api.bfl.ai/v1``):
``POST /{model}`` and ``GET /get_result?id=…``; with ``regional_polling`` the answer's
``polling_url`` points at ``/us1/get_result?id=…`` instead, as BFL's regional endpoints do, so a
test can tell whether the adapter used the URL exactly as returned. With ``omit_polling_url`` the
answer is ``{"id", "status", "webhook_url"}``. Every route needs the ``x-key`` header; any other
path is recorded too and answered 404.
``on_submit`` (optional) runs after a task is created and before the submit is answered: a fast
provider, whose webhook can arrive before its caller has the task id.

Webhooks are a plain POST of ``{"id", "status", "result": {"sample"}}``; as reported (not
documented), when the submission carried a ``webhook_secret`` the fake adds
``X-BFL-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ANY_METHOD, FaultPlan, HttpClientLifespan, RecordedRequest, record

MODELS = frozenset({"flux-pro-1.1", "flux-pro-1.1-ultra", "flux-dev", "flux-kontext-pro"})


@dataclass
class BflTask:
    id: str
    model: str
    body: dict[str, Any]
    webhook_url: str | None
    webhook_secret: str | None
    status: str = "Pending"
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None

    def answer(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "result": self.result,
            "progress": self.progress,
            "details": self.details,
        }


@dataclass(frozen=True)
class Delivered:
    task_id: str
    status: int | None


class BflFake(HttpClientLifespan):
    """Tasks in memory, controls for tests, unsigned trigger webhooks."""

    def __init__(
        self,
        *,
        key: str = "bfl-fake-key",
        regional_polling: bool = False,
        omit_polling_url: bool = False,
    ) -> None:
        self.key = key
        self.regional_polling = regional_polling
        self.omit_polling_url = omit_polling_url
        self.tasks: dict[str, BflTask] = {}
        self.requests: list[RecordedRequest] = []
        self.deliveries: list[Delivered] = []
        self.faults = FaultPlan()
        self.on_submit: Callable[[BflTask], Awaitable[None]] | None = None
        self._http: httpx.AsyncClient | None = None
        self.app = Starlette(
            routes=[
                Route("/get_result", self._get_result, methods=["GET"]),
                Route("/us1/get_result", self._get_result, methods=["GET"]),
                Route("/{model}", self._submit, methods=["POST"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ],
            lifespan=self._lifespan,
        )

    # -- the API --------------------------------------------------------------------------------

    async def _gate(self, request: Request) -> Response | None:
        self.requests.append(await record(request))
        if not secrets.compare_digest(request.headers.get("x-key", ""), self.key):
            return JSONResponse({"detail": "Not authenticated - Invalid key"}, status_code=403)
        return self.faults.next_response()

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    async def _submit(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        model = request.path_params["model"]
        if model not in MODELS:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"detail": "Invalid JSON"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            missing = {"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}
            return JSONResponse({"detail": [missing]}, status_code=422)
        for side in ("width", "height"):
            if isinstance(body.get(side), int) and not 256 <= body[side] <= 1440:
                problem = {"loc": ["body", side], "msg": "must be 256..1440", "type": "value_error"}
                return JSONResponse({"detail": [problem]}, status_code=422)
        task = BflTask(
            id=str(uuid.uuid4()),
            model=model,
            body=body,
            webhook_url=body.get("webhook_url"),
            webhook_secret=body.get("webhook_secret"),
        )
        self.tasks[task.id] = task
        if self.on_submit is not None:
            await self.on_submit(task)
        if self.omit_polling_url:
            return JSONResponse(
                {"id": task.id, "status": "Pending", "webhook_url": task.webhook_url}
            )
        prefix = "/us1" if self.regional_polling else ""
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {"id": task.id, "polling_url": f"{base}{prefix}/get_result?id={task.id}"}
        )

    async def _get_result(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        task_id = request.query_params.get("id", "")
        task = self.tasks.get(task_id)
        if task is None:
            return JSONResponse({"id": task_id, "status": "Task not found", "result": None})
        return JSONResponse(task.answer())

    # -- controls for tests ---------------------------------------------------------------------

    def polls(self, task_id: str | None = None) -> list[RecordedRequest]:
        """The get_result requests received (for ``task_id`` only, when given)."""
        polls = [r for r in self.requests if r.path.endswith("/get_result")]
        return [r for r in polls if task_id is None or r.query.get("id") == task_id]

    def set_progress(self, task_id: str, progress: float) -> None:
        self.tasks[task_id].progress = progress

    async def complete(self, task_id: str, sample: str) -> None:
        task = self.tasks[task_id]
        task.status, task.progress = "Ready", 1.0
        task.result = {"sample": sample, "prompt": task.body.get("prompt"), "seed": 7}
        await self.deliver(task_id)

    async def moderate(
        self, task_id: str, status: str = "Content Moderated", reasons: tuple[str, ...] = ()
    ) -> None:
        task = self.tasks[task_id]
        task.status = status
        task.details = {"Moderation Reasons": list(reasons)} if reasons else None
        await self.deliver(task_id)

    async def error(self, task_id: str, message: str = "internal error") -> None:
        task = self.tasks[task_id]
        task.status, task.details = "Error", {"error": message}
        await self.deliver(task_id)

    async def deliver(self, task_id: str) -> int | None:
        """(Re)send the trigger webhook for the task as it stands."""
        task = self.tasks[task_id]
        if task.webhook_url is None:
            return None
        assert self._http is not None, "serve the fake before sending webhooks"
        sample = (task.result or {}).get("sample")
        body = {"id": task.id, "status": task.status, "result": {"sample": sample}}
        status = await self.send(task.webhook_url, body, task.webhook_secret)
        self.deliveries.append(Delivered(task_id, status))
        return status

    async def send(
        self, url: str, body: dict[str, Any], webhook_secret: str | None = None
    ) -> int | None:
        """POST one webhook ``body`` to ``url`` (signed as reported when a secret is given);
        the receiver's status, None if it could not be reached. Tests use it directly for
        bodies the fake would not send (another task's id, a made-up status)."""
        assert self._http is not None, "serve the fake before sending webhooks"
        raw = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if webhook_secret:
            mac = hmac.new(webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
            headers["X-BFL-Signature"] = f"sha256={mac}"
        try:
            response = await self._http.post(url, content=raw, headers=headers)
        except httpx.HTTPError:
            return None
        return response.status_code
