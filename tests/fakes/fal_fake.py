"""A fake of fal.ai's queue API and webhooks (shared/PROVIDERS.md, "fal.ai queue").

Routes (relative to the served base URL, which plays ``https://queue.fal.run``):
``POST /{model_id}[/{subpath}]?fal_webhook=…``, and, with the subpath dropped,
``GET /{owner}/{app}/requests/{id}/status``, ``GET /{owner}/{app}/requests/{id}``,
``PUT /{owner}/{app}/requests/{id}/cancel``; ``GET /.well-known/jwks.json`` (public, counted in
``jwks_hits``) plays the JWKS endpoint. The API needs ``Authorization: Key <key>``.

Webhooks are signed with ED25519 over ``request_id\\nuser_id\\ntimestamp\\nhex(sha256(body))``
with a key generated in the test; ``rotate_key`` replaces it (optionally keeping the old one
published).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ANY_METHOD, FaultPlan, HttpClientLifespan, RecordedRequest, record


def jwk(key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    kid = hashlib.sha256(raw).hexdigest()[:16]
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}


@dataclass
class FalJob:
    request_id: str
    app: str  # owner/app: where status, result and cancel live
    model: str  # the full submitted path
    input: dict[str, Any]
    webhook: str | None
    gateway_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "IN_QUEUE"
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    detail: Any = None
    payload_error: str | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class Delivered:
    request_id: str
    status: int | None


class FalFake(HttpClientLifespan):
    """Queue jobs in memory, controls for tests, ED25519-signed webhooks, a JWKS."""

    def __init__(
        self,
        *,
        key: str = "fal-key-id:fal-key-secret",
        user_id: str = "user_fake",
        clock: Callable[[], float] = time.time,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.key = key
        self.user_id = user_id
        self.clock = clock
        self.signing_key = signing_key or Ed25519PrivateKey.generate()
        self.published: list[Ed25519PublicKey] = [self.signing_key.public_key()]
        self.jwks_hits = 0
        self.jobs: dict[str, FalJob] = {}
        self.requests: list[RecordedRequest] = []
        self.deliveries: list[Delivered] = []
        self.faults = FaultPlan()
        self._http: httpx.AsyncClient | None = None
        request = "/{owner}/{app}/requests/{request_id}"
        self.app = Starlette(
            routes=[
                Route("/.well-known/jwks.json", self._jwks, methods=["GET"]),
                Route(request + "/status", self._status, methods=["GET"]),
                Route(request + "/cancel", self._cancel, methods=["PUT"]),
                Route(request, self._result, methods=["GET"]),
                Route("/{model:path}", self._submit, methods=["POST"]),
                Route("/{rest:path}", self._not_found, methods=ANY_METHOD),
            ],
            lifespan=self._lifespan,
        )

    # -- the API --------------------------------------------------------------------------------

    async def _gate(self, request: Request) -> Response | None:
        self.requests.append(await record(request))
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Key" or not secrets.compare_digest(key, self.key):
            return JSONResponse({"detail": "No user found for Key ID and Secret"}, status_code=401)
        return self.faults.next_response()

    async def _jwks(self, request: Request) -> Response:
        self.jwks_hits += 1
        return JSONResponse({"keys": [jwk(k) for k in self.published]})

    async def _not_found(self, request: Request) -> Response:
        self.requests.append(await record(request))
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    async def _submit(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        model = request.path_params["model"].strip("/")
        parts = model.split("/")
        if len(parts) < 2:
            return JSONResponse({"detail": "Application not found"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"detail": "Invalid JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"detail": "body must be an object"}, status_code=422)
        job = FalJob(
            request_id=str(uuid.uuid4()),
            app="/".join(parts[:2]),
            model=model,
            input=body,
            webhook=request.query_params.get("fal_webhook"),
        )
        self.jobs[job.request_id] = job
        base = f"{str(request.base_url).rstrip('/')}/{job.app}/requests/{job.request_id}"
        return JSONResponse(
            {
                "request_id": job.request_id,
                "gateway_request_id": job.gateway_request_id,
                "response_url": base,
                "status_url": base + "/status",
                "cancel_url": base + "/cancel",
            }
        )

    def _job(self, request: Request) -> FalJob | None:
        params = request.path_params
        job = self.jobs.get(params["request_id"])
        if job is None or job.app != f"{params['owner']}/{params['app']}":
            return None
        return job

    async def _status(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        job = self._job(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        response_url = f"{str(request.base_url).rstrip('/')}/{job.app}/requests/{job.request_id}"
        answer: dict[str, Any] = {"status": job.status, "response_url": response_url}
        if job.status == "IN_QUEUE":
            answer["queue_position"] = 0
        if job.error is not None:
            answer.update(error=job.error, error_type=job.error_type)
        return JSONResponse(answer, status_code=200 if job.status == "COMPLETED" else 202)

    async def _result(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        job = self._job(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if job.status != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        if job.error is not None:
            return JSONResponse({"detail": job.detail or job.error}, status_code=422)
        return JSONResponse(job.result)

    async def _cancel(self, request: Request) -> Response:
        if (early := await self._gate(request)) is not None:
            return early
        job = self._job(request)
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if job.status == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        job.cancelled = True
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    # -- controls for tests ---------------------------------------------------------------------

    def rotate_key(self, *, keep_old: bool = False) -> Ed25519PrivateKey:
        """Sign with a new key from now on; publish it (and the old one if ``keep_old``)."""
        self.signing_key = Ed25519PrivateKey.generate()
        new = self.signing_key.public_key()
        self.published = [*self.published, new] if keep_old else [new]
        return self.signing_key

    def start(self, request_id: str) -> None:
        self.jobs[request_id].status = "IN_PROGRESS"

    async def complete(self, request_id: str, urls: Sequence[str]) -> None:
        """Finish with images at ``urls``; send the ``OK`` webhook."""
        job = self.jobs[request_id]
        images = [
            {
                "url": url,
                "content_type": "image/jpeg",
                "file_name": url.rsplit("/", 1)[-1],
                "file_size": 123456,
                "width": 1024,
                "height": 768,
            }
            for url in urls
        ]
        job.status = "COMPLETED"
        job.result = {"images": images, "seed": 42, "has_nsfw_concepts": [False] * len(images)}
        await self.deliver(request_id)

    async def fail(
        self, request_id: str, error: str, *, error_type: str = "runner_error", detail: Any = None
    ) -> None:
        """Finish with an error: status ``COMPLETED`` with ``error``, an ``ERROR`` webhook."""
        job = self.jobs[request_id]
        job.status, job.error, job.error_type, job.detail = "COMPLETED", error, error_type, detail
        await self.deliver(request_id)

    async def fail_payload(self, request_id: str, payload_error: str) -> None:
        """Finish fine but with a result that could not be delivered (``payload`` null)."""
        job = self.jobs[request_id]
        job.status, job.result, job.payload_error = "COMPLETED", {"images": []}, payload_error
        await self.deliver(request_id)

    def webhook_body(self, job: FalJob) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": job.request_id,
            "gateway_request_id": job.gateway_request_id,
        }
        if job.error is not None:
            payload = {"detail": job.detail} if job.detail is not None else None
            body.update(status="ERROR", error=job.error, payload=payload)
        elif job.payload_error is not None:
            body.update(status="OK", payload=None, payload_error=job.payload_error)
        else:
            body.update(status="OK", payload=job.result)
        return body

    def sign(self, request_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The four X-Fal-Webhook-* headers for ``body``."""
        digest = hashlib.sha256(body).hexdigest()
        message = f"{request_id}\n{self.user_id}\n{timestamp}\n{digest}".encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": str(timestamp),
            "X-Fal-Webhook-Signature": self.signing_key.sign(message).hex(),
        }

    async def deliver(self, request_id: str) -> int | None:
        """(Re)send the webhook for the job as it stands."""
        job = self.jobs[request_id]
        if job.webhook is None:
            return None
        assert self._http is not None, "serve the fake before sending webhooks"
        body = json.dumps(self.webhook_body(job)).encode()
        headers = self.sign(request_id, int(self.clock()), body)
        headers["content-type"] = "application/json"
        try:
            response = await self._http.post(job.webhook, content=body, headers=headers)
            status: int | None = response.status_code
        except httpx.HTTPError:
            status = None
        self.deliveries.append(Delivered(request_id, status))
        return status
