"""Real PNG outputs for the simulator, derived deterministically from the inputs.

The output starts from the input image (or, without one, from a gradient seeded by the prompt),
gets a transform and a tint chosen by a hash of the prompt, and a caption of the prompt. The same
inputs always give the same bytes; a different input image gives different pixels.

Everything here is CPU work: callers run ``render_png`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, UnidentifiedImageError

DEFAULT_SIDE = 1024
MIN_SIDE = 16
MAX_SIDE = 2048  # 4 outputs of 2048x2048 bound a prediction's render (CPU and memory)
# 4096x4096: hookline never sends more than 2048 a side (callbacks/replicate.py LIMITS); a bigger
# input would only cost the simulator memory (about 3 bytes a pixel once decoded)
MAX_INPUT_PIXELS = 4096 * 4096
CAPTION_CHARS = 48


class InputImageError(ValueError):
    """The input bytes are not an image this simulator can read (or are far too large)."""


def output_size(params: Mapping[str, Any]) -> tuple[int, int]:
    """``width`` / ``height`` from the model input, default 1024; ``ValueError`` for anything
    but a number of pixels in [16, 2048] (as a model's input schema would refuse it)."""

    def side(name: str) -> int:
        value = params.get(name, DEFAULT_SIDE)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not MIN_SIDE <= value <= MAX_SIDE
        ):
            raise ValueError(
                f"input.{name} must be a number of pixels from {MIN_SIDE} to {MAX_SIDE}"
            )
        return int(value)

    return side("width"), side("height")


def render_png(
    *, prompt: str, input_image: bytes | None, size: tuple[int, int], index: int = 0
) -> bytes:
    """Render output number ``index`` of a prediction as PNG bytes."""
    prompt_hash = hashlib.sha256(prompt.encode()).digest()
    output_hash = hashlib.sha256(prompt_hash + index.to_bytes(4, "big")).digest()
    if input_image is None:
        image = _gradient(output_hash, size)
    else:
        image = ImageOps.fit(decode_input(input_image), size, Image.Resampling.BILINEAR)
    transform = _TRANSFORMS[prompt_hash[0] % len(_TRANSFORMS)]
    image = transform(image, prompt_hash)
    image = _tint(image, output_hash)
    _caption(image, prompt)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def decode_input(data: bytes) -> Image.Image:
    """Decode an input image to RGB, refusing non-images and decompression bombs."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_INPUT_PIXELS:
                raise InputImageError(f"input image too large: {width}x{height} pixels")
            probe.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale
            image = ImageOps.exif_transpose(probe).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"input is not a readable image: {exc}") from exc
    return image


def _gradient(digest: bytes, size: tuple[int, int]) -> Image.Image:
    """A colourful gradient whose angles and offsets come from ``digest``."""
    red = Image.linear_gradient("L").rotate(digest[1] * 360 / 256)
    green = Image.radial_gradient("L").point(lambda v: (v + digest[2]) % 256)
    blue = Image.linear_gradient("L").rotate(digest[3] * 360 / 256 + 90)
    return Image.merge("RGB", (red, green, blue)).resize(size, Image.Resampling.BILINEAR)


def _posterise(image: Image.Image, digest: bytes) -> Image.Image:
    return ImageOps.posterize(image, 2 + digest[4] % 3)


def _colour_shift(image: Image.Image, digest: bytes) -> Image.Image:
    red, green, blue = image.split()
    return Image.merge("RGB", (green, blue, red) if digest[4] % 2 else (blue, red, green))


def _blur(image: Image.Image, digest: bytes) -> Image.Image:
    radius = max(1.0, min(image.size) / 256) * (1 + digest[4] % 4)
    return image.filter(ImageFilter.GaussianBlur(radius))


def _mirror(image: Image.Image, digest: bytes) -> Image.Image:
    return ImageOps.mirror(image) if digest[4] % 2 else ImageOps.flip(image)


_TRANSFORMS: tuple[Callable[[Image.Image, bytes], Image.Image], ...] = (
    _posterise,
    _colour_shift,
    _blur,
    _mirror,
)


def _tint(image: Image.Image, digest: bytes) -> Image.Image:
    colour = (digest[5], digest[6], digest[7])
    return Image.blend(image, Image.new("RGB", image.size, colour), 0.25)


def _caption(image: Image.Image, prompt: str) -> None:
    """Draw the start of the prompt on a dark band at the bottom."""
    text = " ".join(prompt.split())
    if len(text) > CAPTION_CHARS:
        text = text[: CAPTION_CHARS - 1] + "…"
    if not text:
        return
    width, height = image.size
    font_px = max(8, height // 28)
    font = ImageFont.load_default(size=font_px)
    band_top = height - font_px * 2
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, band_top, width, height), fill=(16, 16, 16))
    draw.text((font_px // 2, band_top + font_px // 2), text, fill=(240, 240, 240), font=font)
