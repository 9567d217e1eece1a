"""Decoding, normalising and encoding images with Pillow, safely.

Pure synchronous functions: callers run them in a thread (``asyncio.to_thread``), never on the
event loop. Every decode is bounded per call — bytes, then pixels read from the header before any
pixel is decoded — without touching Pillow's process-wide ``Image.MAX_IMAGE_PIXELS``.

Errors (service/media/errors.py; their HTTP statuses are service/http/errors.py's):
    InvalidImage       ``empty_body``, ``invalid_image`` (truncated, corrupt, not an image)
    ImageTooLarge      ``upload_too_large`` (bytes), ``image_too_large`` (pixels, bombs)
    UnsupportedImage   ``unsupported_media_type`` (not image/*), ``unsupported_format``
"""

from __future__ import annotations

import base64
import contextlib
import io
from dataclasses import dataclass
from typing import Literal, overload

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from service.media.errors import ImageTooLarge, InvalidImage, UnsupportedImage

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
UPLOAD_JPEG_QUALITY = 92

CONTENT_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}

# Magic numbers of image formats we recognise but refuse (UnsupportedImage, not InvalidImage).
_OTHER_IMAGE_MAGIC: tuple[tuple[int, bytes], ...] = (
    (4, b"ftypheic"),
    (4, b"ftypheix"),
    (4, b"ftypmif1"),
    (4, b"ftypavif"),
    (0, b"\x00\x00\x01\x00"),  # ICO
    (0, b"8BPS"),  # PSD
    (0, b"\x00\x00\x00\x0cjP  "),  # JPEG 2000
    (0, b"\xff\x4f\xff\x51"),  # JPEG 2000 codestream
    (0, b"qoif"),
    (0, b"%!PS"),
    (0, b"<svg"),
    (0, b"\xff\x0a"),  # JPEG XL
    (0, b"DDS "),
)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ERR_INVALID = "invalid_image"


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A normalised upload: re-encoded ``data`` (JPEG, or PNG when it has alpha), no metadata."""

    data: bytes
    width: int
    height: int
    content_type: str
    format: str  # of ``data``: "JPEG" or "PNG"
    source_format: str  # sniffed from the input: one of ACCEPTED_FORMATS
    animated_first_frame: bool = False  # the input was animated; only frame 0 was kept


@dataclass(frozen=True, slots=True)
class OpenedImage:
    """A fully decoded, oriented, 8-bit image (mode L, RGB or RGBA) and where it came from."""

    image: Image.Image
    source_format: str
    animated: bool


def decode_upload(
    data: bytes,
    content_type: str | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Check and normalise an uploaded image.

    ``content_type`` must be ``image/*`` when given (``UnsupportedImage`` otherwise); the format
    is sniffed from the bytes and must be one of ACCEPTED_FORMATS. The EXIF orientation is
    applied, CMYK becomes RGB, 16-bit becomes 8-bit, metadata is dropped. Images with transparency
    keep it and are stored as PNG, the rest as JPEG (quality 92). Animated GIF/WebP: **only the
    first frame is kept** (``animated_first_frame=True`` says so).
    """
    if content_type is not None:
        base = content_type.split(";", 1)[0].strip().lower()
        if not base.startswith("image/"):
            raise UnsupportedImage(
                f"expected an image/* body, got {base or 'no type'!r}",
                code="unsupported_media_type",
            )
    opened = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    img = opened.image
    fmt = "PNG" if img.mode == "RGBA" else "JPEG"
    return DecodedImage(
        data=encode(img, fmt, UPLOAD_JPEG_QUALITY),
        width=img.width,
        height=img.height,
        content_type=CONTENT_TYPES[fmt],
        format=fmt,
        source_format=opened.source_format,
        animated_first_frame=opened.animated,
    )


def open_image(data: bytes, *, max_bytes: int, max_pixels: int) -> OpenedImage:
    """Decode untrusted bytes into an 8-bit L/RGB/RGBA image, within the given limits.

    Never crashes on hostile input: every decoder failure is ``InvalidImage``, a size over the
    limits (or one Pillow calls a decompression bomb) is ``ImageTooLarge``.
    """
    if not data:
        raise InvalidImage("the body is empty", code="empty_body")
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, the limit is {max_bytes}",
            code="upload_too_large",
            details={"bytes": len(data), "max_bytes": max_bytes},
        )
    img = _open_header(data)
    source_format = str(img.format)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has no pixels", code=_ERR_INVALID)
    if width * height > max_pixels:
        raise _too_large(width, height, max_pixels)
    animated = bool(getattr(img, "is_animated", False))
    try:
        if animated:
            img.seek(0)
        img.load()
        img = _orient(img)
        img = _to_8bit(img)
        img.info = {}  # comments, EXIF, XMP, ICC: nothing of the source's metadata is re-encoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(width, height, max_pixels) from exc
    except MemoryError as exc:
        raise _too_large(width, height, max_pixels) from exc
    except Exception as exc:
        # Decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError… on hostile
        # input; all of them mean the same thing to the caller.
        raise InvalidImage(f"the image could not be decoded: {exc}", code=_ERR_INVALID) from exc
    return OpenedImage(image=img, source_format=source_format, animated=animated)


def _open_header(data: bytes) -> Image.Image:
    """Parse the header only (no pixels yet), restricted to the accepted formats."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable when max_pixels exceeds Pillow's own global limit.
        raise ImageTooLarge("image is a decompression bomb", code="image_too_large") from exc
    except UnidentifiedImageError as exc:
        if any(data[at : at + len(magic)] == magic for at, magic in _OTHER_IMAGE_MAGIC):
            raise UnsupportedImage(
                f"image format not supported; use one of {', '.join(ACCEPTED_FORMATS)}",
                code="unsupported_format",
            ) from exc
        raise InvalidImage("the body is not a recognisable image", code=_ERR_INVALID) from exc
    except Exception as exc:
        raise InvalidImage(f"the image header is invalid: {exc}", code=_ERR_INVALID) from exc


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
        code="image_too_large",
        details={"width": width, "height": height, "max_pixels": max_pixels},
    )


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (in place: no copy when upright); convert an embedded ICC
    profile to sRGB. A corrupt EXIF block or profile costs that step, not the upload."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA"):
        with contextlib.suppress(Exception):
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                img, src, ImageCms.createProfile("sRGB"), outputMode=img.mode
            )
            if converted is not None:
                return converted
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """Normalise any decoded mode to L, RGB or RGBA (alpha kept)."""
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_l(img)
    if mode == "P":
        palette_alpha = img.palette is not None and img.palette.mode == "RGBA"
        has_alpha = "transparency" in img.info or palette_alpha
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode in _ALPHA_MODES:
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _scale_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale to 8 bits, mapping the value range linearly."""
    wide = img.convert("F")
    lo, hi = wide.getextrema()
    lo_f, hi_f = float(lo), float(hi)  # type: ignore[arg-type]
    if lo_f >= 0 and hi_f <= 255:
        return wide.convert("L")
    top = 65535.0 if lo_f >= 0 and hi_f <= 65535 else hi_f
    bottom = 0.0 if top == 65535.0 else lo_f
    span = top - bottom or 1.0
    return wide.point(lambda v: (v - bottom) * (255.0 / span)).convert("L")


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode ``img`` as JPEG, PNG or WEBP without metadata. JPEG has no alpha: a transparent image
    is flattened onto white."""
    fmt = fmt.upper()
    out = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L"):
            img = _flatten(img)
        img.save(out, "JPEG", quality=quality, comment=b"")
    elif fmt == "PNG":
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA")
        img.save(out, "PNG", compress_level=6, icc_profile=None)
    elif fmt == "WEBP":
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if img.mode in _ALPHA_MODES else "RGB")
        img.save(out, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"cannot encode {fmt!r}; use JPEG, PNG or WEBP")
    return out.getvalue()


def _flatten(img: Image.Image) -> Image.Image:
    if img.mode not in _ALPHA_MODES:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


@overload
def prepare_input(
    data: bytes,
    *,
    max_side: int,
    formats: tuple[str, ...],
    data_uri: Literal[True],
    max_bytes: int = ...,
    max_pixels: int = ...,
) -> str: ...
@overload
def prepare_input(
    data: bytes,
    *,
    max_side: int,
    formats: tuple[str, ...],
    data_uri: Literal[False],
    max_bytes: int = ...,
    max_pixels: int = ...,
) -> bytes: ...
@overload
def prepare_input(
    data: bytes,
    *,
    max_side: int,
    formats: tuple[str, ...],
    data_uri: bool,
    max_bytes: int = ...,
    max_pixels: int = ...,
) -> bytes | str: ...
def prepare_input(
    data: bytes,
    *,
    max_side: int,
    formats: tuple[str, ...],
    data_uri: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes | str:
    """An input image as a provider accepts it: at most ``max_side`` on its longer side (aspect
    kept, never upscaled), in one of ``formats`` (PNG/WEBP preferred when there is alpha, else
    JPEG), without metadata; as bytes, or as a ``data:`` URI when ``data_uri``."""
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    opened = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    img = opened.image
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    fmt = _pick_format(img, tuple(f.upper() for f in formats))
    out = encode(img, fmt, UPLOAD_JPEG_QUALITY)
    if not data_uri:
        return out
    return f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(out).decode('ascii')}"


def _pick_format(img: Image.Image, formats: tuple[str, ...]) -> str:
    usable = [f for f in formats if f in ("JPEG", "PNG", "WEBP")]
    if not usable:
        raise ValueError(f"none of {formats} can be produced; use JPEG, PNG or WEBP")
    preferred = ("PNG", "WEBP", "JPEG") if img.mode == "RGBA" else ("JPEG", "WEBP", "PNG")
    return next(f for f in preferred if f in usable)


def sniff_content_type(data: bytes) -> str | None:
    """The content type of ``data`` from its magic number, for the accepted formats; else None."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:2] == b"BM":
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None
