"""The task routes: create, read, list, cancel, a new watch link (service/http/watch.py); the
caller (``/v1/me``) and the style catalogue.

Handlers validate, call the store, and render (service/http/views.py); errors are raised and
mapped to responses in one place (service/http/errors.py). What a task may run and what it costs
is the catalogue's decision (service/styles.py); it is made before anything is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callbacks.provider import checked_model
from service.blobs.base import InvalidBlobKey, validate_key
from service.http import watch
from service.http.outbound import WebhookUrl, checked_task_destination
from service.http.requests import caller, read_json, readable_task, visible_task
from service.http.state import Web, runtime, web
from service.http.views import Style as StyleJson
from service.http.views import StyleList, TaskList, style_json, task_json, user_json
from service.http.views import Task as TaskJson
from service.runtime import Runtime
from service.styles import Style
from statemachine import lifecycle
from statemachine.errors import BadRequest, Conflict
from statemachine.states import Event, State
from statemachine.store import User
from statemachine.task import Task

MAX_IDEMPOTENCY_KEY = 200
MAX_PAGE = 100
MAX_PARAM_CHARS = 2000
MAX_SAFE_INT = 2**53
# owner/name, owner/name:version, a bare version id, deployments/owner/name
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/:]*$"


class UploadInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    upload: Annotated[str, Field(min_length=1, max_length=300)]


class UrlInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://")]


# Parameters reach the provider's model as they are: small, flat, JSON-safe values only. Integers
# stay within 2**53 so every JSON client (and MongoDB's int64) reads back the number that was sent.
ParamName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


def _not_an_int(value: Any) -> Any:
    # strict floats still take ints: an int out of range must fail, not turn into a float
    if isinstance(value, int):
        raise ValueError(f"integers must be within ±{MAX_SAFE_INT}")
    return value


ParamValue = (
    Annotated[str, Field(max_length=MAX_PARAM_CHARS)]
    | Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
    | Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_an_int)]
    | bool
)


class CreateTaskBody(BaseModel):
    """``POST /v1/tasks``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: Annotated[list[UploadInput | UrlInput], Field(min_length=1)]
    prompt: Annotated[str, Field(min_length=1, pattern=r"\S")]
    style: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    provider: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=200, pattern=MODEL_PATTERN)] | None = None
    params: Annotated[dict[ParamName, ParamValue], Field(max_length=32)] = Field(
        default_factory=dict
    )
    num_outputs: Annotated[int, Field(ge=1, le=4)] = 1
    # the task's own destination for how it ended, signed with the owner's task-webhook secret
    webhook: WebhookUrl | None = None


def request_hash(body: CreateTaskBody) -> str:
    """The whole body, canonical: everything that decides what runs and what it costs (style,
    provider, model, params, num_outputs) is in it, so a replay of an ``Idempotency-Key`` with
    this hash is the request that was priced and charged once."""
    # without a webhook the body hashes as it did before the field existed
    fields = body.model_dump(mode="json", exclude={"webhook"} if body.webhook is None else None)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_ids() -> tuple[str, str]:
    """A task id and its unguessable callback token, from one call to the OS's generator."""
    raw = secrets.token_bytes(36)
    return "tsk_" + raw[:12].hex(), base64.urlsafe_b64encode(raw[12:]).decode("ascii")


async def create_task(request: Request) -> Response:
    state = web(request)
    rt = state.runtime
    user = await caller(request)
    body = await read_json(request, CreateTaskBody)
    settings = rt.settings
    if len(body.inputs) > settings.max_inputs:
        raise BadRequest(f"at most {settings.max_inputs} inputs", code="too_many_inputs")
    if len(body.prompt) > settings.max_prompt_chars:
        raise BadRequest(
            f"prompt over {settings.max_prompt_chars} characters", code="prompt_too_long"
        )
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest("Idempotency-Key must be 1-200 characters", code="bad_idempotency_key")
    style = rt.catalogue.get(body.style)
    provider, model = rt.catalogue.choose(
        style,
        provider=body.provider,
        model=body.model,
        default_provider=settings.provider,
        default_model=settings.default_model,
        configured=rt.providers,
        admin=user.is_admin,
    )
    checked_model(rt.providers[provider], model)  # 422 invalid_model: no path can be steered
    style.check_params(body.params)
    params = {**style.params, **body.params}
    cost = style.cost_of(body.num_outputs, params)  # debited by store.create_task, atomically
    inputs = tuple([await checked_input(state, user, i) for i in body.inputs])
    if body.webhook is not None:
        await checked_task_destination(rt, user.name, body.webhook)
    now = rt.now()
    task_id, callback_token = new_ids()
    task = Task(
        id=task_id,
        owner=user.name,
        state=State.PENDING,
        version=1,
        provider=provider,
        model=model,
        prompt=body.prompt,
        cost=cost,
        created_at=now,
        updated_at=now,
        callback_token=callback_token,
        style=body.style,
        params=params,
        inputs=inputs,
        num_outputs=body.num_outputs,
        deadline=now + rt.timings.base.handoff_s,
        idempotency_key=key,
        request_hash=request_hash(body),
        webhook=body.webhook,
    )
    stored, _created = await rt.store.create_task(task)
    return JSONResponse(await linked_task_json(rt, stored), 202)


async def linked_task_json(rt: Runtime, task: Task, *, url_ttl_s: int | None = None) -> TaskJson:
    """A task as its key sees it: with a fresh watch link (none for a cancelled task); its
    output URLs last ``url_ttl_s`` (default ``HOOKLINE_FILE_URL_TTL_S``)."""
    link = watch.signer(rt.settings).link(task, rt.now())
    ttl_s = url_ttl_s if url_ttl_s is not None else rt.settings.file_url_ttl_s
    return await task_json(task, rt.blobs, ttl_s, watch=link)


async def checked_input(state: Web, user: User, item: UploadInput | UrlInput) -> dict[str, str]:
    """The stored form of one input; an upload must be the caller's own and exist. Another
    user's key, a malformed one and a missing one get the same answer."""
    if isinstance(item, UrlInput):
        return {"url": item.url}
    if not item.upload.startswith(f"uploads/{user.name}/"):
        raise BadRequest(f"unknown upload {item.upload!r}", code="unknown_upload")
    # Upload keys are content addresses, written once: one that existed a minute ago still does
    # (and if it were deleted, the processing step fails the task with a refund). This saves a
    # blob-store round trip (a thread hop for local files) on most creations.
    now = state.runtime.now()
    if state.uploads.get(item.upload, now):
        return {"upload": item.upload}
    try:
        found = await state.runtime.blobs.exists(validate_key(item.upload))
    except InvalidBlobKey:
        found = False
    if not found:
        raise BadRequest(f"unknown upload {item.upload!r}", code="unknown_upload")
    state.uploads.put(item.upload, True, now)
    return {"upload": item.upload}


async def get_task(request: Request) -> Response:
    """With the API key: the task and a fresh watch link. With a watch link: the task alone (a
    link never renews itself: it ends at its expiry) and never stored by caches."""
    rt = runtime(request)
    reading = await readable_task(request)
    if reading.watch_token is None:
        return JSONResponse(await linked_task_json(rt, reading.task))
    body = await task_json(reading.task, rt.blobs, rt.settings.file_url_ttl_s)
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def list_tasks(request: Request) -> Response:
    rt = runtime(request)
    user = await caller(request)
    params = request.query_params
    state: State | None = None
    if params.get("state"):
        try:
            state = State(params["state"])
        except ValueError:
            raise BadRequest(
                f"unknown state {params['state']!r}",
                code="bad_state",
                details=[s.value for s in State],
            ) from None
    raw_limit = params.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(f"limit must be 1-{MAX_PAGE}", code="bad_limit")
    owner = None if user.is_admin else user.name
    try:
        page = await rt.store.list_tasks(owner, state, int(raw_limit), params.get("cursor"))
    except ValueError as exc:
        raise BadRequest("invalid cursor", code="bad_cursor") from exc
    ttl = rt.settings.file_url_ttl_s
    body: TaskList = {
        "items": [await task_json(t, rt.blobs, ttl) for t in page.items],
        "next": page.next,
    }
    return JSONResponse(body)


async def cancel_task(request: Request) -> Response:
    rt = runtime(request)
    task = await visible_task(request, await caller(request))
    structlog.contextvars.bind_contextvars(task_id=task.id)
    result = await lifecycle.advance(
        rt.store, task.id, Event.CANCEL, rt.now(), rt.timings.base, detail="cancelled by the user"
    )
    if isinstance(result, lifecycle.Refused):
        if result.task.state is not State.CANCELLED:
            raise Conflict(
                f"task is {result.task.state.value} and can no longer be cancelled",
                code="not_cancellable",
            )
        cancelled = result.task
    else:
        cancelled = result
        if cancelled.provider_job_id:
            # best effort and after the answer: a slow provider must not hold the request
            rt.background.spawn(rt.outcomes.cancel_job(cancelled))
    return JSONResponse(await task_json(cancelled, rt.blobs, rt.settings.file_url_ttl_s))


async def rotate_watch_link(request: Request) -> Response:
    """``POST /v1/tasks/{id}/watch_url``: the task with a new watch link; every older link of
    the task stops working (409 ``task_cancelled`` for a cancelled task)."""
    rt = runtime(request)
    task = await visible_task(request, await caller(request))
    structlog.contextvars.bind_contextvars(task_id=task.id)
    rotated = await watch.rotate(rt.store, task)
    return JSONResponse(await linked_task_json(rt, rotated))


async def me(request: Request) -> Response:
    user = await caller(request)
    fresh = await runtime(request).store.get_user(user.name)  # the balance, as of now
    return JSONResponse(user_json(fresh or user))


async def styles(request: Request) -> Response:
    await caller(request)
    rt = runtime(request)
    catalogue = rt.catalogue

    def shown(style: Style) -> StyleJson:
        offered = catalogue.choices(
            style, rt.settings.provider, rt.settings.default_model, rt.providers
        )
        return style_json(style, offered)

    body: StyleList = {
        "items": [shown(s) for s in catalogue.all()],
        "plain": shown(catalogue.plain),
    }
    return JSONResponse(body)


def routes() -> list[Route]:
    return [
        Route("/v1/tasks", create_task, methods=["POST"]),
        Route("/v1/tasks", list_tasks, methods=["GET"]),
        Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
        Route("/v1/tasks/{task_id}/watch_url", rotate_watch_link, methods=["POST"]),
        Route("/v1/me", me, methods=["GET"]),
        Route("/v1/styles", styles, methods=["GET"]),
    ]
