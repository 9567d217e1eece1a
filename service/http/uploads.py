"""``POST /v1/uploads``: a raw image body, checked and normalised off the event loop.

What one upload may cost is bounded three ways: its bytes (``max_upload_bytes``), its pixels
(``max_image_pixels``, read from the header before any pixel is decoded: service/media/images.py),
and how many a user runs at once (``upload_decodes_per_user``: one more answers 429
``too_many_concurrent_uploads``, before its body is read). The decode reserves its estimated peak
memory in the process's media budget (service/media/budget.py), shared with the fetches and the
steps' decodes, so concurrent uploads wait for memory instead of exhausting it.
"""

from __future__ import annotations

import asyncio
import hashlib

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.blobs.base import extension_for, upload_key
from service.http.requests import caller, guards, read_body
from service.http.state import web
from service.http.views import upload_json
from service.media.images import DecodedImage, check_content_type, decode_upload, plan_decode
from service.runtime import Runtime


async def create_upload(request: Request) -> Response:
    state = web(request)
    rt = state.runtime
    user = await caller(request)
    settings = rt.settings
    content_type = request.headers.get("content-type")
    check_content_type(content_type)  # 415 before reading a body that cannot be an image
    with guards(request).uploads.take(user.name):
        # Read at most one byte past the limit so decode_upload can answer 413 itself.
        data = await read_body(request, settings.max_upload_bytes)
        image = await _decode(rt, data, content_type)
        digest = hashlib.sha256(image.data).hexdigest()[:32]
        key = upload_key(user.name, digest, extension_for(image.content_type))
        await rt.blobs.put(key, image.data, image.content_type)
    state.uploads.put(key, True, rt.now())  # it exists: task creation need not ask the store
    body = upload_json(key, image.width, image.height, image.content_type, len(image.data))
    return JSONResponse(body, status_code=201)


async def _decode(rt: Runtime, data: bytes, content_type: str | None) -> DecodedImage:
    """Decode in a thread, with its peak memory (estimated from the header) reserved."""
    settings = rt.settings
    limits = {"max_bytes": settings.max_upload_bytes, "max_pixels": settings.max_image_pixels}
    plan = await asyncio.to_thread(plan_decode, data, shrink=True, **limits)
    return await rt.media_budget.in_thread(
        plan.peak_bytes, decode_upload, data, content_type, **limits
    )


def routes() -> list[Route]:
    return [Route("/v1/uploads", create_upload, methods=["POST"])]
