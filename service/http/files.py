"""``GET /files/{key}``: the local blob store's files behind signed, expiring URLs
(service/blobs/local.py signs and verifies them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.blobs.base import content_type_for_key
from service.blobs.local import LocalBlobStore
from statemachine import clock


def file_route(store: LocalBlobStore) -> Route:
    """``GET /files/{key:path}?exp=&sig=``: the bytes of a blob behind a signed, expiring URL.

    Errors are raised, not rendered: the app's exception handlers map them (403, 404)."""

    async def serve_file(request: Request) -> Response:
        key = request.path_params["key"]
        exp = request.query_params.get("exp", "")
        now = clock.now()
        store.verify_signature(key, exp, request.query_params.get("sig", ""), now)
        data = await store.get(key)
        max_age = max(0, int(exp) - int(now))
        return Response(
            data,
            media_type=content_type_for_key(key),
            headers={
                "Cache-Control": f"private, max-age={max_age}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return Route("/files/{key:path}", serve_file, methods=["GET"], name="files")
