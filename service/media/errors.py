"""Errors of the media room: images that cannot be used, URLs that cannot be fetched.

Raised wherever untrusted bytes are decoded (uploads, URL inputs, provider outputs before they are
watermarked), so they are domain errors, not HTTP ones:

    BadRequest (statemachine/errors.py)
    ├── InvalidImage       ``empty_body``, ``invalid_image`` (truncated, corrupt, not an image)
    ├── ImageTooLarge      ``upload_too_large`` (bytes), ``image_too_large`` (pixels, bombs)
    ├── UnsupportedImage   ``unsupported_media_type`` (not image/*), ``unsupported_format``
    ├── OverBudget         ``over_memory_budget``: more memory than the whole media budget
    │                      (service/media/budget.py) — it could never be granted
    └── FetchError         a URL that could not (or may not) be fetched (service/media/fetch.py)

How a client sees each of them is decided in service/http/errors.py.
"""

from __future__ import annotations

from statemachine.errors import BadRequest


class InvalidImage(BadRequest):
    """Bytes that are not a decodable image: empty, truncated, corrupt, or something else."""

    code = "invalid_image"


class ImageTooLarge(BadRequest):
    """An image over the byte or pixel limit, or one Pillow calls a decompression bomb."""

    code = "image_too_large"


class UnsupportedImage(BadRequest):
    """Not declared as an image, or an image format hookline does not accept."""

    code = "unsupported_format"


class OverBudget(BadRequest):
    """A fetch or decode that needs more memory than the process's whole media budget allows at
    once: it could never run, so it is refused rather than left waiting."""

    code = "over_memory_budget"
