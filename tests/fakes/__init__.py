"""Faithful fakes of the AI providers (shared/PROVIDERS.md) and the pieces they share.

Each fake is a Starlette app kept in memory, served over real HTTP by tests/support/server.py.
Tests steer it through plain methods (complete, fail, moderate, ``faults.add``) and read what it
received from ``requests``. Webhooks are sent by the control methods themselves, so when
``await fake.complete(...)`` returns, the delivery has reached the receiver: nothing to wait for.

``WebhookSink`` is the tiny receiver: it records every request (raw body, headers) and answers
with a status the test chooses.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# The methods a fake's catch-all route takes, so that a request to any other path is recorded.
ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as a fake or the sink received it."""

    method: str
    path: str  # percent-decoded, as the fake's routes match it
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw_path: str = ""  # as it came over the wire (escapes kept), query excluded

    def json(self) -> Any:
        return json.loads(self.body)


async def record(request: Request) -> RecordedRequest:
    """Capture a Starlette request, raw body included."""
    return RecordedRequest(
        method=request.method,
        path=request.url.path,
        query=dict(request.query_params),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.body(),
        raw_path=bytes(request.scope.get("raw_path") or b"").decode("latin-1").split("?")[0],
    )


@dataclass
class Fault:
    status: int
    retry_after: str | None = None
    body: dict[str, Any] | None = None


@dataclass
class FaultPlan:
    """Errors the next API calls answer with, in order (``add(500, times=2)``)."""

    queue: deque[Fault] = field(default_factory=deque)

    def add(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        for _ in range(times):
            self.queue.append(Fault(status, retry_after, body))

    def next_response(self) -> Response | None:
        """The error response for this call, if one is planned."""
        if not self.queue:
            return None
        fault = self.queue.popleft()
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        body = fault.body or {"detail": f"injected HTTP {fault.status}"}
        return JSONResponse(body, status_code=fault.status, headers=headers)


class WebhookSink:
    """A receiver that records each webhook request and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[RecordedRequest] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    async def _receive(self, request: Request) -> Response:
        self.received.append(await record(request))
        return JSONResponse({"ok": self.status < 300}, status_code=self.status)

    @property
    def last(self) -> RecordedRequest:
        return self.received[-1]


class HttpClientLifespan:
    """A fake's lifespan: one HTTP client (for the webhooks it sends) while it is served."""

    _http: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=10.0) as http:
            self._http = http
            yield
            self._http = None
