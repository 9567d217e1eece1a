"""What every handler does with its request: who is calling (authenticated and rate-limited),
which task they may see, and the body (bounded, parsed, validated). Errors are raised here and
mapped to responses in one place (service/http/errors.py).

Failed authentications are limited per client address (``auth_failure_rate_per_s``,
``auth_failure_burst``): past the burst, a missing or wrong key from that address answers 429
``too_many_auth_failures`` with ``Retry-After`` instead of 401. A valid key is never refused by
that limit, whatever its address did: an attacker sharing an address (a NAT, a proxy) cannot lock
a real key out. The address is the ASGI client's (service/http/ratelimit.py ``client_address``).

A task's two reads (the task, its event stream) may be opened by its watch link instead of a key
(``readable_task``; service/http/watch.py): a refused link counts as a failed authentication of
the address, and a link's reads are limited per task (the process's rate and burst).

JSON bodies may nest at most ``max_json_depth`` arrays and objects: deeper answers 400
``json_too_deep``, checked in linear time before the parser recurses.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.http import watch
from service.http.auth import authenticate_hash, bearer_key, hash_key
from service.http.errors import (
    AuthError,
    MalformedRequest,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
)
from service.http.ratelimit import RateLimiter, Slots, client_address
from service.http.state import web
from statemachine.errors import BadRequest, NotFound
from statemachine.store import User
from statemachine.task import Task

M = TypeVar("M", bound=BaseModel)

MAX_FAILING_ADDRESSES: Final = 10_000  # addresses whose failed authentications are remembered
WATCH_BUCKET: Final = "watch:"  # rate-limit keys of watch-link readers (per task; never a key hash)
# A string runs to its closing quote or, unterminated, to the end of the body: possessive and with
# the closing quote optional, so no quote is ever scanned twice (a body of unterminated strings
# would otherwise cost quadratic time).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ALL_SQUARE = bytes.maketrans(b"{}", b"[]")


@dataclass
class Guards:
    """The limits only request handling keeps, one set per app (built on first use from the
    settings): failed authentications per client address, concurrent uploads per user."""

    auth_failures: RateLimiter
    uploads: Slots


def guards(request: Request) -> Guards:
    """The app's ``Guards``, kept on the Starlette app's state."""
    app_state = request.app.state
    found: Guards | None = getattr(app_state, "hookline_guards", None)
    if found is None:
        settings = web(request).runtime.settings
        found = Guards(
            auth_failures=RateLimiter(
                settings.auth_failure_rate_per_s,
                settings.auth_failure_burst,
                max_keys=MAX_FAILING_ADDRESSES,
            ),
            uploads=Slots(
                settings.upload_decodes_per_user,
                message=f"at most {settings.upload_decodes_per_user} uploads at once per user",
                code="too_many_concurrent_uploads",
            ),
        )
        app_state.hookline_guards = found
    return found


async def caller(request: Request) -> User:
    """Authenticate and rate-limit the request; the calling user. Its ``balance`` may be a few
    seconds old (keys are cached): read the user again to show it.

    The limit is per key, with the user's own rate and burst where set (``users create --rate
    --burst``; rate 0: none), else the process's. It is taken after authentication, which is
    cached, so a user's limits are known; failed authentications have their own limit."""
    state = web(request)
    now = state.runtime.now()
    try:
        key_hash = hash_key(bearer_key(request))
        user = await authenticate_hash(state.runtime.store, key_hash, state.keys, now)
    except AuthError as exc:
        raise _refusal(request, exc, now) from None
    state.limiter.check(
        key_hash, now, rate_per_s=user.rate_limit_per_s, burst=user.rate_limit_burst
    )
    return user


def _refusal(request: Request, failure: AuthError, now: float) -> AuthError | RateLimited:
    """What a failed authentication answers: 401, or 429 once its address failed too often."""
    address = client_address(request.client.host if request.client else None)
    wait = guards(request).auth_failures.take(address, now)
    if wait <= 0:
        return failure
    return RateLimited(
        "too many failed authentications from this address; retry later with a valid key",
        retry_after_s=wait,
        code="too_many_auth_failures",
    )


async def visible_task(request: Request, user: User) -> Task:
    """The task named in the path if the caller may see it; 404 otherwise (ids can't be probed)."""
    task_id = request.path_params["task_id"]
    task = await web(request).runtime.store.get_task(task_id)
    if task is None or (task.owner != user.name and not user.is_admin):
        raise NotFound(f"task {task_id} not found", code="task_not_found")
    return task


@dataclass(frozen=True, slots=True)
class Reading:
    """A task opened for reading, and the watch token that opened it (None: the API key)."""

    task: Task
    watch_token: str | None = None


async def readable_task(request: Request) -> Reading:
    """The task named in the path, for one of the two reads a watch link opens (the task, its
    event stream): with the API key when an ``Authorization`` header is sent (the key decides),
    else with the ``watch`` query parameter (service/http/watch.py), else 401 for the missing
    key. A refused link counts as a failed authentication of the client's address; a valid one
    is rate-limited per task with the process's limits."""
    params = request.query_params
    if "authorization" in request.headers or watch.PARAM not in params:
        return Reading(await visible_task(request, await caller(request)))
    state = web(request)
    rt = state.runtime
    now = rt.now()
    tokens = params.getlist(watch.PARAM)
    try:
        if len(tokens) != 1:
            raise watch.refused("send one watch link")
        task = await watch.watched_task(
            rt.store, watch.signer(rt.settings), request.path_params["task_id"], tokens[0], now
        )
    except AuthError as exc:  # a refused link
        raise _refusal(request, exc, now) from None
    wait = state.limiter.take(WATCH_BUCKET + task.id, now)
    if wait > 0:
        raise RateLimited("too many requests for this watch link", retry_after_s=wait)
    return Reading(task, tokens[0])


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
    """Parse and validate a JSON body: 415 not JSON, 400 malformed or too deep, 422 invalid."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType("send the body as application/json", code="not_json")
    settings = web(request).runtime.settings
    raw = await read_body(request, settings.max_body_bytes)
    data = parse_json(raw, settings.max_json_depth)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise BadRequest("request body failed validation", details=details) from exc


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` parsed as JSON nesting at most ``max_depth`` arrays and objects, or
    ``MalformedRequest`` (``malformed_json``, ``json_too_deep``)."""
    try:
        encoding = json.detect_encoding(raw)
        text = raw.decode(encoding, "surrogatepass")
    except (UnicodeDecodeError, LookupError) as exc:
        raise MalformedRequest(f"malformed JSON: {exc}") from exc
    too_deep = MalformedRequest(
        f"JSON nests deeper than {max_depth} arrays and objects",
        code="json_too_deep",
        details={"max_depth": max_depth},
    )
    utf8 = raw if encoding == "utf-8" else text.encode("utf-8", "surrogatepass")
    deep = nests_deeper(utf8, max_depth)
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise MalformedRequest(f"malformed JSON: {exc}") from exc
    if deep:  # valid, but deeper than allowed (and than the rest of hookline expects)
        raise too_deep
    return data


def nests_deeper(body: bytes, max_depth: int) -> bool:
    """Whether the UTF-8 JSON ``body`` nests more than ``max_depth`` arrays and objects, in linear
    time and without recursion: strings blanked, everything but brackets dropped, and what is
    left matched against a pattern of at most ``max_depth`` nested pairs (possessive: no
    backtracking). Exact for valid JSON; malformed bodies may be judged either way, and the
    parser refuses them anyway."""
    brackets = _JSON_STRING.sub(b"", body).translate(_ALL_SQUARE, _NOT_BRACKETS)
    return _nesting(max_depth).fullmatch(brackets) is None


@functools.lru_cache(maxsize=8)
def _nesting(max_depth: int) -> re.Pattern[bytes]:
    """Balanced ``[``/``]`` nested at most ``max_depth`` deep."""
    pattern = b""
    for _ in range(max_depth):
        pattern = rb"(?:\[" + pattern + rb"\])*+"
    return re.compile(pattern)
