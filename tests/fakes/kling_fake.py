"""A fake of Kling AI's image generation API (shared/PROVIDERS.md, "Kling AI image generation").

Routes (relative to the served base URL, which plays ``https://api-singapore.klingai.com``):
``POST /v1/images/generations`` and ``GET /v1/images/generations/{id}`` (``id`` a task id or an
``external_task_id``, both in the path as the official text has it). Both need
``Authorization: Bearer <JWT>``, checked as Kling does: HS256 with the secret key of the access key
named in ``iss``, header ``typ: JWT``, ``nbf``/``exp`` against the fake's own ``clock``; a missing,
invalid, not-yet-valid or expired token answers 401 with code 1001, 1002/1000, 1003 or 1004. Every
answer is the ``{code, message, request_id, data}`` envelope. Results are small real PNGs served by
the fake itself at ``/results/{task_id}/{index}.png`` (no auth, like Kling's CDN); after
``expire_results()`` they answer 404. Any other path is recorded and answered 404 (code 1202).

Choices where Kling's documentation is silent (the adapter relies on none of them beyond what its
docstring says): a reused ``external_task_id`` is refused with HTTP 400, code 1201,
"external_task_id already exists"; an unknown task id is HTTP 404, code 1203; with ``concurrency``
set, a submit whose ``n`` would take the images in flight over it is HTTP 429, code 1303 (the
documented answer); a ``data:`` prefix on ``image``, or a ``negative_prompt`` with an ``image``, is
400/1201.

Callbacks are unsigned JSON POSTs of the task object to ``callback_url``, sent by the control
methods (``start``, ``complete``, ``fail``, ``moderate``) and ``deliver``; each may be ``lost``
(not sent), ``duplicated`` (sent twice) and bare or ``enveloped``.
"""

from __future__ import annotations

import io
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx
import jwt
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ANY_METHOD, FaultPlan, HttpClientLifespan, RecordedRequest, record

MODELS = frozenset({"kling-v1", "kling-v1-5", "kling-v2", "kling-v2-new", "kling-v2-1"})
FINAL = frozenset({"succeed", "failed"})
RISK_CONTROL_MSG = "Failure to pass the risk control system"


@lru_cache(maxsize=16)
def png_bytes(index: int) -> bytes:
    """A small real PNG, its colour varying with ``index``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (40 + 20 * index, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def kling_error(status: int, code: int, message: str) -> JSONResponse:
    body = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
    return JSONResponse(body, status_code=status)


def envelope(data: Any) -> JSONResponse:
    return JSONResponse(
        {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}
    )


@dataclass
class KlingTask:
    task_id: str
    body: dict[str, Any]
    base_url: str
    created_at: int
    updated_at: int
    task_status: str = "submitted"
    task_status_msg: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)
    queries: int = 0

    @property
    def n(self) -> int:
        n = self.body.get("n", 1)
        return n if isinstance(n, int) else 1

    @property
    def callback_url(self) -> str | None:
        url = self.body.get("callback_url")
        return url if isinstance(url, str) and url else None

    def data(self) -> dict[str, Any]:
        """The task object of a query answer and of a callback."""
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "task_status": self.task_status,
            "task_status_msg": self.task_status_msg,
            "task_info": {"external_task_id": self.body.get("external_task_id") or ""},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "task_result": {"images": list(self.images)},
        }
        if self.task_status == "succeed":
            data["final_unit_deduction"] = str(self.n)
        return data


@dataclass(frozen=True)
class Delivered:
    task_id: str
    status: int | None  # None: the receiver could not be reached
    enveloped: bool


class KlingFake(HttpClientLifespan):
    """Tasks in memory, controls for tests, unsigned callbacks to the given ``callback_url``."""

    def __init__(
        self,
        *,
        access_key: str = "kling-fake-access-key",
        secret_key: str = "kling-fake-secret-key-0123456789abcdef",
        clock: Callable[[], float] = time.time,
        concurrency: int | None = None,
        auto_complete_after: int | None = None,
        envelope_callbacks: bool = False,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.clock = clock
        self.concurrency = concurrency
        self.auto_complete_after = auto_complete_after
        self.envelope_callbacks = envelope_callbacks
        self.tasks: dict[str, KlingTask] = {}
        self.by_external: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        self.tokens: list[str] = []  # every token that passed authentication, in order
        self.deliveries: list[Delivered] = []
        self.image_hits = 0
        self.results_expired = False
        self.faults = FaultPlan()
        self._http: httpx.AsyncClient | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self._submit, methods=["POST"]),
                Route("/v1/images/generations/{id}", self._query, methods=["GET"]),
                Route("/results/{task_id}/{index:int}.png", self._image, methods=["GET"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ],
            lifespan=self._lifespan,
        )

    # -- the API --------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _authenticate(self, request: Request) -> Response | None:
        """Kling's JWT check: the error answer, or None when the token is good."""
        header = request.headers.get("authorization", "")
        if not header:
            return kling_error(401, 1001, "Authorization is empty")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            return kling_error(401, 1002, "Authorization is invalid")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            head = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return kling_error(401, 1002, "Authorization is invalid")
        if unverified.get("iss") != self.access_key:
            return kling_error(401, 1000, "Authentication failed")
        try:
            claims = jwt.decode(
                token,
                self.secret_key,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_nbf": False, "require": ["exp", "nbf"]},
            )
        except jwt.InvalidTokenError:
            return kling_error(401, 1002, "Authorization is invalid")
        if head.get("typ") != "JWT" or head.get("alg") != "HS256":
            return kling_error(401, 1002, "Authorization is invalid")
        now = self.clock()
        if now < claims["nbf"]:
            return kling_error(401, 1003, "Authorization is not yet valid")
        if now >= claims["exp"]:
            return kling_error(401, 1004, "Authorization has expired")
        self.tokens.append(token)
        return None

    async def _gate(self, request: Request) -> Response | None:
        """Record the request; answer an auth error or a planned fault."""
        self.requests.append(await record(request))
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        return self.faults.next_response()

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return kling_error(404, 1202, "The requested method is invalid")

    def _refusal(self, body: Any) -> Response | None:
        """Kling's 400 for a body it would not take."""
        if not isinstance(body, dict):
            return kling_error(400, 1200, "Invalid request parameters")
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return kling_error(400, 1201, "prompt is required")
        if body.get("model_name", "kling-v1") not in MODELS:
            return kling_error(400, 1201, "model_name is invalid")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 9:
            return kling_error(400, 1201, "n must be in [1, 9]")
        image = body.get("image")
        if image is not None:
            if not isinstance(image, str) or image.startswith("data:"):
                return kling_error(400, 1201, "image must be a URL or Base64 without a prefix")
            if body.get("negative_prompt"):
                return kling_error(400, 1201, "negative_prompt is not supported with image")
        external = body.get("external_task_id")
        if external is not None and not isinstance(external, str):
            return kling_error(400, 1201, "external_task_id must be a string")
        if external and external in self.by_external:
            return kling_error(400, 1201, "external_task_id already exists")
        if self.concurrency is not None:
            in_flight = sum(t.n for t in self.tasks.values() if t.task_status not in FINAL)
            if in_flight + n > self.concurrency:
                return kling_error(429, 1303, "parallel task over resource pack limit")
        return None

    async def _submit(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        try:
            body = json.loads(await request.body())
        except ValueError:
            return kling_error(400, 1200, "Invalid request parameters")
        if (refused := self._refusal(body)) is not None:
            return refused
        now = self._now_ms()
        task_id = str(10**17 + secrets.randbelow(9 * 10**17))
        base = str(request.base_url).rstrip("/")
        task = KlingTask(task_id, body, base, created_at=now, updated_at=now)
        self.tasks[task_id] = task
        if body.get("external_task_id"):
            self.by_external[body["external_task_id"]] = task_id
        data = task.data()
        del data["task_result"], data["task_status_msg"]
        return envelope(data)

    def task(self, task_or_external_id: str) -> KlingTask | None:
        """A task by its task id or its ``external_task_id``."""
        task = self.tasks.get(task_or_external_id)
        if task is None and task_or_external_id in self.by_external:
            task = self.tasks[self.by_external[task_or_external_id]]
        return task

    async def _query(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        task = self.task(request.path_params["id"])
        if task is None:
            return kling_error(404, 1203, "task not found")
        task.queries += 1
        if (
            self.auto_complete_after is not None
            and task.queries >= self.auto_complete_after
            and task.task_status not in FINAL
        ):
            self._succeed(task)  # on its own, as polled: no callback
        return envelope(task.data())

    async def _image(self, request: Request) -> Response:
        """A result image (no auth); 404 once results have expired (Kling keeps them 30 days)."""
        task = self.tasks.get(request.path_params["task_id"])
        index = request.path_params["index"]
        if self.results_expired or task is None or not 0 <= index < len(task.images):
            return Response(b"Not Found", status_code=404)
        self.image_hits += 1
        return Response(png_bytes(index), media_type="image/png")

    # -- controls for tests ---------------------------------------------------------------------

    def queries(self, task_or_external_id: str | None = None) -> list[RecordedRequest]:
        """The query requests received (for one id only, when given)."""
        prefix = "/v1/images/generations/"
        found = [r for r in self.requests if r.method == "GET" and r.path.startswith(prefix)]
        if task_or_external_id is None:
            return found
        return [r for r in found if r.path == prefix + task_or_external_id]

    def submits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST"]

    def _touch(self, task: KlingTask, status: str, message: str = "") -> None:
        task.task_status, task.task_status_msg = status, message
        task.updated_at = max(task.updated_at + 1, self._now_ms())

    def _succeed(self, task: KlingTask) -> None:
        task.images = [
            {"index": i, "url": f"{task.base_url}/results/{task.task_id}/{i}.png"}
            for i in range(task.n)
        ]
        self._touch(task, "succeed")

    async def start(self, task_id: str, **send: Any) -> None:
        """``submitted`` → ``processing``, with its callback."""
        self._touch(self.tasks[task_id], "processing")
        await self.deliver(task_id, **send)

    async def complete(self, task_id: str, **send: Any) -> None:
        """Succeed with ``n`` images served by the fake, with its callback."""
        self._succeed(self.tasks[task_id])
        await self.deliver(task_id, **send)

    async def fail(self, task_id: str, message: str = "internal error", **send: Any) -> None:
        self._touch(self.tasks[task_id], "failed", message)
        await self.deliver(task_id, **send)

    async def moderate(self, task_id: str, **send: Any) -> None:
        """Failed by Kling's content risk control, with its callback."""
        await self.fail(task_id, RISK_CONTROL_MSG, **send)

    def expire_results(self) -> None:
        """Result images answer 404 from now on."""
        self.results_expired = True

    async def deliver(
        self,
        task_id: str,
        *,
        lost: bool = False,
        duplicated: bool = False,
        enveloped: bool | None = None,
    ) -> list[int | None]:
        """(Re)send the callback for the task as it stands: not at all when ``lost``, twice when
        ``duplicated``; the receiver's statuses."""
        task = self.tasks[task_id]
        if lost or task.callback_url is None:
            return []
        wrap = self.envelope_callbacks if enveloped is None else enveloped
        body: dict[str, Any] = task.data()
        if wrap:
            body = {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": body}
        statuses = []
        for _ in range(2 if duplicated else 1):
            status = await self.send(task.callback_url, body)
            self.deliveries.append(Delivered(task_id, status, wrap))
            statuses.append(status)
        return statuses

    async def send(self, url: str, body: dict[str, Any]) -> int | None:
        """POST one unsigned callback ``body`` to ``url``; the receiver's status, None if it
        could not be reached. Tests use it directly for bodies the fake would not send."""
        assert self._http is not None, "serve the fake before sending callbacks"
        raw = json.dumps(body).encode()
        try:
            response = await self._http.post(
                url, content=raw, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError:
            return None
        return response.status_code
