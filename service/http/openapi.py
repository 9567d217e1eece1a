"""The API's OpenAPI 3.1 document (``GET /openapi.json``) and its 3.0 rendition for Swagger UI 4
(``GET /openapi-3.0.json``, converted by service/http/openapi30.py).

Nothing here is a second copy of a shape: the request schemas come from the pydantic models that
validate requests (service/http/tasks.py), the response schemas from the TypedDicts the handlers
build their bodies as (service/http/views.py), limits from the constants the handlers check. What
this module adds is the operation table: per route, its parameters, its success response and the
error statuses it can answer. The document lists the app's routes as they are
(``request.app.routes``), so an app without local blobs has no ``/files``; a route the table does
not describe is left out and logged, and tests/integration/test_openapi.py fails on it.

The table is most of the module and stays in it: it is data (one literal, no logic), and a row is
read beside ``Op`` and ``_operation``, which say what each field becomes in the document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from pydantic import BaseModel, TypeAdapter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from service.http import outbound, sse, tasks, timeline, views, watch
from service.http.openapi30 import to_openapi_30
from service.ops import stats

log = structlog.get_logger()

JsonObject = dict[str, Any]

REF: Final = "#/components/schemas/{model}"
SKIPPED_MOUNTS: Final = frozenset({"/sim"})  # the provider simulator: not hookline's API
TASK_ID_PATTERN: Final = r"^tsk_[0-9a-f]{24}$"

# Request models (validation) and response types (what handlers build), by schema name.
REQUEST_MODELS: Final[dict[str, type[BaseModel]]] = {
    "CreateTaskBody": tasks.CreateTaskBody,
    "CreateWebhookBody": outbound.CreateWebhookBody,
}
RESPONSE_TYPES: Final[dict[str, Any]] = {
    "Task": views.Task,
    "TaskList": views.TaskList,
    "Me": views.Me,
    "Upload": views.Upload,
    "StyleList": views.StyleList,
    "Status": views.Status,
    "Stats": views.Stats,
    "Error": views.Error,
    "StateEvent": views.StateEvent,
    "WebhookReceipt": views.WebhookReceipt,
    "TaskTimeline": timeline.TaskTimeline,
    "WebhookEndpoint": outbound.WebhookEndpoint,
    "WebhookEndpointMade": outbound.WebhookEndpointMade,
    "WebhookList": outbound.WebhookList,
    "WebhookSecret": outbound.WebhookSecret,
    "Delivery": outbound.Delivery,
    "DeliveryList": outbound.DeliveryList,
}

# One reusable response per error status; every error body is the one ``Error`` schema.
ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("BadRequest", "Malformed: JSON that does not parse, a bad header or query value."),
    401: (
        "Unauthorized",
        "No API key, or an invalid one (webhooks: a bad token or signature; watch links: "
        "`invalid_watch_link`, one that is malformed, tampered with, another task's, expired, "
        "rotated or of a cancelled task).",
    ),
    402: ("InsufficientCredits", "The balance does not cover the task's cost."),
    403: ("Forbidden", "Not allowed: a file URL that is unsigned, tampered with or expired."),
    404: ("NotFound", "Unknown, or another user's (ids cannot be probed)."),
    409: (
        "Conflict",
        "Idempotency-Key reused with another body, a task past cancelling, or a new watch link "
        "for a cancelled task.",
    ),
    413: ("PayloadTooLarge", "Body, image or pixel count over the limit."),
    415: ("UnsupportedMediaType", "Not JSON where JSON is expected, or not a supported image."),
    422: ("ValidationFailed", "Well-formed but invalid; `details` lists what failed."),
    429: ("RateLimited", "Too many requests for this API key; retry after `Retry-After` s."),
    503: ("Unavailable", "The store (or another dependency) is unreachable; retry later."),
}
AUTHED: Final = (401, 429, 503)  # what any authenticated route can answer


def _json(schema: str) -> JsonObject:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}


def _param(name: str, where: str, schema: JsonObject, desc: str, *, required: bool = False) -> Any:
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": desc,
        "schema": schema,
    }


TASK_LINKS: Final = {
    name: {"operationId": op, "parameters": {"task_id": "$response.body#/id"}}
    for name, op in (("GetTask", "getTask"), ("CancelTask", "cancelTask"), ("Events", "taskEvents"))
}


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: what the table adds to the route and the models."""

    id: str
    summary: str
    tag: str
    status: int = 200
    body: str | None = None  # a JSON response schema by name, or:
    content: JsonObject | None = None  # another success content
    errors: tuple[int, ...] = ()
    auth: bool = True
    params: tuple[JsonObject, ...] = ()
    request: JsonObject | None = None
    description: str = ""
    links: JsonObject = field(default_factory=dict)
    extra: JsonObject = field(default_factory=dict)  # more success responses (status → response)
    watchable: bool = False  # a watch link opens it too (service/http/watch.py)


def _operations() -> dict[tuple[str, str], Op]:
    """The operation table, keyed by (route path as Starlette writes it, method)."""
    task = ("/v1/tasks/{task_id}", "Task")
    webhook_headers = tuple(
        _param(name, "header", {"type": "string"}, desc)
        for name, desc in (
            ("webhook-id", "Standard Webhooks: the delivery id (deliveries are de-duplicated)."),
            ("webhook-timestamp", "Standard Webhooks: Unix seconds, within the tolerance."),
            ("webhook-signature", "Standard Webhooks: `v1,<base64 HMAC-SHA256>` of the body."),
        )
    )
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        ("/v1/tasks", "POST"): Op(
            "createTask",
            "Create a task",
            "tasks",
            status=202,
            body="Task",
            errors=(400, 402, 409, 413, 415, 422),
            params=(
                _param(
                    "Idempotency-Key",
                    "header",
                    {"type": "string", "minLength": 1, "maxLength": tasks.MAX_IDEMPOTENCY_KEY},
                    "Replaying a key with the same body returns the same task and charges "
                    "nothing; with another body it is a 409.",
                ),
            ),
            request={
                "required": True,
                "content": _json("CreateTaskBody"),
            },
            description="Prices the task from the catalogue (`GET /v1/styles`: the style's "
            "`price` for `num_outputs` outputs at its params, plus their surcharges), debits "
            "that `cost` and answers at once; the task then runs on its own. Follow it with "
            "`GET /v1/tasks/{id}/events`. A provider, model or param the catalogue does not "
            "offer is a 422 that charges nothing: `unknown_provider`, `provider_not_allowed`, "
            "`model_not_allowed` (an admin key may run any configured provider and model), "
            "`param_not_allowed`, `bad_param_value`, `reserved_param` (a key that steers "
            "inputs, outputs or callbacks).",
            links=TASK_LINKS,
        ),
        ("/v1/tasks", "GET"): Op(
            "listTasks",
            "List the caller's tasks (an admin's: everyone's), newest first",
            "tasks",
            body="TaskList",
            errors=(422,),
            params=(
                _param("state", "query", {"$ref": REF.format(model="State")}, "Only this state."),
                _param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": tasks.MAX_PAGE, "default": 20},
                    "Page size.",
                ),
                _param("cursor", "query", {"type": "string"}, "`next` of the previous page."),
            ),
        ),
        (task[0], "GET"): Op(
            "getTask",
            "Get a task",
            "tasks",
            body="Task",
            errors=(404,),
            watchable=True,
            description="With the API key, the task comes with a fresh watch link "
            "(`watch_url`, `watch_expires_at`). With a watch link instead of a key (its "
            "`watch` query parameter; the key decides when both are sent), the task alone: "
            "a bad, expired or revoked link is a 401 `invalid_watch_link`.",
        ),
        (task[0] + "/cancel", "POST"): Op(
            "cancelTask",
            "Cancel a task (refunded)",
            "tasks",
            body="Task",
            errors=(404, 409),
            description="Cancelling a cancelled task answers it again; a task producing its "
            "outputs or finished is a 409.",
        ),
        (task[0] + "/events", "GET"): Op(
            "taskEvents",
            "Follow a task live (Server-Sent Events)",
            "tasks",
            content={"text/event-stream": {"schema": {"type": "string"}}},
            errors=(400, 404, 429),
            params=(
                _param(
                    "Last-Event-ID",
                    "header",
                    {"type": "string", "maxLength": sse.MAX_EVENT_ID},
                    "Resume after this event id: no event is lost or repeated.",
                ),
            ),
            description="Frames are `id: <feed position>`, `event: state`, `data: <StateEvent "
            "JSON>` (schema `StateEvent`); the current state comes first, `: ping` comments "
            "keep the connection open, and the stream ends after a terminal state. A watch "
            "link opens it without a key (`EventSource(watch_url path + '/events?watch=…')`); "
            "a stream it opened also ends once the link expires or is revoked. At most "
            "`HOOKLINE_SSE_PER_TASK` streams of one task and `HOOKLINE_SSE_MAX_STREAMS` in all "
            "are open at once per process: one more is a 429 `too_many_streams`.",
            watchable=True,
        ),
        (task[0] + "/watch_url", "POST"): Op(
            "rotateWatchLink",
            "A new watch link for a task; every older link stops working",
            "tasks",
            body="Task",
            errors=(404, 409),
            description="The task with a new `watch_url`. Give the new link to the front end "
            "that should keep following the task: the old ones answer 401 "
            "`invalid_watch_link` from now on. A cancelled task has no link (409 "
            "`task_cancelled`).",
        ),
        (task[0] + "/timeline", "GET"): Op(
            "taskTimeline",
            "A task's whole story: transitions, submits, webhooks, polls, deliveries",
            "tasks",
            body="TaskTimeline",
            errors=(404,),
            description="Entries oldest first, each with its `kind`: `transition` (the task's "
            "history, its creation first), `submit` (each provider call: job id or error, HTTP "
            "status, latency, attempt), `webhook` (each provider delivery whose token matched: "
            "verified or not and why, what it said, its headers with credentials, signatures, "
            "tokens, keys and cookies redacted), `poll` (each poll and the answer) and "
            "`delivery` (each outbound webhook attempt). A task keeps its newest "
            "`HOOKLINE_TIMELINE_MAX_NOTES` notes (200); a note cut to its size cap says "
            "`truncated`.",
        ),
        ("/v1/webhooks", "POST"): Op(
            "createWebhook",
            "Register a destination for outbound webhooks",
            "webhooks",
            status=201,
            body="WebhookEndpointMade",
            errors=(400, 409, 413, 415, 422),
            request={"required": True, "content": _json("CreateWebhookBody")},
            description="hookline POSTs `{type, created_at, data}` (`data`: the task as GET "
            "/v1/tasks/{id} shows it) signed with Standard Webhooks under the `secret` shown "
            "only here. `events`: `task.completed`, `task.failed`, `task.cancelled` by "
            "default; `task.*` for every change. The URL must be a public https host, or a "
            "host listed in HOOKLINE_WEBHOOK_HOSTS (422 `webhook_url_forbidden`); at most "
            "HOOKLINE_WEBHOOK_MAX_ENDPOINTS per user (409 `too_many_webhooks`). Delivery is "
            "at least once (de-duplicate by `webhook-id`), retried with exponential backoff "
            "for HOOKLINE_WEBHOOK_RETRY_HORIZON_S; any 2xx acknowledges, 410 disables the "
            "endpoint, redirects are not followed.",
        ),
        ("/v1/webhooks", "GET"): Op(
            "listWebhooks", "The caller's webhook destinations", "webhooks", body="WebhookList"
        ),
        ("/v1/webhooks/secret", "POST"): Op(
            "rotateWebhookSecret",
            "Create or rotate the secret that signs tasks' own webhooks",
            "webhooks",
            body="WebhookSecret",
            extra={"201": {"description": "Created", "content": _json("WebhookSecret")}},
            description="A task may name its own destination (`webhook` on POST /v1/tasks); "
            "its terminal event is signed with this secret. Rotating keeps the old secret "
            "signing for HOOKLINE_WEBHOOK_SECRET_OVERLAP_S.",
        ),
        ("/v1/webhooks/{webhook_id}", "DELETE"): Op(
            "deleteWebhook",
            "Forget a destination (its unsent messages fail)",
            "webhooks",
            status=204,
            errors=(404,),
        ),
        ("/v1/webhooks/{webhook_id}/rotate", "POST"): Op(
            "rotateWebhook",
            "A new secret for a destination; the old one signs too for the overlap",
            "webhooks",
            body="WebhookEndpointMade",
            errors=(404, 409),
            description="During HOOKLINE_WEBHOOK_SECRET_OVERLAP_S both secrets sign (two `v1,` "
            "entries in `webhook-signature`): a receiver with either one accepts.",
        ),
        (task[0] + "/deliveries", "GET"): Op(
            "taskDeliveries",
            "Every outbound webhook message about a task, with each try",
            "webhooks",
            body="DeliveryList",
            errors=(404,),
        ),
        ("/v1/deliveries/{message_id}/replay", "POST"): Op(
            "replayDelivery",
            "Send a message again (same webhook-id, due now)",
            "webhooks",
            status=202,
            body="Delivery",
            errors=(404,),
        ),
        ("/v1/uploads", "POST"): Op(
            "createUpload",
            "Upload an input image",
            "tasks",
            status=201,
            body="Upload",
            errors=(400, 413, 415, 422),
            request={
                "required": True,
                "content": {
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/jpeg", "image/png", "image/webp")
                },
            },
            description="The raw image as the body. It is checked, EXIF-rotated and normalised; "
            "decompression bombs are refused.",
        ),
        ("/v1/me", "GET"): Op("getMe", "The caller and their balance", "account", body="Me"),
        ("/v1/styles", "GET"): Op(
            "listStyles",
            "The style catalogue: prices, and what a user may choose",
            "account",
            body="StyleList",
            description="Each style (and `plain`, the task without a style) with its price "
            "rule, the providers and models a user may choose on the configured providers, "
            "and the params a user may set (with their ranges, choices and surcharges).",
        ),
        ("/v1/stats", "GET"): Op(
            "getStats",
            "The KPIs: success rates, timeouts, retries, latency",
            "operations",
            body="Stats",
            errors=(400,),
            params=(
                _param(
                    "window_s",
                    "query",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": stats.MAX_WINDOW_S,
                        "default": stats.DEFAULT_WINDOW_S,
                    },
                    "Tasks created in the last this many seconds.",
                ),
            ),
        ),
        ("/v1/callbacks/{provider}/{task_id}", "POST"): Op(
            "providerWebhook",
            "The AI provider's webhook (called by the provider, not by clients)",
            "providers",
            body="WebhookReceipt",
            errors=(400, 401, 404, 413, 503),
            auth=False,
            params=(
                _param(
                    "token",
                    "query",
                    {"type": "string"},
                    "The task's callback token, part of the callback URL hookline gave.",
                    required=True,
                ),
                *webhook_headers,
            ),
            request={"required": True, "content": {"application/json": {"schema": {}}}},
            description="Authenticated by the token and the provider's signature over the raw "
            "body (Standard Webhooks headers for Replicate and the simulator; fal and BFL use "
            "their own). Answers at once; a duplicate delivery is a 200 that changes nothing.",
            extra={
                "202": {
                    "description": "A trigger only: the outcome is fetched from the provider.",
                    "content": _json("WebhookReceipt"),
                }
            },
        ),
        ("/v1/callbacks/{provider}", "POST"): Op(
            "providerProjectWebhook",
            "A provider's project-level webhook (OpenAI's; called by the provider)",
            "providers",
            body="WebhookReceipt",
            errors=(400, 401, 404, 413, 503),
            auth=False,
            params=webhook_headers,
            request={"required": True, "content": {"application/json": {"schema": {}}}},
            description="For providers whose webhooks are configured once per project rather "
            "than per request (`openai`): authenticated by the Standard Webhooks signature alone "
            "(`HOOKLINE_OPENAI_WEBHOOK_SECRET`); the event names a response id, mapped to its "
            "task through the stored job id, and the response is then fetched. An event type "
            "hookline does not act on is acknowledged with 200 `ignored`.",
            extra={
                "202": {
                    "description": "The outcome is fetched from the provider.",
                    "content": _json("WebhookReceipt"),
                }
            },
        ),
        ("/healthz", "GET"): Op(
            "healthz", "Liveness", "operations", body="Status", auth=False, errors=()
        ),
        ("/readyz", "GET"): Op(
            "readyz",
            "Readiness: store and blobs reachable",
            "operations",
            body="Status",
            auth=False,
            errors=(503,),
        ),
        ("/metrics", "GET"): Op(
            "metrics",
            "Prometheus metrics",
            "operations",
            content={"text/plain": {"schema": {"type": "string"}}},
            errors=(401, 503),
            auth=False,
            description="Open by default; behind `Authorization: Bearer <HOOKLINE_METRICS_TOKEN>` "
            "when that is set.",
        ),
        ("/files/{key:path}", "GET"): Op(
            "getFile",
            "A stored image, behind a signed, expiring URL (as given in a task's outputs)",
            "files",
            content={
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/jpeg", "image/png", "image/webp")
            },
            errors=(403, 404, 422),
            auth=False,
            params=(
                _param("exp", "query", {"type": "string"}, "Expiry, Unix seconds.", required=True),
                _param("sig", "query", {"type": "string"}, "The URL's signature.", required=True),
            ),
        ),
        ("/", "GET"): Op("dashboard", "The dashboard", "pages", content=html, auth=False),
        ("/static/{name}", "GET"): Op(
            "dashboardAsset",
            "The dashboard's scripts and styles",
            "pages",
            content={"text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {}}},
            errors=(404,),
            auth=False,
        ),
        ("/docs", "GET"): Op("docs", "This API's documentation", "pages", content=html, auth=False),
        ("/docs/{name}", "GET"): Op(
            "docsAsset",
            "Swagger UI's files, served locally",
            "pages",
            content={
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
            errors=(404,),
            auth=False,
        ),
        ("/openapi.json", "GET"): Op(
            "openapi",
            "This document (OpenAPI 3.1)",
            "pages",
            content={"application/json": {"schema": {"type": "object"}}},
            auth=False,
        ),
        ("/openapi-3.0.json", "GET"): Op(
            "openapi30",
            "This document as OpenAPI 3.0, for tools that read only 3.0 (Swagger UI 4)",
            "pages",
            content={"application/json": {"schema": {"type": "object"}}},
            auth=False,
        ),
    }


def component_schemas() -> JsonObject:
    """Every named schema: request models in validation mode, response types as serialised."""
    inputs = [(name, "validation", TypeAdapter(m)) for name, m in REQUEST_MODELS.items()]
    inputs += [(name, "serialization", TypeAdapter(t)) for name, t in RESPONSE_TYPES.items()]
    top, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)  # type: ignore[arg-type]
    schemas: JsonObject = dict(defs.get("$defs", {}))
    for (name, _mode), schema in top.items():
        schemas.setdefault(name, schema)  # a top-level type is a $ref into $defs already
    return dict(sorted(schemas.items()))


def iter_routes(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, method) of every endpoint, mounts included (not the simulator); HEAD, which
    Starlette adds to every GET, is left out."""
    for route in routes:
        if isinstance(route, Mount):
            path = prefix + route.path
            if path not in SKIPPED_MOUNTS:
                yield from iter_routes(route.routes, path)
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield prefix + route.path, method


def _path_params(path: str) -> list[JsonObject]:
    params = []
    for name in re.findall(r"{(\w+)(?::\w+)?}", path):
        schema: JsonObject = {"type": "string", "minLength": 1}
        if name == "task_id":
            schema = {"type": "string", "pattern": TASK_ID_PATTERN}
        params.append(_param(name, "path", schema, "", required=True))
    return params


def _operation(path: str, op: Op) -> JsonObject:
    ok: JsonObject = {"description": op.summary}
    if op.body is not None:
        ok["content"] = _json(op.body)
    elif op.content is not None:
        ok["content"] = op.content
    if op.links:
        ok["links"] = op.links
    responses: JsonObject = {str(op.status): ok, **op.extra}
    statuses = set(op.errors) | (set(AUTHED) if op.auth else set())
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    operation: JsonObject = {
        "operationId": op.id,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [*_path_params(path), *op.params],
        "responses": responses,
    }
    if op.description:
        operation["description"] = op.description
    if op.request is not None:
        operation["requestBody"] = op.request
    if not op.auth:
        operation["security"] = [{}, {"metricsToken": []}] if op.id == "metrics" else []
    elif op.watchable:
        operation["security"] = [{"bearerAuth": []}, {"watchLink": []}]
    return operation


def _error_responses() -> JsonObject:
    responses: JsonObject = {}
    for _status, (name, text) in sorted(ERRORS.items()):
        responses[name] = {"description": text, "content": _json("Error")}
    responses["RateLimited"]["headers"] = {
        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
    }
    return responses


def build_document(routes: Sequence[BaseRoute]) -> JsonObject:
    """The OpenAPI 3.1 document of the endpoints in ``routes`` (those the table describes)."""
    table = _operations()
    paths: JsonObject = {}
    for path, method in iter_routes(routes):
        op = table.get((path, method))
        if op is None:
            log.warning("route_not_documented", path=path, method=method)
            continue
        public = re.sub(r"{(\w+):\w+}", r"{\1}", path)
        paths.setdefault(public, {})[method.lower()] = _operation(path, op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hookline",
            "version": "1",
            "description": "AI image-generation jobs as persisted state machines advanced by the "
            'provider\'s webhook. Errors are always `{"error": {"code", "message", '
            '"details"}}` (schema `Error`).',
        },
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": t}
            for t in ("tasks", "webhooks", "account", "operations", "providers", "files")
        ]
        + [{"name": "pages"}],
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "responses": _error_responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer hk_…` "
                    "(`hookline users create NAME`).",
                },
                "metricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`HOOKLINE_METRICS_TOKEN`, when set.",
                },
                "watchLink": {
                    "type": "apiKey",
                    "in": "query",
                    "name": watch.PARAM,
                    "description": "A task's watch link (`watch_url` of a task read with its "
                    "key): signed, expiring (`HOOKLINE_WATCH_TTL_S`), read-only, for that one "
                    "task's `GET` and event stream; rotating the link or cancelling the task "
                    "revokes it.",
                },
            },
        },
    }


# --- the routes ----------------------------------------------------------------------------------


def routes() -> list[BaseRoute]:
    """``/openapi.json`` and ``/openapi-3.0.json``, built from the app's routes on first use."""
    rendered: dict[str, bytes] = {}  # per app: its routes do not change once it serves

    def render(request: Request, version: str) -> bytes:
        if version not in rendered:
            doc = build_document(request.app.routes)
            rendered["3.1"] = json.dumps(doc).encode()
            rendered["3.0"] = json.dumps(to_openapi_30(doc)).encode()
        return rendered[version]

    async def openapi_31(request: Request) -> Response:
        return Response(render(request, "3.1"), media_type="application/json")

    async def openapi_30(request: Request) -> Response:
        return Response(render(request, "3.0"), media_type="application/json")

    return [
        Route("/openapi.json", openapi_31, methods=["GET"]),
        Route("/openapi-3.0.json", openapi_30, methods=["GET"]),
    ]
