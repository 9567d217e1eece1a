"""The REST API: tasks, the caller, styles, health. Handlers validate, call the store, and render;
errors are raised and mapped to responses in one place (service/errors.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.blobs.base import InvalidBlobKey, validate_key
from service.http.auth import (
    KEY_CACHE_MAX,
    KEY_CACHE_TTL_S,
    TtlCache,
    authenticate_hash,
    bearer_key,
    hash_key,
)
from service.http.views import Status, TaskList, style_json, task_json, user_json
from service.runtime import Services
from statemachine import lifecycle
from statemachine.errors import (
    BadRequest,
    Conflict,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from statemachine.states import Event, State
from statemachine.store import User
from statemachine.task import Task

M = TypeVar("M", bound=BaseModel)
MAX_IDEMPOTENCY_KEY = 200
MAX_PAGE = 100
MAX_PARAM_CHARS = 2000
MAX_SAFE_INT = 2**53
UPLOAD_CACHE_TTL_S = 60.0
UPLOAD_CACHE_MAX = 10_000
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


def services(request: Request) -> Services:
    svc: Services = request.state.services
    return svc


def _cache(svc: Services, name: str, ttl_s: float, max_items: int) -> TtlCache[Any]:
    """A per-process cache kept with the app's resources (created on first use)."""
    cache: TtlCache[Any] | None = svc.extras.get(name)
    if cache is None:
        cache = svc.extras[name] = TtlCache(ttl_s, max_items)
    return cache


async def caller(request: Request) -> User:
    """Authenticate and rate-limit the request; the calling user. Its ``balance`` may be a few
    seconds old (keys are cached): read the user again to show it."""
    svc = services(request)
    key_hash = hash_key(bearer_key(request))
    now = svc.now()
    svc.limiter.check(key_hash, now)
    keys = _cache(svc, "key_cache", KEY_CACHE_TTL_S, KEY_CACHE_MAX)
    return await authenticate_hash(svc.store, key_hash, keys, now)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body over {limit} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259); Python's parser accepts them."""
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, model: type[M]) -> M:
    """Parse and validate a JSON body: 415 not JSON, 400 malformed, 422 invalid."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType("send the body as application/json", code="not_json")
    raw = await read_body(request, services(request).settings.max_body_bytes)
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"malformed JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise BadRequest("request body failed validation", details=details) from exc


async def visible_task(request: Request, user: User) -> Task:
    """The task named in the path if the caller may see it; 404 otherwise (ids can't be probed)."""
    task_id = request.path_params["task_id"]
    task = await services(request).store.get_task(task_id)
    if task is None or (task.owner != user.name and not user.is_admin):
        raise NotFound(f"task {task_id} not found", code="task_not_found")
    return task


def request_hash(body: CreateTaskBody) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_ids() -> tuple[str, str]:
    """A task id and its unguessable callback token, from one call to the OS's generator."""
    raw = secrets.token_bytes(36)
    return "tsk_" + raw[:12].hex(), base64.urlsafe_b64encode(raw[12:]).decode("ascii")


async def create_task(request: Request) -> Response:
    svc = services(request)
    user = await caller(request)
    body = await read_json(request, CreateTaskBody)
    settings = svc.settings
    if len(body.inputs) > settings.max_inputs:
        raise BadRequest(f"at most {settings.max_inputs} inputs", code="too_many_inputs")
    if len(body.prompt) > settings.max_prompt_chars:
        raise BadRequest(
            f"prompt over {settings.max_prompt_chars} characters", code="prompt_too_long"
        )
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest("Idempotency-Key must be 1-200 characters", code="bad_idempotency_key")
    style = svc.catalogue.get(body.style)
    provider = body.provider or (style.provider if style.provider != "default" else None)
    provider = provider or settings.provider
    svc.provider(provider)  # 422 for an unknown provider
    model = body.model or (style.model if style.model != "default" else None)
    model = model or settings.default_model(provider)
    inputs = tuple([await checked_input(svc, user, i) for i in body.inputs])
    now = svc.now()
    task_id, callback_token = new_ids()
    task = Task(
        id=task_id,
        owner=user.name,
        state=State.PENDING,
        version=1,
        provider=provider,
        model=model,
        prompt=body.prompt,
        cost=style.cost,
        created_at=now,
        updated_at=now,
        callback_token=callback_token,
        style=body.style,
        params={**style.params, **body.params},
        inputs=inputs,
        num_outputs=body.num_outputs,
        deadline=now + svc.deadlines.handoff_s,
        idempotency_key=key,
        request_hash=request_hash(body),
    )
    stored, _created = await svc.store.create_task(task)
    return JSONResponse(await task_json(stored, svc.blobs, settings.file_url_ttl_s), 202)


async def checked_input(svc: Services, user: User, item: UploadInput | UrlInput) -> dict[str, str]:
    """The stored form of one input; an upload must be the caller's own and exist. Another
    user's key, a malformed one and a missing one get the same answer."""
    if isinstance(item, UrlInput):
        return {"url": item.url}
    if not item.upload.startswith(f"uploads/{user.name}/"):
        raise BadRequest(f"unknown upload {item.upload!r}", code="unknown_upload")
    # Upload keys are content addresses, written once: one that existed a minute ago still does
    # (and if it were deleted, the processing step fails the task with a refund). This saves a
    # blob-store round trip (a thread hop for local files) on most creations.
    if _uploads(svc).get(item.upload, svc.now()):
        return {"upload": item.upload}
    try:
        found = await svc.blobs.exists(validate_key(item.upload))
    except InvalidBlobKey:
        found = False
    if found:
        remember_upload(svc, item.upload)
    else:
        raise BadRequest(f"unknown upload {item.upload!r}", code="unknown_upload")
    return {"upload": item.upload}


def _uploads(svc: Services) -> TtlCache[bool]:
    return _cache(svc, "upload_cache", UPLOAD_CACHE_TTL_S, UPLOAD_CACHE_MAX)


def remember_upload(svc: Services, key: str) -> None:
    """Note that the upload ``key`` exists (just stored, or just seen in the blob store)."""
    _uploads(svc).put(key, True, svc.now())


async def get_task(request: Request) -> Response:
    svc = services(request)
    task = await visible_task(request, await caller(request))
    return JSONResponse(await task_json(task, svc.blobs, svc.settings.file_url_ttl_s))


async def list_tasks(request: Request) -> Response:
    svc = services(request)
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
        page = await svc.store.list_tasks(owner, state, int(raw_limit), params.get("cursor"))
    except ValueError as exc:
        raise BadRequest("invalid cursor", code="bad_cursor") from exc
    ttl = svc.settings.file_url_ttl_s
    body: TaskList = {
        "items": [await task_json(t, svc.blobs, ttl) for t in page.items],
        "next": page.next,
    }
    return JSONResponse(body)


async def cancel_task(request: Request) -> Response:
    svc = services(request)
    task = await visible_task(request, await caller(request))
    result = await lifecycle.advance(
        svc.store, task.id, Event.CANCEL, svc.now(), svc.deadlines, detail="cancelled by the user"
    )
    if isinstance(result, lifecycle.Refused):
        if result.task.state is not State.CANCELLED:
            raise Conflict(
                f"task is {result.task.state.value} and can no longer be cancelled",
                code="not_cancellable",
            )
        result_task = result.task
    else:
        result_task = result
        if result_task.provider_job_id:
            # best effort and after the answer: a slow provider must not hold the request
            worker = svc.extras["worker"]
            worker.spawn(worker.cancel_job(result_task))
    return JSONResponse(await task_json(result_task, svc.blobs, svc.settings.file_url_ttl_s))


async def me(request: Request) -> Response:
    user = await caller(request)
    fresh = await services(request).store.get_user(user.name)  # the balance, as of now
    return JSONResponse(user_json(fresh or user))


async def styles(request: Request) -> Response:
    await caller(request)
    return JSONResponse({"items": [style_json(s) for s in services(request).catalogue.all()]})


async def healthz(request: Request) -> Response:
    body: Status = {"status": "ok"}
    return JSONResponse(body)


async def readyz(request: Request) -> Response:
    svc = services(request)
    await svc.store.ping()
    await svc.blobs.ping()
    body: Status = {"status": "ready"}
    return JSONResponse(body)


def routes() -> list[Route]:
    return [
        Route("/v1/tasks", create_task, methods=["POST"]),
        Route("/v1/tasks", list_tasks, methods=["GET"]),
        Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
        Route("/v1/me", me, methods=["GET"]),
        Route("/v1/styles", styles, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
