"""A fake of OpenAI's Responses API in background mode with the ``image_generation`` tool, and of
a project webhook (shared/PROVIDERS.md, "OpenAI"; shapes from the openai-python SDK types).

Routes (relative to the served base URL, which plays ``https://api.openai.com/v1``):
``POST /responses``, ``GET /responses/{id}``, ``POST /responses/{id}/cancel``. Each needs
``Authorization: Bearer <key>``: none answers 401 (code null), a wrong one 401
``invalid_api_key``; errors are ``{"error": {"message", "type", "param", "code"}}``. Any other
path is recorded and answered 404 ("Invalid URL").

The create body is checked as OpenAI does where PROVIDERS.md or the SDK types say so: an unknown
parameter (top level or in the tool) is 400 ``unknown_parameter``; a tool value outside its
choices (``size``, ``quality``, ``output_format``, ``background``, ``moderation``, ``action``) or
an unknown image model is 400 ``invalid_value``; an unknown responses model is 400
``model_not_found``; metadata over 16 pairs, a key over 64 or a value over 512 characters is 400;
a prompt containing one of ``blocked_words`` is 400 ``moderation_blocked`` (OpenAI's refusal at
the door). The answer is the response object, ``queued``, its ``tools`` echoed with the defaults
filled in (``output_format`` png …). Deviations: only background responses are modelled (a create
without ``background: true`` is 400), and usage and reasoning fields are left out.

The image is no URL: a completed response carries an ``image_generation_call`` whose ``result``
is the base64 of a small real image (Pillow, in the tool's ``output_format``), followed by an
assistant message. ``forget(id)`` makes the response answer 404, as after the retention window.
With ``auto_complete_after=n`` a response completes (without a webhook) when it is fetched the
n-th time, for end-to-end tests that let jobs finish on their own.

The project webhook: the fake is constructed with (or later given) ``webhook_url`` and a
``whsec_`` ``webhook_secret`` (generated when not given; ``extra_secrets`` sign too, as during a
rotation). Each control method that ends a response sends the thin event ``{"id": "evt_…",
"object": "event", "created_at", "type": "response.<status>", "data": {"id": "resp_…"}}`` signed
with Standard Webhooks; ``lost=True`` sends nothing, ``duplicated=True`` sends it twice. A
redelivery (``deliver``) keeps the event's ``webhook-id`` and event id, as OpenAI's retries do.
A cancel through the API sends ``response.cancelled`` before it is answered.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbacks import standard_webhooks
from tests.fakes import ANY_METHOD, FaultPlan, HttpClientLifespan, RecordedRequest, record

RESPONSES_MODELS = frozenset(
    {"gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini", "gpt-5", "o3"}
)
IMAGE_MODELS = frozenset({"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"})
CREATE_PARAMS = frozenset(
    {
        "background",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt_cache_key",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_p",
        "truncation",
        "user",
    }
)
TOOL_CHOICES: dict[str, frozenset[str]] = {
    "size": frozenset({"1024x1024", "1024x1536", "1536x1024", "auto"}),
    "quality": frozenset({"low", "medium", "high", "auto"}),
    "output_format": frozenset({"png", "webp", "jpeg"}),
    "background": frozenset({"transparent", "opaque", "auto"}),
    "moderation": frozenset({"auto", "low"}),
    "action": frozenset({"generate", "edit", "auto"}),
    "input_fidelity": frozenset({"high", "low"}),
}
TOOL_KEYS = frozenset(
    {"type", "model", "output_compression", "partial_images", "input_image_mask", *TOOL_CHOICES}
)
TOOL_DEFAULTS = {
    "background": "auto",
    "model": "gpt-image-1",
    "moderation": "auto",
    "output_compression": 100,
    "output_format": "png",
    "quality": "auto",
    "size": "auto",
}
TERMINAL = frozenset({"completed", "failed", "cancelled", "incomplete"})
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"


def openai_error(
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body (also for ``faults.add(..., body=openai_error(...))``)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(openai_error(message, **kw), status_code=status)


@lru_cache(maxsize=8)
def image_bytes(output_format: str = "png") -> bytes:
    """A small real image in ``output_format`` (png, jpeg, webp)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 90, 40)).save(out, format=PIL_FORMATS[output_format])
    return out.getvalue()


def _hex_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


@dataclass
class FakeResponse:
    id: str
    body: dict[str, Any]
    tool: dict[str, Any]
    created_at: int
    status: str = "queued"
    output: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    completed_at: int | None = None
    fetches: int = 0
    events: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (msg id, evt id)

    @property
    def prompt(self) -> str:
        parts = self.body["input"]
        if isinstance(parts, str):
            return parts
        texts = []
        for message in parts:
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
                continue
            texts += [p.get("text", "") for p in content if p.get("type") == "input_text"]
        return " ".join(texts)

    def answer(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "status": self.status,
            "background": True,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "instructions": None,
            "metadata": self.body.get("metadata") or {},
            "model": self.body["model"],
            "output": self.output,
            "parallel_tool_calls": True,
            "store": self.body.get("store", True),
            "tool_choice": self.body.get("tool_choice", "auto"),
            "tools": [self.tool],
        }


@dataclass(frozen=True)
class Delivered:
    response_id: str
    event_type: str
    msg_id: str
    status: int | None  # None: the receiver could not be reached


class OpenAiFake(HttpClientLifespan):
    """Background responses in memory, controls for tests, a signed project webhook."""

    def __init__(
        self,
        *,
        api_key: str = "sk-fake-openai-key",
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        blocked_words: Sequence[str] = (),
        auto_complete_after: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_key = api_key
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret or standard_webhooks.generate_secret()
        self.extra_secrets: list[str] = []
        self.blocked_words = tuple(w.lower() for w in blocked_words)
        self.auto_complete_after = auto_complete_after
        self.clock = clock
        self.responses: dict[str, FakeResponse] = {}
        self.forgotten: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self.deliveries: list[Delivered] = []
        self.faults = FaultPlan()
        self._http: httpx.AsyncClient | None = None
        self.app = Starlette(
            routes=[
                Route("/responses", self._create, methods=["POST"]),
                Route("/responses/{id}", self._get, methods=["GET"]),
                Route("/responses/{id}/cancel", self._cancel, methods=["POST"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ],
            lifespan=self._lifespan,
        )

    # -- the API --------------------------------------------------------------------------------

    async def _gate(self, request: Request) -> Response | None:
        """Record the request; answer 401 without the right key, or a planned fault."""
        self.requests.append(await record(request))
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not key:
            return _error(401, "You didn't provide an API key.")
        if not secrets.compare_digest(key, self.api_key):
            shown = key[:3] + "*" * 4 + key[-4:]
            return _error(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return self.faults.next_response()

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return _error(404, f"Invalid URL ({request.method} /v1{request.url.path})")

    def _known(self, request: Request) -> FakeResponse | Response:
        response_id = request.path_params["id"]
        found = self.responses.get(response_id)
        if found is None or response_id in self.forgotten:
            return _error(404, f"Response with id '{response_id}' not found.", param="response_id")
        return found

    async def _create(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        refusal = self._refusal(body)
        if refusal is not None:
            return refusal
        [tool] = body["tools"]
        response = FakeResponse(
            id=_hex_id("resp_"),
            body=body,
            tool={**TOOL_DEFAULTS, **tool},
            created_at=int(self.clock()),
        )
        if any(word in response.prompt.lower() for word in self.blocked_words):
            return _error(
                400,
                "Your request was rejected by the safety system. If you believe this is an "
                "error, contact us at help.openai.com and include the request ID.",
                type="image_generation_user_error",
                code="moderation_blocked",
            )
        self.responses[response.id] = response
        return JSONResponse(response.answer())

    def _refusal(self, body: dict[str, Any]) -> Response | None:
        """The 400 OpenAI answers a create body with (module docstring), if any."""
        for key in body:
            if key not in CREATE_PARAMS:
                return _error(
                    400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter"
                )
        model = body.get("model")
        if model not in RESPONSES_MODELS:
            return _error(
                400, f"The requested model '{model}' does not exist.", code="model_not_found"
            )
        if body.get("background") is not True:
            return _error(400, "This fake models background responses only.", param="background")
        return self._input_refusal(body.get("input")) or self._tool_refusal(body)

    @staticmethod
    def _input_refusal(value: Any) -> Response | None:
        if isinstance(value, str) and value:
            return None
        if not isinstance(value, list) or not value:
            return _error(400, "Missing required parameter: 'input'.", param="input")
        for i, message in enumerate(value):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                return _error(400, "Invalid input message.", param=f"input[{i}]")
            for j, part in enumerate(content):
                where = f"input[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "input_text" and isinstance(part.get("text"), str):
                    continue
                url = part.get("image_url") if kind == "input_image" else None
                if (
                    isinstance(url, str)
                    and url.startswith(("https://", "http://", "data:image/"))
                    and part.get("detail", "auto") in ("low", "high", "auto", "original")
                ):
                    continue
                return _error(400, f"Invalid content part at {where}.", param=where)
        return None

    @staticmethod
    def _tool_refusal(body: dict[str, Any]) -> Response | None:
        tools = body.get("tools")
        if not isinstance(tools, list) or len(tools) != 1 or not isinstance(tools[0], dict):
            return _error(400, "This fake takes exactly one tool.", param="tools")
        tool = tools[0]
        if tool.get("type") != "image_generation":
            return _error(400, "This fake takes the image_generation tool.", param="tools[0].type")
        for key, value in tool.items():
            where = f"tools[0].{key}"
            if key not in TOOL_KEYS:
                return _error(
                    400, f"Unknown parameter: '{where}'.", param=where, code="unknown_parameter"
                )
            if key in TOOL_CHOICES and value not in TOOL_CHOICES[key]:
                return _error(400, f"Invalid value: '{value}'.", param=where, code="invalid_value")
        if tool.get("model", "gpt-image-1") not in IMAGE_MODELS:
            return _error(
                400,
                "Invalid value for the image model.",
                param="tools[0].model",
                code="invalid_value",
            )
        if body.get("tool_choice", {"type": "image_generation"}) != {"type": "image_generation"}:
            return _error(400, "This fake forces the image tool.", param="tool_choice")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            return _error(400, "metadata: at most 16 pairs.", param="metadata")
        for key, value in metadata.items():
            if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
                return _error(400, f"Invalid metadata pair {key!r}.", param="metadata")
        return None

    async def _get(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        found = self._known(request)
        if isinstance(found, Response):
            return found
        found.fetches += 1
        if (
            self.auto_complete_after is not None
            and found.status not in TERMINAL
            and found.fetches >= self.auto_complete_after
        ):
            self._succeed(found)
        return JSONResponse(found.answer())

    async def _cancel(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        found = self._known(request)
        if isinstance(found, Response):
            return found
        if found.status not in TERMINAL:  # a finished response is answered unchanged
            self._finish(found, "cancelled")
            await self.deliver(found.id)
        return JSONResponse(found.answer())

    # -- controls for tests ---------------------------------------------------------------------

    def creates(self) -> list[RecordedRequest]:
        """The create requests received."""
        return [r for r in self.requests if r.method == "POST" and r.path == "/responses"]

    def fetches(self, response_id: str | None = None) -> list[RecordedRequest]:
        """The ``GET /responses/{id}`` requests received (for ``response_id`` only, if given)."""
        gets = [r for r in self.requests if r.method == "GET" and r.path.startswith("/responses/")]
        return [r for r in gets if response_id is None or r.path == f"/responses/{response_id}"]

    def latest(self) -> FakeResponse:
        """The response created last."""
        return list(self.responses.values())[-1]

    def start(self, response_id: str) -> None:
        """``queued`` → ``in_progress``, the image call generating (OpenAI sends no event)."""
        response = self.responses[response_id]
        response.status = "in_progress"
        response.output = [self._image_call(response, status="generating", result=None)]

    def _image_call(
        self, response: FakeResponse, *, status: str = "completed", result: str | None = ""
    ) -> dict[str, Any]:
        fmt = response.tool["output_format"]
        if result == "":
            result = base64.b64encode(image_bytes(fmt)).decode("ascii")
        return {
            "id": _hex_id("ig_"),
            "type": "image_generation_call",
            "status": status,
            "result": result,
            "output_format": fmt,
            "quality": "medium" if response.tool["quality"] == "auto" else response.tool["quality"],
            "size": "1024x1024" if response.tool["size"] == "auto" else response.tool["size"],
            "background": "opaque",
            "revised_prompt": response.prompt,
        }

    @staticmethod
    def _message(part: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": _hex_id("msg_"),
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [part],
        }

    def _finish(self, response: FakeResponse, status: str) -> None:
        response.status = status
        response.completed_at = int(self.clock())

    def _succeed(self, response: FakeResponse) -> None:
        text = {"type": "output_text", "text": "Here is your image.", "annotations": []}
        response.output = [self._image_call(response), self._message(text)]
        self._finish(response, "completed")

    async def complete(
        self, response_id: str, *, lost: bool = False, duplicated: bool = False
    ) -> None:
        """Complete with an image and send ``response.completed``."""
        self._succeed(self.responses[response_id])
        await self._send_unless(response_id, lost, duplicated)

    async def answer_in_text(
        self,
        response_id: str,
        text: str = "Could you describe the scene in more detail?",
        **send: bool,
    ) -> None:
        """Complete without an image: the responses model only wrote text."""
        response = self.responses[response_id]
        response.output = [self._message({"type": "output_text", "text": text, "annotations": []})]
        self._finish(response, "completed")
        await self._send_unless(response_id, **send)

    async def refuse(
        self, response_id: str, text: str = "I'm sorry, but I can't help with that.", **send: bool
    ) -> None:
        """Complete with the model's refusal and no image."""
        response = self.responses[response_id]
        response.output = [self._message({"type": "refusal", "refusal": text})]
        self._finish(response, "completed")
        await self._send_unless(response_id, **send)

    async def fail(
        self,
        response_id: str,
        code: str = "server_error",
        message: str = "The server had an error while processing your request.",
        **send: bool,
    ) -> None:
        """End as ``failed`` with ``error.code`` and send ``response.failed``."""
        response = self.responses[response_id]
        response.error = {"code": code, "message": message}
        response.output = [self._image_call(response, status="failed", result=None)]
        self._finish(response, "failed")
        await self._send_unless(response_id, **send)

    async def moderate(self, response_id: str, **send: bool) -> None:
        """The image was refused by the safety system while it was made."""
        await self.fail(
            response_id,
            "image_content_policy_violation",
            "Your request was rejected as a result of our safety system.",
            **send,
        )

    async def incomplete(
        self,
        response_id: str,
        reason: str = "content_filter",
        *,
        with_image: bool = False,
        **send: bool,
    ) -> None:
        """End as ``incomplete`` (``content_filter`` or ``max_output_tokens``)."""
        response = self.responses[response_id]
        response.incomplete_details = {"reason": reason}
        response.output = [self._image_call(response)] if with_image else []
        self._finish(response, "incomplete")
        await self._send_unless(response_id, **send)

    def forget(self, response_id: str) -> None:
        """The retention window has passed: the response answers 404 from now on."""
        self.forgotten.add(response_id)

    async def _send_unless(
        self, response_id: str, lost: bool = False, duplicated: bool = False
    ) -> None:
        if lost:
            return
        await self.deliver(response_id)
        if duplicated:
            await self.deliver(response_id)

    async def deliver(self, response_id: str, event_type: str | None = None) -> int | None:
        """(Re)send the event for the response as it stands (or ``event_type``), its
        ``webhook-id`` and event id the same on every redelivery."""
        response = self.responses[response_id]
        kind = event_type or f"response.{response.status}"
        msg_id, event_id = response.events.setdefault(kind, (_hex_id("wh_"), _hex_id("evt_")))
        body = {
            "id": event_id,
            "object": "event",
            "created_at": response.completed_at or int(self.clock()),
            "type": kind,
            "data": {"id": response_id},
        }
        status = await self.send_event(body, msg_id=msg_id)
        self.deliveries.append(Delivered(response_id, kind, msg_id, status))
        return status

    def sign(self, body: bytes, msg_id: str, timestamp: int | None = None) -> dict[str, str]:
        """The Standard Webhooks headers the project webhook sends with ``body``."""
        when = int(self.clock()) if timestamp is None else timestamp
        keys: list[str | bytes] = [self.webhook_secret, *self.extra_secrets]
        return standard_webhooks.sign_headers(keys, msg_id, when, body)

    async def send_event(
        self,
        body: dict[str, Any] | bytes,
        *,
        msg_id: str | None = None,
        timestamp: int | None = None,
        url: str | None = None,
    ) -> int | None:
        """POST one signed event (tests use it directly for events the fake would not send:
        other types, hostile ids); the receiver's status, None if it could not be reached."""
        assert self._http is not None, "serve the fake before sending webhooks"
        target = url or self.webhook_url
        assert target is not None, "give the fake a webhook_url first"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = self.sign(raw, msg_id or _hex_id("wh_"), timestamp)
        headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
        try:
            answer = await self._http.post(target, content=raw, headers=headers)
        except httpx.HTTPError:
            return None
        return answer.status_code
