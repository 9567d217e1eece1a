"""Watch links: a signed, expiring, read-only link to one task, for a front end (a mini-program, a
browser) that follows its task without holding the backend's API key.

    {public_url}/v1/tasks/{id}?watch=<token>          the task (GET), without a key
    {public_url}/v1/tasks/{id}/events?watch=<token>   its event stream (``EventSource`` sends no
                                                      headers: hence a query parameter)

A token is ``<exp>.<rev>.<mac>``: its expiry (Unix seconds), the task's ``watch_rev`` when it was
made, and the urlsafe HMAC-SHA256 (no padding) of the task id, rev and exp under a key derived
from the process's file-URL secret with a purpose label of its own, so that no file-URL signature
(nor any other use of that secret) can pass as a watch token. The task id is the path's: the MAC
binds the token to it.

A token is refused (401 ``invalid_watch_link``) at the first check it fails: its length and shape;
its MAC, compared in constant time (a forgery costs no store read); its expiry; then, on the task
as stored, its revision (rotating bumps ``watch_rev``, and every older link stops working) and the
task's state (a cancelled task's links are revoked). A link opens only the two GETs above; every
other route reads the API key alone, and a request that sends an ``Authorization`` header is the
key's whatever its query says.

Making a link reads nothing from the store (``watch_link``): the signing key is derived once per
process (``signer``), so a link costs one HMAC wherever a task is rendered.

CORS (``WatchCors``): responses to watch requests, errors included, carry
``Access-Control-Allow-Origin: *`` and never credentials, and their preflights are answered here;
everything else keeps the CORS ``HOOKLINE_CORS_ORIGINS`` configures (service/http/app.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.blobs.local import load_or_create_secret
from service.http.errors import AuthError
from service.settings import Settings
from statemachine import lifecycle
from statemachine.errors import Conflict, StoreError, Unavailable
from statemachine.states import State
from statemachine.store import TaskStore
from statemachine.task import Task

PARAM: Final = "watch"
INVALID: Final = "invalid_watch_link"  # the code of every refusal (401)
PURPOSE: Final = b"hookline watch link v1"
MAX_TOKEN_CHARS: Final = 96  # checked before any parsing (a real token is about 60)
MAX_TASK_ID_CHARS: Final = 64
# no leading zeros: one link has one spelling
_TOKEN: Final = re.compile(r"(0|[1-9][0-9]{0,11})\.(0|[1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})")
# the two routes a link opens: the task and its event stream
WATCH_PATH: Final = re.compile(r"/v1/tasks/[^/]+(?:/events)?")
# what EventSource may send that needs a preflight (on a reconnect, in some browsers)
PREFLIGHT_HEADERS: Final = frozenset({"last-event-id", "cache-control"})
PREFLIGHT_MAX_AGE_S: Final = 600
EXPOSED_HEADERS: Final = "Retry-After, X-Request-ID"


@dataclass(frozen=True, slots=True)
class WatchLink:
    """A task's watch link and when it expires (Unix seconds)."""

    url: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class WatchSigner:
    """Makes and checks one process's watch tokens: ``key`` (derived, never the secret itself),
    links under ``public_url``, valid for ``ttl_s``."""

    key: bytes
    public_url: str
    ttl_s: int

    def token(self, task_id: str, rev: int, exp: int) -> str:
        return f"{exp}.{rev}.{self._mac(task_id, rev, exp)}"

    def _mac(self, task_id: str, rev: int, exp: int) -> str:
        mac = hmac.new(self.key, f"{task_id}\n{rev}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def link(self, task: Task, now: float) -> WatchLink | None:
        """A new link to ``task`` valid from ``now`` for ``ttl_s``; None for a cancelled task
        (its links are revoked)."""
        if task.state is State.CANCELLED:
            return None
        exp = int(now) + self.ttl_s
        token = self.token(task.id, task.watch_rev, exp)
        return WatchLink(f"{self.public_url}/v1/tasks/{task.id}?{PARAM}={token}", exp)

    def check(self, token: str, task_id: str, now: float) -> int:
        """The revision ``token`` was made at, if it is a genuine, unexpired link to
        ``task_id``; ``refused`` otherwise. Reads nothing: the caller checks the
        revision (and the state) on the stored task."""
        shaped = len(token) <= MAX_TOKEN_CHARS and _plain_id(task_id)
        match = _TOKEN.fullmatch(token) if shaped else None
        if match is None:
            raise refused("malformed watch link")
        exp, rev = int(match[1]), int(match[2])
        expected = self._mac(task_id, rev, exp).encode()
        if not hmac.compare_digest(expected, match[3].encode()):
            raise refused("this is no watch link of this task")
        if now >= exp:
            raise refused(
                "this watch link has expired: ask the backend for a new one",
                details={"expired_at": exp},
            )
        return rev


def refused(message: str, details: Any = None) -> AuthError:
    """A watch link that opens nothing: 401 ``invalid_watch_link``."""
    return AuthError(message, code=INVALID, details=details)


def _plain_id(task_id: str) -> bool:
    # printable: no newline in an id, so the signed fields cannot run into each other
    return 0 < len(task_id) <= MAX_TASK_ID_CHARS and task_id.isprintable()


def signer(settings: Settings) -> WatchSigner:
    """The process's watch-token signer: its key derived from the secret that signs file URLs
    (``HOOKLINE_SECRET_KEY``, else ``var_dir/secret.key``, as service/runtime.py finds it)."""
    secret = settings.secret_key.get_secret_value() if settings.secret_key is not None else None
    key = _derived_key(secret, settings.var_dir.absolute())
    return WatchSigner(key, settings.public_url.rstrip("/"), settings.watch_ttl_s)


@functools.lru_cache(maxsize=16)
def _derived_key(secret: str | None, var_dir: Path) -> bytes:
    """Memoised by its inputs: the key file is read once per process, not once per link."""
    raw = secret.encode() if secret is not None else load_or_create_secret(var_dir)
    return hmac.new(raw, PURPOSE, hashlib.sha256).digest()


def watch_link(settings: Settings, task: Task, now: float) -> WatchLink | None:
    """``task``'s watch link as of ``now`` (None for a cancelled task); no store access."""
    return signer(settings).link(task, now)


async def watched_task(
    store: TaskStore, links: WatchSigner, task_id: str, token: str, now: float
) -> Task:
    """The task ``token`` opens, or ``refused``: the token first (no store read for a
    forgery), then its revision and the task's state on the stored record."""
    rev = links.check(token, task_id, now)
    task = await store.get_task(task_id)
    if task is None or task.watch_rev != rev:
        raise refused("this watch link was revoked: ask the backend for a new one")
    if task.state is State.CANCELLED:
        raise refused("the task was cancelled: its watch links are revoked")
    return task


async def link_holds(
    store: TaskStore, links: WatchSigner, task_id: str, token: str, now: float
) -> bool:
    """Whether ``token`` still opens its task (for a stream it opened: it ends once the link is
    rotated, revoked or expired). A store that cannot answer ends nothing."""
    try:
        await watched_task(store, links, task_id, token, now)
    except AuthError:
        return False
    except (StoreError, Unavailable):
        return True
    return True


async def rotate(store: TaskStore, task: Task) -> Task:
    """Bump ``task``'s ``watch_rev`` (every older link stops working): a compare-and-set that
    changes no state and publishes no event, retried on a fresh read when a race is lost.
    ``Conflict`` (``task_cancelled``) for a cancelled task, which has no link to give."""

    def bumped(current: Task) -> Task | lifecycle.Refused:
        if current.state is State.CANCELLED:
            return lifecycle.Refused(current, "cancelled")
        return current.with_changes(version=current.version + 1, watch_rev=current.watch_rev + 1)

    result = await lifecycle.race(store, task.id, bumped, known=task)
    if isinstance(result, lifecycle.Refused):
        raise Conflict("a cancelled task has no watch link", code="task_cancelled")
    return result


def watch_request(scope: Scope) -> bool:
    """Whether the request is for one of the two routes a link opens and carries ``watch``."""
    if WATCH_PATH.fullmatch(scope["path"]) is None:
        return False
    query: bytes = scope.get("query_string", b"")
    # parsed as Starlette parses it, so both read the same parameter (``%77atch`` included)
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return any(name == PARAM for name, _ in pairs)


class WatchCors:
    """Pure-ASGI middleware: CORS for watch requests only (see the module docstring). It sits
    outside Starlette's ``CORSMiddleware`` (when origins are configured), so a watch request's
    answer says ``*`` whatever that one added, and everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not watch_request(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        if method == "OPTIONS" and "access-control-request-method" in headers:
            if _link_preflight(headers):
                await _preflight_response()(scope, receive, send)
                return
        elif method in ("GET", "HEAD") and "authorization" not in headers:

            async def send_open(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    out = MutableHeaders(scope=message)
                    out["Access-Control-Allow-Origin"] = "*"
                    out["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
                    if "access-control-allow-credentials" in out:
                        del out["access-control-allow-credentials"]
                await send(message)

            await self.app(scope, receive, send_open)
            return
        # a key's request (or its preflight, asking for Authorization): configured CORS decides
        await self.app(scope, receive, send)


def _link_preflight(headers: Headers) -> bool:
    """A preflight for what a link's reader sends: a GET with at most EventSource's headers."""
    asked = headers.get("access-control-request-headers", "")
    names = {name.strip().lower() for name in asked.split(",") if name.strip()}
    return headers["access-control-request-method"] in ("GET", "HEAD") and (
        names <= PREFLIGHT_HEADERS
    )


def _preflight_response() -> Response:
    return Response(
        status_code=204,
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET, HEAD",
            "Access-Control-Allow-Headers": "Last-Event-ID, Cache-Control",
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        },
    )
