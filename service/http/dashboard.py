"""The dashboard: plain HTML, CSS and JavaScript from service/static, served with strict headers.

Nothing is loaded from elsewhere and nothing is inline, so the Content-Security-Policy can be
``default-src 'self'``. The page talks to the API with ``fetch`` and the key in the Authorization
header (the live stream too), so keys never appear in URLs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from service.settings import Settings
from statemachine.errors import NotFound

STATIC_DIR: Final = Path(__file__).parent / "static"
FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def image_sources(settings: Settings) -> str:
    """Where output images may come from: this origin, local previews, and the S3 endpoint."""
    sources = ["'self'", "blob:", "data:"]
    endpoint = settings.s3_public_endpoint or settings.s3_endpoint
    if settings.blob_url.startswith("s3://") and endpoint:
        url = httpx.URL(endpoint if "://" in endpoint else f"https://{endpoint}")
        scheme = url.scheme if "://" in endpoint else ("https" if settings.s3_secure else "http")
        port = f":{url.port}" if url.port else ""
        sources.append(f"{scheme}://{url.host}{port}")
    return " ".join(sources)


def security_headers(settings: Settings) -> dict[str, str]:
    csp = "; ".join(
        [
            "default-src 'self'",
            f"img-src {image_sources(settings)}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


def routes(settings: Settings) -> list[BaseRoute]:
    """``/`` and ``/static/{name}``; the files are read once, when the app is built."""
    headers = security_headers(settings)
    bodies = {name: (STATIC_DIR / name).read_bytes() for name in FILES}

    def serve(name: str) -> Response:
        return Response(bodies[name], media_type=FILES[name], headers=headers)

    async def index(request: Request) -> Response:
        return serve("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES or name == "index.html":
            raise NotFound(f"no static file {name!r}", code="not_found")
        return serve(name)

    return [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
    ]
