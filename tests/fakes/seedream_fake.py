"""A fake of Volcengine Ark's Seedream image generation (shared/PROVIDERS.md, "Volcengine Ark").

Routes (relative to the served base URL, which plays ``https://ark.cn-beijing.volces.com``, so the
adapter's base URL is ``<served>/api/v3``):

    POST /api/v3/images/generations    synchronous: the answer holds the images
    GET  /results/{image_id}.png       the result images (no auth, like pre-signed TOS URLs)

The API route needs ``Authorization: Bearer <key>`` (else 401 ``AuthenticationError``) and a JSON
body. Every answer carries an ``x-request-id`` header (Ark's form: ``02`` + milliseconds + hex);
errors are Ark's ``{"error": {"code", "message", "param", "type"}}``. Any other path is recorded
and answered 404.

Models: ``MODELS`` (another answers 404 ``InvalidEndpointOrModel.NotFound``). The text-to-image
3.0 model refuses an ``image``, SeedEdit needs exactly one; ``image`` is a URL or a
``data:image/<format>;base64,…`` URI, or a list of them. ``response_format`` ``url`` (default)
answers ``data[].url`` on the fake's own host, ``b64_json`` the bytes. With
``sequential_image_generation: "auto"`` the fake, playing the model, makes ``sequential_count``
images (at most ``max_images``); otherwise one. A prompt containing one of ``banned_words`` is
refused with 400 ``InputTextSensitiveContentDetected``.

Controls: ``fail_next`` (any Ark error, e.g. 429 ``RateLimitExceeded.EndpointRPMExceeded`` with a
Retry-After), ``moderate_next`` (input text, input image or output image moderation; the output
one also in-band as a ``data`` entry with ``error``), ``faults`` (plain HTTP faults), ``hold``
(the next call waits, received and recorded, until the test sets the returned event: ``waiting``
is set while it waits, so a test can see the call in flight), ``expire_results`` (result images
answer 403, as they do after their 24 h). The held call's events belong to the test's event loop:
serve the fake with ``serve_app``, not in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ANY_METHOD, FaultPlan, RecordedRequest, record

ROUTE = "/api/v3/images/generations"
MODELS = frozenset(
    {
        "doubao-seedream-4-0-250828",
        "doubao-seedream-4-5-251128",
        "doubao-seedream-3-0-t2i-250415",
        "doubao-seededit-3-0-i2i-250628",
    }
)
DATA_URI = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")
MODERATION = {
    "input_text": (
        "InputTextSensitiveContentDetected",
        "The request failed because the input text may contain sensitive information.",
    ),
    "input_image": (
        "InputImageSensitiveContentDetected",
        "The request failed because the input image may contain sensitive information.",
    ),
    "output_image": (
        "OutputImageSensitiveContentDetected",
        "The request failed because the output image may contain sensitive information.",
    ),
}


@lru_cache(maxsize=16)
def png_bytes(index: int) -> bytes:
    """A small real PNG, its colour varying with ``index``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 40 + 20 * index, 160)).save(out, format="PNG")
    return out.getvalue()


def new_request_id() -> str:
    return f"02{int(time.time() * 1000)}{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Planned:
    status: int
    code: str
    message: str
    retry_after: str | None = None
    in_band: bool = False  # a 200 whose ``data`` entry carries the error


@dataclass
class Made:
    """One image the fake made (served at ``/results/{image_id}.png``)."""

    image_id: str
    index: int
    made_at: float


class SeedreamFake:
    """Synchronous generations, the key checked, controls for tests."""

    def __init__(
        self,
        *,
        key: str = "ark-fake-key-0123456789",
        clock: Callable[[], float] = time.time,
        result_ttl_s: float = 86_400.0,
        sequential_count: int = 2,
        banned_words: frozenset[str] = frozenset({"forbidden"}),
    ) -> None:
        self.key = key
        self.clock = clock
        self.result_ttl_s = result_ttl_s
        self.sequential_count = sequential_count
        self.banned_words = banned_words
        self.requests: list[RecordedRequest] = []
        self.faults = FaultPlan()
        self.planned: deque[Planned] = deque()
        self.images: dict[str, Made] = {}
        self.request_id: Callable[[], str] = new_request_id
        self.results_expired = False
        self.image_hits = 0
        self.waiting = asyncio.Event()
        self._gates: deque[asyncio.Event] = deque()
        self.app = Starlette(
            routes=[
                Route(ROUTE, self._generate, methods=["POST"]),
                Route("/results/{image_id}.png", self._image, methods=["GET"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ]
        )

    # -- the API --------------------------------------------------------------------------------

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str = "",
        kind: str = "BadRequest",
        retry_after: str | None = None,
    ) -> JSONResponse:
        request_id = self.request_id()
        headers = {"x-request-id": request_id}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = {
            "error": {
                "code": code,
                "message": f"{message} Request id: {request_id}",
                "param": param,
                "type": kind,
            }
        }
        return JSONResponse(body, status_code=status, headers=headers)

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return Response(b"Not Found", status_code=404)

    async def _generate(self, request: Request) -> Response:
        got = await record(request)
        self.requests.append(got)
        if self._gates:
            gate = self._gates.popleft()
            self.waiting.set()
            try:
                await gate.wait()
            finally:
                self.waiting.clear()
        if (fault := self.faults.next_response()) is not None:
            return fault
        auth = got.headers.get("authorization", "")
        if not secrets.compare_digest(auth.encode(), f"Bearer {self.key}".encode()):
            return self._error(
                401,
                "AuthenticationError",
                "The API key or AK/SK in the request is missing or invalid.",
                kind="Unauthorized",
            )
        try:
            body = json.loads(got.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or got.headers.get("content-type") != "application/json":
            return self._error(400, "InvalidParameter", "The request body is not a JSON object.")
        if (refused := self._refusal(body)) is not None:
            return refused
        if self.planned and not self.planned[0].in_band:
            p = self.planned.popleft()
            return self._error(p.status, p.code, p.message, retry_after=p.retry_after)
        return self._answer(body, str(request.base_url).rstrip("/"))

    def _refusal(self, body: dict[str, Any]) -> Response | None:
        model = body.get("model")
        if not isinstance(model, str) or model not in MODELS:
            return self._error(
                404,
                "InvalidEndpointOrModel.NotFound",
                f"The model or endpoint {model} does not exist or you do not have access to it.",
                kind="NotFound",
            )
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return self._error(400, "MissingParameter", "The prompt is required.", param="prompt")
        if any(word in prompt for word in self.banned_words):
            return self._error(400, *MODERATION["input_text"])
        if body.get("response_format", "url") not in ("url", "b64_json"):
            return self._error(400, "InvalidParameter", "response_format is invalid.")
        image = body.get("image")
        images = image if isinstance(image, list) else [] if image is None else [image]
        if not all(isinstance(i, str) and _image_ref(i) for i in images):
            return self._error(400, "InvalidParameter", "The image is invalid.", param="image")
        if "t2i" in model and images:
            return self._error(400, "InvalidParameter", "The model takes no image.", param="image")
        if "seededit" in model and len(images) != 1:
            return self._error(400, "InvalidParameter", "SeedEdit takes one image.", param="image")
        if len(images) > 14:
            return self._error(400, "InvalidParameter", "At most 14 images.", param="image")
        return None

    def _count(self, body: dict[str, Any]) -> int:
        if body.get("sequential_image_generation") != "auto":
            return 1
        options = body.get("sequential_image_generation_options")
        limit = options.get("max_images", 15) if isinstance(options, dict) else 15
        return max(1, min(self.sequential_count, limit if isinstance(limit, int) else 15))

    def _answer(self, body: dict[str, Any], base_url: str) -> Response:
        data: list[dict[str, Any]] = []
        now = self.clock()
        for index in range(self._count(body)):
            made = Made(uuid.uuid4().hex, index, now)
            self.images[made.image_id] = made
            if body.get("response_format") == "b64_json":
                encoded = base64.b64encode(png_bytes(index)).decode()
                data.append({"b64_json": encoded, "size": "2048x2048"})
            else:
                data.append({"url": f"{base_url}/results/{made.image_id}.png", "size": "2048x2048"})
        if self.planned and self.planned[0].in_band:
            p = self.planned.popleft()
            data[-1] = {"error": {"code": p.code, "message": p.message}}
        made_count = sum(1 for d in data if "error" not in d)
        answer = {
            "model": body["model"],
            "created": int(now),
            "data": data,
            "usage": {
                "generated_images": made_count,
                "output_tokens": 16384 * made_count,
                "total_tokens": 16384 * made_count,
            },
        }
        return JSONResponse(answer, headers={"x-request-id": self.request_id()})

    async def _image(self, request: Request) -> Response:
        """A result image; 403 once expired (result URLs live 24 hours)."""
        made = self.images.get(request.path_params["image_id"])
        if made is None:
            return Response(b"Not Found", status_code=404)
        if self.results_expired or self.clock() - made.made_at > self.result_ttl_s:
            return Response(b"Request has expired", status_code=403)
        self.image_hits += 1
        return Response(png_bytes(made.index), media_type="image/png")

    # -- controls for tests ---------------------------------------------------------------------

    def calls(self) -> list[RecordedRequest]:
        """The generation requests received."""
        return [r for r in self.requests if r.path == ROUTE]

    def fail_next(
        self,
        code: str,
        *,
        status: int = 400,
        message: str = "planned error",
        retry_after: str | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` authenticated, valid calls answer ``status`` with Ark's ``code``."""
        self.planned.extend([Planned(status, code, message, retry_after)] * times)

    def moderate_next(self, kind: str = "input_text", *, in_band: bool = False) -> None:
        """The next valid call is refused by moderation of ``kind`` (``input_text``,
        ``input_image``, ``output_image``): a 400, or with ``in_band`` a 200 whose image entry
        carries the error (as Ark answers when it made the image and then refused it)."""
        code, message = MODERATION[kind]
        self.planned.append(Planned(400, code, message, in_band=in_band))

    def hold(self) -> asyncio.Event:
        """The next call waits, once received and recorded, until the returned event is set."""
        gate = asyncio.Event()
        self._gates.append(gate)
        return gate

    def expire_results(self) -> None:
        """Result images answer 403 from now on."""
        self.results_expired = True


def _image_ref(value: str) -> bool:
    return value.startswith(("https://", "http://")) or DATA_URI.fullmatch(value) is not None
