"""``POST /v1/uploads``: a raw image body, checked and normalised off the event loop."""

from __future__ import annotations

import asyncio
import hashlib

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.blobs.base import extension_for, upload_key
from service.http.requests import caller, read_body
from service.http.state import web
from service.http.views import upload_json
from service.media.images import decode_upload


async def create_upload(request: Request) -> Response:
    state = web(request)
    rt = state.runtime
    user = await caller(request)
    settings = rt.settings
    content_type = request.headers.get("content-type")
    # Read at most one byte past the limit so decode_upload can answer 413 itself.
    data = await read_body(request, settings.max_upload_bytes)
    image = await asyncio.to_thread(
        decode_upload,
        data,
        content_type,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
    )
    digest = hashlib.sha256(image.data).hexdigest()[:32]
    key = upload_key(user.name, digest, extension_for(image.content_type))
    await rt.blobs.put(key, image.data, image.content_type)
    state.uploads.put(key, True, rt.now())  # it exists: task creation need not ask the store
    body = upload_json(key, image.width, image.height, image.content_type, len(image.data))
    return JSONResponse(body, status_code=201)


def routes() -> list[Route]:
    return [Route("/v1/uploads", create_upload, methods=["POST"])]
