"""``/docs``: Swagger UI, served from the ``swagger-ui-bundle`` package's own files.

Nothing is loaded from elsewhere and nothing is inline (the start-up code is ``/docs/init.js``),
so the page has the dashboard's headers, ``default-src 'self'`` included. Swagger UI 4 reads
OpenAPI 3.0 only: it is given ``/openapi-3.0.json``, the rendition service/http/openapi30.py derives
from the 3.1 document, and its validator badge (a call to validator.swagger.io) is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from service.http.dashboard import security_headers
from service.settings import Settings
from statemachine.errors import NotFound

BUNDLE: Final = Path(swagger_ui_path)
ASSETS: Final = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

PAGE: Final = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>hookline API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

INIT_JS: Final = b"""// Swagger UI 4 reads OpenAPI 3.0 only: the 3.0 rendition of /openapi.json.
window.ui = SwaggerUIBundle({
  url: "/openapi-3.0.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""


def routes(settings: Settings) -> list[BaseRoute]:
    """``/docs`` and ``/docs/{name}`` (Swagger UI's files and ``init.js``)."""
    headers = security_headers(settings)

    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html; charset=utf-8", headers=headers)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "init.js":
            return Response(INIT_JS, media_type="text/javascript; charset=utf-8", headers=headers)
        if name not in ASSETS:
            raise NotFound(f"no docs file {name!r}", code="not_found")
        return FileResponse(BUNDLE / name, media_type=ASSETS[name], headers=headers)

    return [
        Route("/docs", page, methods=["GET"]),
        Route("/docs/{name}", asset, methods=["GET"]),
    ]
