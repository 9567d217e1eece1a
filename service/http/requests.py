"""What every handler does with its request: who is calling (authenticated and rate-limited),
which task they may see, and the body (bounded, parsed, validated). Errors are raised here and
mapped to responses in one place (service/http/errors.py)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.http.auth import authenticate_hash, bearer_key, hash_key
from service.http.errors import MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from service.http.state import web
from statemachine.errors import BadRequest, NotFound
from statemachine.store import User
from statemachine.task import Task

M = TypeVar("M", bound=BaseModel)


async def caller(request: Request) -> User:
    """Authenticate and rate-limit the request; the calling user. Its ``balance`` may be a few
    seconds old (keys are cached): read the user again to show it."""
    state = web(request)
    key_hash = hash_key(bearer_key(request))
    now = state.runtime.now()
    state.limiter.check(key_hash, now)
    return await authenticate_hash(state.runtime.store, key_hash, state.keys, now)


async def visible_task(request: Request, user: User) -> Task:
    """The task named in the path if the caller may see it; 404 otherwise (ids can't be probed)."""
    task_id = request.path_params["task_id"]
    task = await web(request).runtime.store.get_task(task_id)
    if task is None or (task.owner != user.name and not user.is_admin):
        raise NotFound(f"task {task_id} not found", code="task_not_found")
    return task


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
    raw = await read_body(request, web(request).runtime.settings.max_body_bytes)
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
