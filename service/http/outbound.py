"""The outbound-webhook routes: a user's endpoints, their secrets, and a task's deliveries.

    POST   /v1/webhooks                 register {"url", "events"?}: the secret is shown only here
    GET    /v1/webhooks                 the caller's endpoints (no secrets)
    DELETE /v1/webhooks/{id}            forget one (its unsent messages fail)
    POST   /v1/webhooks/{id}/rotate     a new secret; the old one signs too for the overlap
    POST   /v1/webhooks/secret          create or rotate the secret signing tasks' own destinations
    GET    /v1/tasks/{id}/deliveries    every message about the task and each of its tries
    POST   /v1/deliveries/{id}/replay   send a message again (same webhook-id, due now)

Destinations follow the input fetches' SSRF rules (public https hosts, plus
``HOOKLINE_WEBHOOK_HOSTS``), checked here against what the host resolves to now and again at each
delivery (service/outbound/deliverer.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typing_extensions import TypedDict

from callbacks.standard_webhooks import generate_secret
from service.http.requests import caller, read_json, visible_task
from service.http.state import runtime
from service.media.fetch import FetchError, SafeFetcher
from service.runtime import Runtime
from statemachine.clock import iso
from statemachine.errors import BadRequest, NotFound, Unavailable
from statemachine.outbox import (
    DEFAULT_EVENTS,
    DeliveryAttempt,
    Endpoint,
    Message,
    Outbox,
    checked_events,
)
from statemachine.store import User

MAX_URL_CHARS = 2048
MAX_MESSAGES_SHOWN = 200

WebhookUrl = Annotated[str, Field(min_length=8, max_length=MAX_URL_CHARS, pattern=r"^https?://")]


class CreateWebhookBody(BaseModel):
    """``POST /v1/webhooks``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    url: WebhookUrl
    events: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] | None = (
        None
    )


class WebhookEndpoint(TypedDict):
    """A registered destination (its secret is shown only when made)."""

    id: str
    url: str
    events: list[str]
    created_at: str
    disabled_at: str | None
    disabled_reason: str | None


class WebhookEndpointMade(WebhookEndpoint):
    """A destination just registered or rotated, with its secret: keep it, it is not shown
    again. ``previous_secret_expires_at``: after a rotation, until when the old secret signs
    too."""

    secret: str
    previous_secret_expires_at: str | None


class WebhookList(TypedDict):
    items: list[WebhookEndpoint]


class WebhookSecret(TypedDict):
    """The secret signing tasks' own destinations (``webhook`` on POST /v1/tasks)."""

    secret: str
    previous_secret_expires_at: str | None


class DeliveryTry(TypedDict):
    number: int
    at: str
    status_code: int | None
    latency_ms: float
    error: str | None
    next_retry_at: str | None


class Delivery(TypedDict):
    """One message: an event of a task for one destination (``endpoint_id`` "task": the task's
    own), its ``id`` the ``webhook-id`` it is sent with, and its tries."""

    id: str
    task_id: str
    event: str
    endpoint_id: str
    url: str
    state: Literal["pending", "delivered", "failed"]
    created_at: str
    next_retry_at: str | None
    settled_at: str | None
    attempts: list[DeliveryTry]


class DeliveryList(TypedDict):
    task_id: str
    items: list[Delivery]


def outbox_of(rt: Runtime) -> Outbox:
    if rt.outbox is None:
        raise Unavailable("this store keeps no outbound webhooks")
    return rt.outbox


def destination_rules(rt: Runtime) -> SafeFetcher:
    """The SSRF rules destinations are checked with (the deliverer's own, in a dispatcher)."""
    if rt.deliverer is not None:
        return rt.deliverer.fetcher
    return SafeFetcher(
        rt.http,
        allow_hosts=rt.settings.webhook_host_set(),
        max_bytes=0,
        timeout_s=rt.settings.webhook_timeout_s,
        resolver=rt.user_lookups,
    )


async def checked_destination(rt: Runtime, url: str) -> str:
    """``url`` if hookline may send webhooks to it; 422 ``webhook_url_forbidden`` (a host that is
    not public https and not listed) or ``webhook_url_invalid`` otherwise."""
    try:
        await destination_rules(rt).check_destination(url)
    except FetchError as exc:
        code = "webhook_url_forbidden" if exc.code == "url_forbidden" else "webhook_url_invalid"
        raise BadRequest(
            f"webhook URL refused: {exc.message} (public https hosts, or hosts listed in"
            " HOOKLINE_WEBHOOK_HOSTS)",
            code=code,
        ) from exc
    return url


async def checked_task_destination(rt: Runtime, owner: str, url: str) -> str:
    """A task's own ``webhook``: the owner must have a task-webhook secret to sign it with."""
    if await outbox_of(rt).owner_secret(owner) is None:
        raise BadRequest(
            "a task's webhook is signed with your task-webhook secret: create it first with"
            " POST /v1/webhooks/secret",
            code="webhook_secret_missing",
        )
    return await checked_destination(rt, url)


def endpoint_json(endpoint: Endpoint) -> WebhookEndpoint:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": list(endpoint.events),
        "created_at": iso(endpoint.created_at),
        "disabled_at": iso(endpoint.disabled_at),
        "disabled_reason": endpoint.disabled_reason,
    }


def attempt_json(attempt: DeliveryAttempt) -> DeliveryTry:
    return {
        "number": attempt.number,
        "at": iso(attempt.at),
        "status_code": attempt.status_code,
        "latency_ms": attempt.latency_ms,
        "error": attempt.error,
        "next_retry_at": iso(attempt.next_retry_at),
    }


def message_json(message: Message, attempts: list[DeliveryAttempt]) -> Delivery:
    return {
        "id": message.id,
        "task_id": message.task_id,
        "event": message.event,
        "endpoint_id": message.endpoint_id,
        "url": message.url,
        "state": message.state,
        "created_at": iso(message.created_at),
        "next_retry_at": iso(message.next_at) if message.state == "pending" else None,
        "settled_at": iso(message.settled_at),
        "attempts": [attempt_json(a) for a in attempts],
    }


async def create_webhook(request: Request) -> Response:
    user = await caller(request)
    body = await read_json(request, CreateWebhookBody)
    rt = runtime(request)
    outbox = outbox_of(rt)
    try:
        events = checked_events(body.events if body.events is not None else DEFAULT_EVENTS)
    except ValueError as exc:
        raise BadRequest(f"events: {exc}", code="unknown_event") from exc
    url = await checked_destination(rt, body.url)
    endpoint = Endpoint(
        id="whe_" + secrets.token_hex(12),
        owner=user.name,
        url=url,
        events=events,
        secret=generate_secret(),
        created_at=rt.now(),
    )
    await outbox.add_endpoint(endpoint, max_per_owner=rt.settings.webhook_max_endpoints)
    _changed(rt, user)
    made: WebhookEndpointMade = {
        **endpoint_json(endpoint),
        "secret": endpoint.secret,
        "previous_secret_expires_at": None,
    }
    return JSONResponse(made, 201)


async def list_webhooks(request: Request) -> Response:
    user = await caller(request)
    endpoints = await outbox_of(runtime(request)).endpoints(user.name)
    listed: WebhookList = {"items": [endpoint_json(e) for e in endpoints]}
    return JSONResponse(listed)


async def delete_webhook(request: Request) -> Response:
    user = await caller(request)
    endpoint_id = request.path_params["webhook_id"]
    rt = runtime(request)
    if not await outbox_of(rt).delete_endpoint(user.name, endpoint_id):
        raise NotFound(f"no webhook endpoint {endpoint_id}", code="webhook_not_found")
    _changed(rt, user)
    return Response(status_code=204)


async def rotate_webhook(request: Request) -> Response:
    user = await caller(request)
    rt = runtime(request)
    overlap = rt.settings.webhook_secret_overlap_s
    now = rt.now()
    rotated = await outbox_of(rt).rotate_endpoint(
        user.name, request.path_params["webhook_id"], generate_secret(), now + overlap
    )
    made: WebhookEndpointMade = {
        **endpoint_json(rotated),
        "secret": rotated.secret,
        "previous_secret_expires_at": iso(rotated.previous_until),
    }
    return JSONResponse(made)


async def rotate_owner_secret(request: Request) -> Response:
    user = await caller(request)
    rt = runtime(request)
    outbox = outbox_of(rt)
    now = rt.now()
    had = await outbox.owner_secret(user.name)
    secret = generate_secret()
    overlap = rt.settings.webhook_secret_overlap_s
    await outbox.set_owner_secret(user.name, secret, now, overlap)
    _changed(rt, user)
    shown: WebhookSecret = {
        "secret": secret,
        "previous_secret_expires_at": iso(now + overlap) if had is not None else None,
    }
    return JSONResponse(shown, 201 if had is None else 200)


async def task_deliveries(request: Request) -> Response:
    user = await caller(request)
    task = await visible_task(request, user)
    outbox = outbox_of(runtime(request))
    messages = await outbox.task_messages(task.id, MAX_MESSAGES_SHOWN)
    items = [message_json(m, await outbox.attempts(m.id)) for m in messages]
    listed: DeliveryList = {"task_id": task.id, "items": items}
    return JSONResponse(listed)


async def replay_delivery(request: Request) -> Response:
    user = await caller(request)
    rt = runtime(request)
    outbox = outbox_of(rt)
    message_id = request.path_params["message_id"]
    found = await outbox.get_message(message_id)
    if found is None or not _may_see(user, found):
        raise NotFound(f"no delivery {message_id}", code="delivery_not_found")
    replayed = await outbox.replay(message_id, rt.now())
    if replayed is None:
        raise NotFound(f"no delivery {message_id}", code="delivery_not_found")
    if rt.deliverer is not None:
        rt.deliverer.wake()
    return JSONResponse(message_json(replayed, await outbox.attempts(message_id)), 202)


def _changed(rt: Runtime, user: User) -> None:
    """This process's feeder sees the owner's new endpoints at once (other replicas within their
    cache time)."""
    if rt.feeder is not None:
        rt.feeder.forget(user.name)


def _may_see(user: User, message: Message) -> bool:
    return message.owner == user.name or user.is_admin


def routes() -> list[Route]:
    return [
        Route("/v1/webhooks", create_webhook, methods=["POST"]),
        Route("/v1/webhooks", list_webhooks, methods=["GET"]),
        Route("/v1/webhooks/secret", rotate_owner_secret, methods=["POST"]),
        Route("/v1/webhooks/{webhook_id}", delete_webhook, methods=["DELETE"]),
        Route("/v1/webhooks/{webhook_id}/rotate", rotate_webhook, methods=["POST"]),
        Route("/v1/tasks/{task_id}/deliveries", task_deliveries, methods=["GET"]),
        Route("/v1/deliveries/{message_id}/replay", replay_delivery, methods=["POST"]),
    ]
