"""A fake of Tencent Cloud's Hunyuan image job API (shared/PROVIDERS.md, "Tencent Cloud Hunyuan").

One API route, ``POST /`` (the served base URL plays ``https://hunyuan.tencentcloudapi.com``), with
``X-TC-Action`` ``SubmitHunyuanImageJob`` or ``QueryHunyuanImageJob``. Every call is
authenticated as Tencent does: the TC3-HMAC-SHA256 ``Authorization`` is recomputed from the fake's
own copy of the secret key over the request as received (method, path, query, the headers named in
``SignedHeaders`` with their received values, the raw body), the credential scope must be
``<UTC date of X-TC-Timestamp>/hunyuan/tc3_request``, and a timestamp more than 5 minutes off the
fake's ``clock`` is refused. Errors are answered, as Tencent answers them, with HTTP 200 and
``{"Response": {"Error": {"Code", "Message"}, "RequestId"}}``: ``AuthFailure.SignatureFailure``,
``AuthFailure.SignatureExpire``, ``AuthFailure.SecretIdNotFound``,
``AuthFailure.InvalidAuthorization``, ``InvalidAction``, ``UnknownParameter``,
``InvalidParameter``… Tests plan others (``fail_next``: ``RequestLimitExceeded``,
``FailedOperation.ResourcePackExhausted``…) and HTTP faults (``faults``: 5xx).

Jobs queue as Tencent describes: at most ``concurrency`` (default 1, Tencent's default) run at once
(``JobStatusCode`` "2"); the others wait ("1") and start in order as running jobs end. Results are
small real PNGs the fake serves at ``/results/{job_id}/{index}.png`` (no auth, as pre-signed COS
URLs are); they answer 403 ``Request has expired`` after ``result_ttl_s`` (1 hour, on ``clock``)
or once ``expire_results()`` is called. Any other path is recorded and answered 404.

Choices where Tencent's documentation is silent: a query for an unknown ``JobId`` answers
``ResourceNotFound``; a prompt containing one of ``banned_words`` is refused at submit with
``OperationDenied.TextIllegalDetected``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
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

SUBMIT = "SubmitHunyuanImageJob"
QUERY = "QueryHunyuanImageJob"
VERSION = "2023-09-01"
APP_ID = "1258344703"
SKEW_S = 300
SUBMIT_KEYS = frozenset(
    {
        "Prompt",
        "NegativePrompt",
        "Style",
        "Resolution",
        "Num",
        "Clarity",
        "ContentImage",
        "Revise",
        "Seed",
        "LogoAdd",
        "LogoParam",
    }
)
STATUS_MSG = {"1": "排队中", "2": "处理中", "4": "处理失败", "5": "处理完成"}
AUTHORIZATION = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[a-z]+)"
    r"/tc3_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


@lru_cache(maxsize=16)
def png_bytes(index: int) -> bytes:
    """A small real PNG, its colour varying with ``index``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 80 + 20 * index, 40)).save(out, format="PNG")
    return out.getvalue()


def tencent_answer(response: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"Response": {**response, "RequestId": str(uuid.uuid4())}})


def tencent_error(code: str, message: str) -> JSONResponse:
    """Tencent's way: HTTP 200, the error inside ``Response``."""
    return tencent_answer({"Error": {"Code": code, "Message": message}})


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


@dataclass
class HunyuanJob:
    job_id: str
    body: dict[str, Any]
    base_url: str
    submitted_at: float
    status: str = "1"
    error_code: str = ""
    error_msg: str = ""
    images: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    done_at: float | None = None
    queries: int = 0

    @property
    def num(self) -> int:
        num = self.body.get("Num", 1)
        return num if isinstance(num, int) else 1

    def response(self) -> dict[str, Any]:
        prompt = self.body.get("Prompt", "")
        return {
            "JobStatusCode": self.status,
            "JobStatusMsg": STATUS_MSG[self.status],
            "JobErrorCode": self.error_code,
            "JobErrorMsg": self.error_msg,
            "ResultImage": list(self.images),
            "ResultDetails": list(self.details),
            "RevisedPrompt": [prompt] * len(self.images),
        }


class HunyuanFake:
    """Jobs in memory, TC3 signatures checked, controls for tests (no callbacks: poll only)."""

    def __init__(
        self,
        *,
        secret_id: str = "AKIDfakehunyuan0123456789",
        secret_key: str = "fake-hunyuan-secret-key-0123456789",
        region: str = "ap-guangzhou",
        clock: Callable[[], float] = time.time,
        concurrency: int = 1,
        result_ttl_s: float = 3600.0,
        auto_complete_after: int | None = None,
        banned_words: frozenset[str] = frozenset({"forbidden"}),
    ) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.region = region
        self.clock = clock
        self.concurrency = concurrency
        self.result_ttl_s = result_ttl_s
        self.auto_complete_after = auto_complete_after
        self.banned_words = banned_words
        self.jobs: dict[str, HunyuanJob] = {}
        self.requests: list[RecordedRequest] = []
        self.faults = FaultPlan()
        self.planned: deque[tuple[str, str]] = deque()
        self.results_expired = False
        self.image_hits = 0
        self.app = Starlette(
            routes=[
                Route("/", self._api, methods=["POST"]),
                Route("/results/{job_id}/{index:int}.png", self._image, methods=["GET"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ]
        )

    # -- authentication -------------------------------------------------------------------------

    def signature(self, request: RecordedRequest, signed: str, timestamp: str, date: str) -> str:
        """The signature Tencent computes for ``request`` (the official canonical request)."""
        names = signed.split(";")
        headers = "".join(f"{n}:{request.headers.get(n, '').strip().lower()}\n" for n in names)
        query = "&".join(f"{k}={v}" for k, v in sorted(request.query.items()))
        canonical = "\n".join(
            [
                request.method,
                request.raw_path or "/",
                query,
                headers,
                signed,
                hashlib.sha256(request.body).hexdigest(),
            ]
        )
        scope = f"{date}/hunyuan/tc3_request"
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{digest}"
        key = _hmac(
            _hmac(_hmac(("TC3" + self.secret_key).encode(), date), "hunyuan"), "tc3_request"
        )
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    def _refusal(self, request: RecordedRequest) -> Response | None:
        """Tencent's answer to a request that fails authentication, or None."""
        timestamp = request.headers.get("x-tc-timestamp", "")
        if not timestamp:
            return tencent_error("MissingParameter", "The parameter `X-TC-Timestamp` is missing")
        if not timestamp.isdigit():
            return tencent_error("InvalidParameterValue", "X-TC-Timestamp is not an integer")
        match = AUTHORIZATION.fullmatch(request.headers.get("authorization", ""))
        if match is None:
            return tencent_error("AuthFailure.InvalidAuthorization", "Authorization is invalid")
        if abs(int(timestamp) - self.clock()) > SKEW_S:
            return tencent_error(
                "AuthFailure.SignatureExpire", "The request timestamp is more than 5 minutes off"
            )
        if not hmac.compare_digest(match["id"], self.secret_id):
            return tencent_error("AuthFailure.SecretIdNotFound", "The SecretId is not found")
        signed = match["signed"]
        date = datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%d")
        if (
            match["date"] != date
            or match["service"] != "hunyuan"
            or not {"content-type", "host"} <= set(signed.split(";"))
        ):
            return tencent_error("AuthFailure.SignatureFailure", "The credential scope is wrong")
        expected = self.signature(request, signed, timestamp, date)
        if not hmac.compare_digest(expected, match["signature"]):
            return tencent_error("AuthFailure.SignatureFailure", "The signature is wrong")
        return None

    # -- the API --------------------------------------------------------------------------------

    async def _not_found(self, request: Request) -> Response:
        """Any other path: recorded (tests assert nothing strays here), then 404."""
        self.requests.append(await record(request))
        return Response(b"Not Found", status_code=404)

    async def _api(self, request: Request) -> Response:
        got = await record(request)
        self.requests.append(got)
        if (fault := self.faults.next_response()) is not None:
            return fault
        if (refused := self._refusal(got)) is not None:
            return refused
        action = got.headers.get("x-tc-action", "")
        if action not in (SUBMIT, QUERY):
            return tencent_error("InvalidAction", f"The action `{action}` is not supported")
        if got.headers.get("x-tc-version") != VERSION:
            return tencent_error("NoSuchVersion", "The API version is not supported")
        if got.headers.get("x-tc-region") != self.region:
            return tencent_error("UnsupportedRegion", "The region is not supported")
        if self.planned:
            return tencent_error(*self.planned.popleft())
        try:
            body = json.loads(got.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or got.headers.get("content-type") != "application/json":
            return tencent_error("InvalidParameter", "The request body is not a JSON object")
        if action == SUBMIT:
            return self._submit(body, str(request.base_url).rstrip("/"))
        return self._query(body)

    def _submit_refusal(self, body: dict[str, Any]) -> Response | None:
        unknown = sorted(set(body) - SUBMIT_KEYS)
        if unknown:
            return tencent_error("UnknownParameter", f"The parameter `{unknown[0]}` is unknown")
        prompt = body.get("Prompt")
        if not isinstance(prompt, str) or not prompt or len(prompt) > 1024:
            return tencent_error("InvalidParameter", "Prompt is required (at most 1024 chars)")
        if any(word in prompt for word in self.banned_words):
            return tencent_error("OperationDenied.TextIllegalDetected", "The text is illegal")
        num = body.get("Num", 1)
        if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 4:
            return tencent_error("InvalidParameterValue.ParameterValueError", "Num must be 1-4")
        image = body.get("ContentImage")
        if image is not None:
            ok = isinstance(image, dict) and len(image) == 1
            value = next(iter(image.values()), None) if isinstance(image, dict) else None
            if not ok or set(image) - {"ImageUrl", "ImageBase64"} or not isinstance(value, str):
                return tencent_error("InvalidParameter", "ContentImage needs ImageUrl or Base64")
            if "ImageBase64" in image and value.startswith("data:"):
                return tencent_error(
                    "InvalidParameterValue.ImageRequestError", "ImageBase64 is not base64"
                )
        return None

    def _submit(self, body: dict[str, Any], base_url: str) -> Response:
        if (refused := self._submit_refusal(body)) is not None:
            return refused
        now = self.clock()
        job_id = f"{APP_ID}-{int(now)}-{uuid.uuid4()}-0"
        self.jobs[job_id] = HunyuanJob(job_id, body, base_url, submitted_at=now)
        self._schedule()
        return tencent_answer({"JobId": job_id})

    def _query(self, body: dict[str, Any]) -> Response:
        job_id = body.get("JobId")
        if not isinstance(job_id, str) or not job_id:
            return tencent_error("MissingParameter", "The parameter `JobId` is missing")
        job = self.jobs.get(job_id)
        if job is None:
            return tencent_error("ResourceNotFound", "The job does not exist")
        job.queries += 1
        if (
            self.auto_complete_after is not None
            and job.queries >= self.auto_complete_after
            and job.status in ("1", "2")
        ):
            self._finish(job, "5")
        return tencent_answer(job.response())

    def _schedule(self) -> None:
        """Start waiting jobs, oldest first, while fewer than ``concurrency`` run."""
        running = sum(1 for j in self.jobs.values() if j.status == "2")
        for job in self.jobs.values():
            if running >= self.concurrency:
                break
            if job.status == "1":
                job.status, running = "2", running + 1

    def _finish(self, job: HunyuanJob, status: str, failed_images: int = 0) -> None:
        job.status, job.done_at = status, self.clock()
        if status == "5":
            made = job.num - failed_images
            job.images = [f"{job.base_url}/results/{job.job_id}/{i}.png" for i in range(made)]
            job.details = ["Success"] * made + ["FailedOperation.GenerateImageFailed"] * (
                job.num - made
            )
        self._schedule()

    async def _image(self, request: Request) -> Response:
        """A result image; 403 once expired (``ResultImage`` URLs are valid for 1 hour)."""
        job = self.jobs.get(request.path_params["job_id"])
        index = request.path_params["index"]
        if job is None or job.done_at is None or not 0 <= index < len(job.images):
            return Response(b"Not Found", status_code=404)
        if self.results_expired or self.clock() - job.done_at > self.result_ttl_s:
            return Response(b"Request has expired", status_code=403)
        self.image_hits += 1
        return Response(png_bytes(index), media_type="image/png")

    # -- controls for tests ---------------------------------------------------------------------

    def calls(self, action: str | None = None) -> list[RecordedRequest]:
        """The API requests received (of one ``X-TC-Action`` only, when given)."""
        api = [r for r in self.requests if r.path == "/"]
        return [r for r in api if action is None or r.headers.get("x-tc-action") == action]

    def fail_next(self, code: str, message: str = "planned error", *, times: int = 1) -> None:
        """The next ``times`` authenticated calls answer ``Response.Error`` with ``code``."""
        self.planned.extend([(code, message)] * times)

    def complete(self, job_id: str, *, failed_images: int = 0) -> None:
        """Done ("5") with ``Num - failed_images`` images served by the fake."""
        self._finish(self.jobs[job_id], "5", failed_images)

    def fail(
        self,
        job_id: str,
        code: str = "FailedOperation.GenerateImageFailed",
        message: str = "generate image failed",
    ) -> None:
        job = self.jobs[job_id]
        job.error_code, job.error_msg = code, message
        self._finish(job, "4")

    def moderate(self, job_id: str, code: str = "OperationDenied.ImageIllegalDetected") -> None:
        """Failed by output moderation."""
        self.fail(job_id, code, "The generated image is illegal")

    def expire_results(self) -> None:
        """Result images answer 403 from now on."""
        self.results_expired = True
