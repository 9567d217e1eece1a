"""``POST /v1/callbacks/{provider}/{task_id}?token=…``: a provider's webhook, handed to the
receiver (callbacks/receiver.py), which authenticates, de-duplicates and applies it and answers in
milliseconds.

``POST /v1/callbacks/{provider}``: a provider's project-level webhook (OpenAI's: configured once
per project, naming only a job), authenticated by its signature alone."""

from __future__ import annotations

from typing import Final

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.http.requests import read_body
from service.http.state import runtime

WEBHOOK_MAX_BYTES: Final = 1_000_000


async def webhook(request: Request) -> Response:
    receiver = runtime(request).receiver
    task_id = request.path_params["task_id"]
    structlog.contextvars.bind_contextvars(task_id=task_id[:64])
    body = await read_body(request, WEBHOOK_MAX_BYTES)
    receipt = await receiver.handle(
        request.path_params["provider"],
        task_id,
        request.query_params.get("token", ""),
        request.headers,
        body,
    )
    return JSONResponse(receipt.body, status_code=receipt.status)


async def project_webhook(request: Request) -> Response:
    receiver = runtime(request).receiver
    body = await read_body(request, WEBHOOK_MAX_BYTES)
    receipt = await receiver.handle_project(request.path_params["provider"], request.headers, body)
    return JSONResponse(receipt.body, status_code=receipt.status)


def routes() -> list[Route]:
    return [
        Route("/v1/callbacks/{provider}", project_webhook, methods=["POST"]),
        Route("/v1/callbacks/{provider}/{task_id}", webhook, methods=["POST"]),
    ]
