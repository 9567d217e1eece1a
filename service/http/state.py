"""What the HTTP layer holds beside the runtime, and how a handler reaches both.

The app's lifespan puts one ``Web`` on ``request.state.web`` (Starlette hands lifespan state to
every request). It holds the process's runtime (store, blobs, providers, …: service/runtime.py)
and what only HTTP needs: the per-key rate limiter, the short-lived caches of authenticated keys
and known uploads, and the SSE keep-alive interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from starlette.requests import Request

from service.http.auth import KEY_CACHE_MAX, KEY_CACHE_TTL_S, TtlCache
from service.http.ratelimit import RateLimiter
from service.runtime import Runtime
from statemachine.store import User

UPLOAD_CACHE_TTL_S: Final = 60.0
UPLOAD_CACHE_MAX: Final = 10_000
SSE_PING_S: Final = 15.0


@dataclass
class Web:
    runtime: Runtime
    limiter: RateLimiter
    keys: TtlCache[User] = field(default_factory=lambda: TtlCache(KEY_CACHE_TTL_S, KEY_CACHE_MAX))
    uploads: TtlCache[bool] = field(
        default_factory=lambda: TtlCache(UPLOAD_CACHE_TTL_S, UPLOAD_CACHE_MAX)
    )
    sse_ping_s: float = SSE_PING_S


def web(request: Request) -> Web:
    state: Web = request.state.web
    return state


def runtime(request: Request) -> Runtime:
    return web(request).runtime
