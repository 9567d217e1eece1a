"""A fake of DashScope's Wan image synthesis API (shared/PROVIDERS.md, "Alibaba DashScope").

Routes (relative to the served base URL, which plays ``https://dashscope.aliyuncs.com/api/v1``):

    POST /services/aigc/text2image/image-synthesis    text-to-image models only
    POST /services/aigc/image2image/image-synthesis   edit models only (imageedit, wan2.5-i2i*)
    GET  /tasks/{task_id}
    POST /tasks/{task_id}/cancel
    GET  /results/{task_id}/{index}.png               the result images (no auth, like OSS URLs)

Every API route needs ``Authorization: Bearer <key>`` (else 401 ``InvalidApiKey``); the submit
routes also ``X-DashScope-Async: enable`` (else 403 ``AccessDenied``, "current user api does not
support synchronous calls") and ``Content-Type: application/json``. Errors are DashScope's
``{"request_id", "code", "message"}``. Any other path is recorded and answered 404.

Tasks queue as DashScope's do: at most ``concurrency`` (default 2) per model run at once
(``RUNNING``); the others wait ``PENDING`` and start in order as running tasks end. A cancel is
accepted only while ``PENDING``. A task id the fake does not know (or one ``forget`` dropped) is
answered as DashScope answers an unknown or expired one: 200 with ``task_status: UNKNOWN``.
Result images answer 403 (OSS's "Request has expired") after ``result_ttl_s`` (24 h on ``clock``)
or once ``expire_results()`` is called.

Choices where DashScope's documentation is silent: a refused cancel answers 400
``UnsupportedOperation`` ("Failed to cancel the task, please confirm if the task is in PENDING
status."); a model on the other route's path answers 400 ``InvalidParameter`` ("url error, please
check url!"); a prompt containing one of ``banned_words`` is refused at submit with 400
``DataInspectionFailed``.
"""

from __future__ import annotations

import io
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ANY_METHOD, FaultPlan, RecordedRequest, record

TEXT2IMAGE = "/services/aigc/text2image/image-synthesis"
IMAGE2IMAGE = "/services/aigc/image2image/image-synthesis"
MODELS = frozenset(
    {
        "wanx-v1",
        "wanx2.0-t2i-turbo",
        "wanx2.1-t2i-turbo",
        "wanx2.1-t2i-plus",
        "wan2.2-t2i-flash",
        "wan2.2-t2i-plus",
        "wan2.5-t2i-preview",
        "wanx2.1-imageedit",
        "wan2.5-i2i-preview",
    }
)
EDIT_FUNCTIONS = frozenset(
    {
        "stylization_all",
        "stylization_local",
        "description_edit",
        "description_edit_with_mask",
        "remove_watermark",
        "expand",
        "super_resolution",
        "colorization",
        "doodle",
        "control_cartoon_feature",
    }
)
CANCEL_REFUSED = "Failed to cancel the task, please confirm if the task is in PENDING status."


@lru_cache(maxsize=16)
def png_bytes(index: int) -> bytes:
    """A small real PNG, its colour varying with ``index``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 120 + 20 * index, 200)).save(out, format="PNG")
    return out.getvalue()


def is_edit(model: str) -> bool:
    return "imageedit" in model or model.startswith("wan2.5-i2i")


def dashscope_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"request_id": str(uuid.uuid4()), "code": code, "message": message}, status_code=status
    )


def _stamp(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@dataclass
class DashScopeTask:
    task_id: str
    model: str
    body: dict[str, Any]
    base_url: str
    submitted_at: float
    status: str = "PENDING"
    started_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    code: str | None = None
    message: str | None = None
    polls: int = 0

    @property
    def n(self) -> int:
        parameters = self.body.get("parameters")
        n = parameters.get("n", 1) if isinstance(parameters, dict) else 1
        return n if isinstance(n, int) else 1

    def answer(self) -> dict[str, Any]:
        output: dict[str, Any] = {
            "task_id": self.task_id,
            "task_status": self.status,
            "submit_time": _stamp(self.submitted_at),
            "scheduled_time": _stamp(self.started_at),
            "end_time": _stamp(self.ended_at),
        }
        if self.status == "SUCCEEDED":
            made = sum(1 for r in self.results if "url" in r)
            output["results"] = self.results
            output["task_metrics"] = {
                "TOTAL": len(self.results),
                "SUCCEEDED": made,
                "FAILED": len(self.results) - made,
            }
        if self.status == "FAILED":
            output["code"], output["message"] = self.code, self.message
        answer: dict[str, Any] = {"request_id": str(uuid.uuid4()), "output": output}
        if self.status == "SUCCEEDED":
            answer["usage"] = {"image_count": output["task_metrics"]["SUCCEEDED"]}
        return answer


class DashScopeFake:
    """Tasks in memory, the key checked, controls for tests (no callbacks: poll only)."""

    def __init__(
        self,
        *,
        key: str = "sk-fake-dashscope-0123456789",
        clock: Callable[[], float] = time.time,
        concurrency: int = 2,
        result_ttl_s: float = 86_400.0,
        auto_complete_after: int | None = None,
        banned_words: frozenset[str] = frozenset({"forbidden"}),
    ) -> None:
        self.key = key
        self.clock = clock
        self.concurrency = concurrency
        self.result_ttl_s = result_ttl_s
        self.auto_complete_after = auto_complete_after
        self.banned_words = banned_words
        self.tasks: dict[str, DashScopeTask] = {}
        self.requests: list[RecordedRequest] = []
        self.faults = FaultPlan()
        self.planned: deque[tuple[int, str, str]] = deque()
        self.results_expired = False
        self.image_hits = 0
        self.app = Starlette(
            routes=[
                Route(TEXT2IMAGE, self._text2image, methods=["POST"]),
                Route(IMAGE2IMAGE, self._image2image, methods=["POST"]),
                Route("/tasks/{task_id}", self._query, methods=["GET"]),
                Route("/tasks/{task_id}/cancel", self._cancel, methods=["POST"]),
                Route("/results/{task_id}/{index:int}.png", self._image, methods=["GET"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ]
        )

    # -- the API --------------------------------------------------------------------------------

    async def _gate(self, request: Request) -> tuple[RecordedRequest, Response | None]:
        """Record the call; the answer for a fault, a planned error or a wrong key, if any."""
        got = await record(request)
        self.requests.append(got)
        if (fault := self.faults.next_response()) is not None:
            return got, fault
        auth = got.headers.get("authorization", "")
        if not secrets.compare_digest(auth.encode(), f"Bearer {self.key}".encode()):
            return got, dashscope_error(401, "InvalidApiKey", "Invalid API-key provided.")
        if self.planned:
            return got, dashscope_error(*self.planned.popleft())
        return got, None

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return Response(b"Not Found", status_code=404)

    async def _text2image(self, request: Request) -> Response:
        return await self._submit(request, edit_route=False)

    async def _image2image(self, request: Request) -> Response:
        return await self._submit(request, edit_route=True)

    async def _submit(self, request: Request, *, edit_route: bool) -> Response:
        got, early = await self._gate(request)
        if early is not None:
            return early
        if got.headers.get("x-dashscope-async") != "enable":
            return dashscope_error(
                403, "AccessDenied", "current user api does not support synchronous calls"
            )
        try:
            body = json.loads(got.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or got.headers.get("content-type") != "application/json":
            return dashscope_error(400, "InvalidParameter", "The request body is not JSON")
        if (refused := self._submit_refusal(body, edit_route)) is not None:
            return refused
        task = DashScopeTask(
            task_id=str(uuid.uuid4()),
            model=body["model"],
            body=body,
            base_url=str(request.base_url).rstrip("/"),
            submitted_at=self.clock(),
        )
        self.tasks[task.task_id] = task
        self._schedule()
        return JSONResponse(
            {
                "request_id": str(uuid.uuid4()),
                "output": {"task_id": task.task_id, "task_status": "PENDING"},
            }
        )

    def _submit_refusal(self, body: dict[str, Any], edit_route: bool) -> Response | None:
        model, body_input = body.get("model"), body.get("input")
        if not isinstance(model, str) or model not in MODELS:
            return dashscope_error(400, "InvalidParameter", "Model not exist.")
        if is_edit(model) != edit_route:
            return dashscope_error(400, "InvalidParameter", "url error, please check url!")
        if not isinstance(body_input, dict):
            return dashscope_error(400, "InvalidParameter", "Field required: input")
        prompt = body_input.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return dashscope_error(400, "InvalidParameter", "Field required: input.prompt")
        if any(word in prompt for word in self.banned_words):
            return dashscope_error(
                400, "DataInspectionFailed", "Input data may contain inappropriate content."
            )
        parameters = body.get("parameters", {})
        n = parameters.get("n", 1) if isinstance(parameters, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            return dashscope_error(400, "InvalidParameter", "n must be between 1 and 4")
        if "imageedit" in model:
            if body_input.get("function") not in EDIT_FUNCTIONS:
                return dashscope_error(400, "InvalidParameter", "input.function is invalid")
            if not isinstance(body_input.get("base_image_url"), str):
                return dashscope_error(400, "InvalidParameter", "input.base_image_url is required")
        if model.startswith("wan2.5-i2i"):
            images = body_input.get("images")
            if not isinstance(images, list) or not 1 <= len(images) <= 3:
                return dashscope_error(400, "InvalidParameter", "input.images needs 1 to 3 images")
        return None

    async def _query(self, request: Request) -> Response:
        _, early = await self._gate(request)
        if early is not None:
            return early
        task_id = request.path_params["task_id"]
        task = self.tasks.get(task_id)
        if task is None:
            return JSONResponse(
                {
                    "request_id": str(uuid.uuid4()),
                    "output": {"task_id": task_id, "task_status": "UNKNOWN"},
                }
            )
        task.polls += 1
        if (
            self.auto_complete_after is not None
            and task.polls >= self.auto_complete_after
            and task.status in ("PENDING", "RUNNING")
        ):
            self.complete(task_id)
        return JSONResponse(task.answer())

    async def _cancel(self, request: Request) -> Response:
        _, early = await self._gate(request)
        if early is not None:
            return early
        task = self.tasks.get(request.path_params["task_id"])
        if task is None or task.status != "PENDING":
            return dashscope_error(400, "UnsupportedOperation", CANCEL_REFUSED)
        task.status, task.ended_at = "CANCELED", self.clock()
        return JSONResponse({"request_id": str(uuid.uuid4())})

    def _schedule(self) -> None:
        """Start waiting tasks, oldest first, while fewer than ``concurrency`` of their model
        run."""
        for task in self.tasks.values():
            if task.status != "PENDING":
                continue
            running = sum(
                1 for t in self.tasks.values() if t.model == task.model and t.status == "RUNNING"
            )
            if running < self.concurrency:
                task.status, task.started_at = "RUNNING", self.clock()

    def _finish(self, task: DashScopeTask, status: str) -> None:
        task.status, task.ended_at = status, self.clock()
        if task.started_at is None:
            task.started_at = task.ended_at
        self._schedule()

    async def _image(self, request: Request) -> Response:
        """A result image; 403 once expired (result URLs live 24 hours)."""
        task = self.tasks.get(request.path_params["task_id"])
        index = request.path_params["index"]
        if task is None or task.ended_at is None or not 0 <= index < len(task.results):
            return Response(b"Not Found", status_code=404)
        if "url" not in task.results[index]:
            return Response(b"Not Found", status_code=404)
        if self.results_expired or self.clock() - task.ended_at > self.result_ttl_s:
            return Response(b"Request has expired", status_code=403)
        self.image_hits += 1
        return Response(png_bytes(index), media_type="image/png")

    # -- controls for tests ---------------------------------------------------------------------

    def submits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path in (TEXT2IMAGE, IMAGE2IMAGE)]

    def fail_next(self, status: int, code: str, message: str = "planned error") -> None:
        """The next authenticated API call answers ``status`` with DashScope's ``code``."""
        self.planned.append((status, code, message))

    def start(self, task_id: str) -> None:
        """``RUNNING`` now, whatever the queue (a task past ``PENDING`` cannot be cancelled)."""
        task = self.tasks[task_id]
        task.status, task.started_at = "RUNNING", self.clock()

    def suspend(self, task_id: str) -> None:
        self.tasks[task_id].status = "SUSPENDED"

    def complete(
        self,
        task_id: str,
        *,
        failed_images: int = 0,
        code: str = "InternalError.Timeout",
        message: str = "An internal timeout error has occured during execution.",
    ) -> None:
        """``SUCCEEDED`` with ``n - failed_images`` images served by the fake; the others are
        failed ``results`` entries carrying ``code``/``message`` (DashScope's partial failure)."""
        task = self.tasks[task_id]
        prompt = task.body.get("input", {}).get("prompt", "")
        made = task.n - failed_images
        task.results = [
            {
                "url": f"{task.base_url}/results/{task_id}/{i}.png",
                "orig_prompt": prompt,
                "actual_prompt": prompt,
            }
            for i in range(made)
        ] + [{"code": code, "message": message}] * failed_images
        self._finish(task, "SUCCEEDED")

    def fail(
        self,
        task_id: str,
        code: str = "InternalError",
        message: str = "An internal error has occured.",
    ) -> None:
        task = self.tasks[task_id]
        task.code, task.message = code, message
        self._finish(task, "FAILED")

    def moderate(self, task_id: str) -> None:
        """Failed by moderation after submit (``output.code: DataInspectionFailed``)."""
        self.fail(task_id, "DataInspectionFailed", "Output data may contain inappropriate content.")

    def forget(self, task_id: str) -> None:
        """The task id expires: queries answer ``UNKNOWN`` from now on."""
        del self.tasks[task_id]
        self._schedule()

    def expire_results(self) -> None:
        """Result images answer 403 from now on."""
        self.results_expired = True
