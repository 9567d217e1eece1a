"""Watermarking generated images: text and/or a logo, one corner/centre or tiled, re-encoded.

``apply_watermark`` is synchronous CPU work (Pillow): call it through ``asyncio.to_thread``. The
input is decoded with the same limits as uploads (service/media/images.py), so a hostile provider
output gets the same errors (service/media/errors.py) as a hostile upload.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageDraw, ImageFont

from service.media.images import (
    CONTENT_TYPES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    encode,
    open_image,
)

if TYPE_CHECKING:
    from service.settings import Settings

Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]
OutputFormat = Literal["JPEG", "PNG", "WEBP"]
POSITIONS: tuple[Position, ...] = ("top-left", "top-right", "bottom-left", "bottom-right", "center")

_MEASURE_SIZE = 100  # font size at which text is measured before scaling to the target width
_TILE_GAP = 0.5  # gap between tiles, as a fraction of the mark's size
MARK_CACHE_SIZE = 64  # rendered marks kept per process, by (settings, image width, mode)


@dataclass(frozen=True, slots=True)
class WatermarkConfig:
    """How outputs are marked.

    ``scale`` is the mark's width as a fraction of the image width; ``margin`` is the distance from
    the edges as a fraction of the image's shorter side; ``opacity`` 0 leaves the image untouched.
    With both ``text`` and ``logo``, the logo sits above the text.
    """

    text: str | None = "hookline"
    logo: bytes | None = None
    position: Position = "bottom-right"
    margin: float = 0.03
    opacity: float = 0.5
    scale: float = 0.2
    tile: bool = False
    output_format: OutputFormat = "JPEG"
    quality: int = 90
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"watermark position must be one of {POSITIONS}")
        if not 0.0 <= self.opacity <= 1.0:
            raise ValueError("watermark opacity must be within 0..1")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError("watermark scale must be within (0, 1]")
        if not 0.0 <= self.margin <= 0.5:
            raise ValueError("watermark margin must be within 0..0.5")
        if self.output_format not in CONTENT_TYPES or self.output_format in ("GIF", "BMP", "TIFF"):
            raise ValueError("output format must be JPEG, PNG or WEBP")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be within 1..100")

    @classmethod
    def from_settings(cls, settings: Settings) -> WatermarkConfig:
        """The configuration of ``HOOKLINE_WATERMARK_*`` and ``HOOKLINE_OUTPUT_*``; the logo file
        is read once, here."""
        logo = settings.watermark_logo.read_bytes() if settings.watermark_logo else None
        return cls(
            text=settings.watermark_text or None,
            logo=logo,
            position=settings.watermark_position,
            margin=settings.watermark_margin,
            opacity=settings.watermark_opacity,
            scale=settings.watermark_scale,
            tile=settings.watermark_tile,
            output_format=settings.output_format,
            quality=settings.output_quality,
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_image_pixels,
        )


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """A watermarked, encoded output."""

    data: bytes
    width: int
    height: int
    content_type: str


def apply_watermark(data: bytes, cfg: WatermarkConfig) -> RenderedImage:
    """Decode ``data`` (safely), mark it as ``cfg`` says, and encode it in ``cfg.output_format``."""
    img = open_image(data, max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels).image
    mark = _mark_for(cfg, img.width, img.mode)
    if mark is not None:
        spots = (
            _tile_positions(img.size, mark.size)
            if cfg.tile
            else [_place(img.size, mark.size, cfg.position, cfg.margin)]
        )
        _blend(img, mark, spots)
    return RenderedImage(
        data=encode(img, cfg.output_format, cfg.quality),
        width=img.width,
        height=img.height,
        content_type=CONTENT_TYPES[cfg.output_format],
    )


@dataclass(frozen=True, slots=True)
class _Mark:
    """A rendered mark ready to composite onto images of one mode: its pixels in that mode and
    its alpha (for RGBA images, the RGBA mark itself)."""

    colour: Image.Image
    alpha: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.colour.size


@functools.lru_cache(maxsize=MARK_CACHE_SIZE)
def _mark_for(cfg: WatermarkConfig, image_width: int, mode: str) -> _Mark | None:
    """The mark for images ``image_width`` wide in ``mode``, rendered once per (settings, width,
    mode): outputs of one model come in a few sizes, and drawing text is the costly part. The
    cached images are only ever read (composited from), never changed."""
    mark = render_mark(cfg, image_width)
    if mark is None:
        return None
    colour = mark if mode == "RGBA" else mark.convert(mode)
    return _Mark(colour, mark.getchannel("A"))


def render_mark(cfg: WatermarkConfig, image_width: int) -> Image.Image | None:
    """The mark as an RGBA image ``cfg.scale * image_width`` wide, opacity applied; None when
    there is nothing visible to draw."""
    if cfg.opacity <= 0.0 or not (cfg.text or cfg.logo):
        return None
    width = max(1, round(image_width * cfg.scale))
    parts = []
    if cfg.logo:
        parts.append(_logo(cfg.logo, width, cfg))
    if cfg.text:
        parts.append(_text(cfg.text, width))
    mark = Image.new("RGBA", (width, sum(p.height for p in parts)), (0, 0, 0, 0))
    y = 0
    for part in parts:
        mark.alpha_composite(part, ((width - part.width) // 2, y))
        y += part.height
    if cfg.opacity < 1.0:
        alpha = mark.getchannel("A").point(lambda a: round(a * cfg.opacity))
        mark.putalpha(alpha)
    return mark


def _text(text: str, width: int) -> Image.Image:
    """White text with a dark outline (legible on any background), ``width`` pixels wide."""
    probe = ImageFont.load_default(size=_MEASURE_SIZE)
    left, top, right, bottom = probe.getbbox(text)
    size = max(6, int(_MEASURE_SIZE * width / max(1, right - left)))
    font = ImageFont.load_default(size=size)
    stroke = max(1, size // 18)
    left, top, right, bottom = (round(v) for v in font.getbbox(text, stroke_width=stroke))
    canvas = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (-left, -top),
        text,
        font=font,
        fill=(255, 255, 255, 255),
        stroke_width=stroke,
        stroke_fill=(0, 0, 0, 255),
    )
    if canvas.width > width:  # integer font sizes can overshoot by a pixel or two
        height = max(1, round(canvas.height * width / canvas.width))
        canvas = canvas.resize((width, height), Image.Resampling.LANCZOS)
    return canvas


def _logo(data: bytes, width: int, cfg: WatermarkConfig) -> Image.Image:
    logo = open_image(data, max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels).image
    logo = logo.convert("RGBA")
    height = max(1, round(logo.height * width / logo.width))
    return logo.resize((width, height), Image.Resampling.LANCZOS)


def _place(
    size: tuple[int, int], mark: tuple[int, int], position: Position, margin: float
) -> tuple[int, int]:
    (w, h), (mw, mh) = size, mark
    pad = round(min(w, h) * margin)
    x = {"left": pad, "right": w - mw - pad}
    y = {"top": pad, "bottom": h - mh - pad}
    if position == "center":
        return (w - mw) // 2, (h - mh) // 2
    vertical, horizontal = position.split("-")
    return x[horizontal], y[vertical]


def _tile_positions(size: tuple[int, int], mark: tuple[int, int]) -> list[tuple[int, int]]:
    """A staggered grid covering the image, every other row shifted by half a step."""
    (w, h), (mw, mh) = size, mark
    step_x = max(1, round(mw * (1 + _TILE_GAP)))
    step_y = max(1, round(mh * (1 + 2 * _TILE_GAP)))
    positions: list[tuple[int, int]] = []
    for row, y in enumerate(range(-mh // 2, h, step_y)):
        shift = (step_x // 2) if row % 2 else 0
        positions.extend((x, y) for x in range(-mw // 2 - shift, w, step_x))
    return positions


def _blend(img: Image.Image, mark: _Mark, spots: list[tuple[int, int]]) -> None:
    """Composite ``mark`` onto ``img`` in place at each spot, clipped to the image."""
    if img.mode == "RGBA":
        width, height = mark.size
        for x, y in spots:
            left, top = max(0, x), max(0, y)
            right, bottom = min(img.width, x + width), min(img.height, y + height)
            if right > left and bottom > top:
                piece = mark.colour.crop((left - x, top - y, right - x, bottom - y))
                img.alpha_composite(piece, (left, top))
        return
    # RGB / L: paste through the mark's alpha (a blend), cheaper than an RGBA round trip.
    for spot in spots:
        img.paste(mark.colour, spot, mark.alpha)
