"""Decoding, normalising and encoding images with Pillow, safely.

Pure synchronous functions: callers run them in a thread (``asyncio.to_thread``), never on the
event loop. Every decode is bounded per call — bytes, then pixels read from the header before any
pixel is decoded — without touching Pillow's process-wide ``Image.MAX_IMAGE_PIXELS``.

**The pixel limit** (``DEFAULT_MAX_PIXELS``, ``HOOKLINE_MAX_IMAGE_PIXELS``) is 4096² ≈ 16.8 MP:
an image is only ever used as a provider input, at most 2048 px on its longer side (``Limits`` in
callbacks/), and twice that on each side leaves every provider a clean downscale. It bounds what
one decode holds: Pillow keeps 8-bit colour in 4 bytes a pixel, so ≤ 64 MB of pixels.

**JPEG decodes at a DCT scale** (Pillow's ``draft``: libjpeg decodes at 1/2, 1/4 or 1/8 size,
skipping most of the work) where the result is smaller anyway:
- a JPEG over the pixel limit (phones take 24–50 MP photos) is decoded at the smallest scale,
  1/2 or 1/4, that brings it within the limit (``shrink=True``: uploads and provider inputs),
  instead of being refused; other formats over the limit are refused, as they cannot be decoded
  cheaply. An upload within the limit is decoded and stored exactly as before.
- a JPEG the caller will downscale to fit ``fit`` px (``prepare_input``) is decoded at the
  smallest scale that leaves at least twice the final size: ``Image.thumbnail``'s own rule
  (``reducing_gap=2.0``). Its result differs from a full decode's far less than the JPEG encode
  that follows does (tests/unit/test_images.py: ≥ 40 dB PSNR on a sharp, noisy image, 10 dB
  better than that encode; ~55 dB on a smooth one).

``plan_decode`` reads only the header and says what a decode will cost (``DecodePlan``:
``peak_bytes``), so callers can reserve it in the media memory budget (service/media/budget.py)
before decoding.

Errors (service/media/errors.py; their HTTP statuses are service/http/errors.py's):
    InvalidImage       ``empty_body``, ``invalid_image`` (truncated, corrupt, not an image)
    ImageTooLarge      ``upload_too_large`` (bytes), ``image_too_large`` (pixels, bombs)
    UnsupportedImage   ``unsupported_media_type`` (not image/*), ``unsupported_format``
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from dataclasses import dataclass
from typing import IO, Final, Literal, overload

from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from service.media.errors import ImageTooLarge, InvalidImage, UnsupportedImage

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 4096 * 4096  # see the module docstring
UPLOAD_JPEG_QUALITY = 92
SHRINK_SCALES = (2, 4)  # the DCT scales a JPEG over the pixel limit may be decoded at
DRAFT_GAP = 2.0  # a JPEG decoded for a downscale keeps >= this x the final size (thumbnail's)

# PNG text chunks are decoded when the header is read, before any limit on pixels applies, and
# hookline drops them anyway: hold at most this much of them (Pillow's default is 64 MB).
PngImagePlugin.MAX_TEXT_MEMORY = 1_000_000

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
# bytes per pixel as Pillow stores a mode (multi-band 8-bit modes take 4; the default)
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_NORMAL_MODES = frozenset({"L", "RGB", "RGBA"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: a phone's JPEG with extra frames after it


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
class DecodePlan:
    """How an image will be decoded, read from its header alone (no pixel decoded yet)."""

    source_format: str
    mode: str
    size: tuple[int, int]  # as the header declares it
    scale: int  # the JPEG DCT scale it is decoded at; 1: full size
    final_size: tuple[int, int]  # after the caller's downscale (``fit``), else the decoded size
    converted: bool  # orientation, colour profile or mode: a full-size copy is made
    data_bytes: int

    @property
    def decoded_size(self) -> tuple[int, int]:
        width, height = self.size
        return -(-width // self.scale), -(-height // self.scale)

    @property
    def peak_bytes(self) -> int:
        """An upper estimate of the memory the decode holds at its peak: the input bytes, the
        decoded pixels, then the larger of a converted copy, a downscale (its intermediate and
        result) and the encoded output (never more than the raw pixels it encodes)."""
        width, height = self.decoded_size
        final_w, final_h = self.final_size
        final = final_w * final_h * 4
        decoded = width * height * _STORED_BYTES.get(self.mode, 4)
        copy = width * height * 4 if self.converted else 0
        downscale = final_w * height * 4 + final if self.final_size != (width, height) else 0
        # the decoded pixels with a copy or a downscale; then the result and its encoding
        return self.data_bytes + max(decoded + max(copy, downscale), final + final)


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
    first frame is kept** (``animated_first_frame=True`` says so). A JPEG over ``max_pixels`` is
    decoded at 1/2 or 1/4 size (see the module docstring); its width and height say so.
    """
    check_content_type(content_type)
    opened = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, shrink=True)
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


def check_content_type(content_type: str | None) -> None:
    """``UnsupportedImage`` unless ``content_type`` is absent or ``image/*``."""
    if content_type is None:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if not base.startswith("image/"):
        raise UnsupportedImage(
            f"expected an image/* body, got {base or 'no type'!r}",
            code="unsupported_media_type",
        )


def plan_decode(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: int | None = None,
    shrink: bool = False,
) -> DecodePlan:
    """How ``open_image`` with the same arguments will decode ``data``, from its header alone:
    the same refusals (bytes, format, pixels), and ``peak_bytes`` to reserve before decoding."""
    return _plan(_checked_header(data, max_bytes), len(data), max_pixels, fit, shrink)


def conforms(
    data: bytes,
    *,
    max_side: int,
    formats: tuple[str, ...],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bool:
    """Whether ``data`` can go to a provider exactly as it is, judged from its header alone
    (nothing decoded): a still image in one of ``formats``, at most ``max_side`` on its longer
    side, in 8-bit L/RGB/RGBA, with no EXIF block (so no rotation and no camera metadata) and no
    colour profile. What ``prepare_input`` would return for it is then only a re-encoding.
    A header that cannot be read is not conforming (``prepare_input`` says why)."""
    try:
        img = _checked_header(data, max_bytes)
    except (InvalidImage, ImageTooLarge, UnsupportedImage):
        return False
    info = img.info
    return (
        str(img.format) in {f.upper() for f in formats}
        and max(img.size) <= max_side
        and img.mode in _NORMAL_MODES
        and "exif" not in info
        and "icc_profile" not in info
        and not getattr(img, "is_animated", False)
    )


def expected_format(mode: str, formats: tuple[str, ...]) -> str:
    """The format ``prepare_input`` encodes a normalised image of ``mode`` in (L, RGB, RGBA)."""
    return _pick_format(mode, tuple(f.upper() for f in formats))


def open_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    fit: int | None = None,
    shrink: bool = False,
) -> OpenedImage:
    """Decode untrusted bytes into an 8-bit L/RGB/RGBA image, within the given limits.

    ``fit``: the caller will downscale the result to fit in ``fit`` x ``fit``, so a JPEG may be
    decoded at a DCT scale still leaving twice that. ``shrink``: a JPEG over ``max_pixels`` is
    decoded at the DCT scale (1/2, 1/4) that brings it within, instead of being refused.

    Never crashes on hostile input: every decoder failure is ``InvalidImage``, a size over the
    limits (or one Pillow calls a decompression bomb) is ``ImageTooLarge``.
    """
    img = _checked_header(data, max_bytes)
    plan = _plan(img, len(data), max_pixels, fit, shrink)
    width, height = plan.size
    animated = bool(getattr(img, "is_animated", False))
    try:
        if animated:
            img.seek(0)
        if plan.scale > 1:
            img.draft(None, (width // plan.scale, height // plan.scale))
            if img.width * img.height > max_pixels:  # a JPEG libjpeg would not scale
                raise _too_large(width, height, max_pixels)
        img.load()
        img = _orient(img)
        img = _to_8bit(img)
        img.info = {}  # comments, EXIF, XMP, ICC: nothing of the source's metadata is re-encoded
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(width, height, max_pixels) from exc
    except MemoryError as exc:
        raise _too_large(width, height, max_pixels) from exc
    except Exception as exc:
        # Decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError… on hostile
        # input; all of them mean the same thing to the caller.
        raise InvalidImage(f"the image could not be decoded: {exc}", code=_ERR_INVALID) from exc
    return OpenedImage(image=img, source_format=plan.source_format, animated=animated)


def _checked_header(data: bytes, max_bytes: int) -> Image.Image:
    if not data:
        raise InvalidImage("the body is empty", code="empty_body")
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, the limit is {max_bytes}",
            code="upload_too_large",
            details={"bytes": len(data), "max_bytes": max_bytes},
        )
    img = _open_header(data)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has no pixels", code=_ERR_INVALID)
    return img


def _plan(
    img: Image.Image, data_bytes: int, max_pixels: int, fit: int | None, shrink: bool
) -> DecodePlan:
    """The DCT scale (JPEG only) and sizes of a decode; ``ImageTooLarge`` over the limit."""
    width, height = img.size
    jpeg = img.format in _JPEG_FORMATS
    final = _fitted(img.size, fit)
    scale = 1
    if jpeg and final != img.size:
        wanted_w, wanted_h = max(1, int(final[0] * DRAFT_GAP)), max(1, int(final[1] * DRAFT_GAP))
        scale = _dct_scale(min(width // wanted_w, height // wanted_h))
    if width * height > max_pixels:
        fitting = [s for s in SHRINK_SCALES if -(-width // s) * -(-height // s) <= max_pixels]
        if not (jpeg and shrink and fitting):
            raise _too_large(width, height, max_pixels, shrinkable=shrink)
        scale = max(scale, fitting[0])
    decoded = -(-width // scale), -(-height // scale)
    info = img.info
    converted = img.mode not in _NORMAL_MODES or "exif" in info or "icc_profile" in info
    return DecodePlan(
        source_format=str(img.format),
        mode=img.mode,
        size=(width, height),
        scale=scale,
        final_size=_fitted(decoded, fit),
        converted=converted,
        data_bytes=data_bytes,
    )


def _fitted(size: tuple[int, int], fit: int | None) -> tuple[int, int]:
    """``size`` scaled down to fit in ``fit`` x ``fit``, aspect kept (as ``Image.thumbnail``)."""
    width, height = size
    if fit is None or max(width, height) <= fit:
        return size
    if width >= height:
        return fit, max(1, round(height * fit / width))
    return max(1, round(width * fit / height)), fit


def _dct_scale(ratio: int) -> int:
    """The largest DCT scale libjpeg decodes at (1, 2, 4, 8) that is at most ``ratio``."""
    return next(s for s in (8, 4, 2, 1) if s <= max(ratio, 1))


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


def _too_large(
    width: int, height: int, max_pixels: int, *, shrinkable: bool = False
) -> ImageTooLarge:
    hint = (
        f" (a JPEG of up to {SHRINK_SCALES[-1] ** 2} times that is decoded at a smaller scale;"
        " resize other formats)"
        if shrinkable
        else ""
    )
    return ImageTooLarge(
        f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}{hint}",
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
    if fmt != "JPEG":
        out = io.BytesIO()
        _save(img, fmt, quality, out)
        return out.getvalue()
    with _jpeg_scratch() as scratch:
        _save(img, fmt, quality, scratch)
        scratch.seek(0)
        return scratch.read()


def _jpeg_scratch() -> IO[bytes]:
    """Where a JPEG is encoded: a file in memory with a descriptor (Linux's memfd), else a
    ``BytesIO`` (no memfd on the platform, or none to be had: no descriptors left, a sandbox
    refusing it). Pillow's JPEG encoder releases the GIL when it writes to a descriptor and holds
    it for a ``BytesIO``: two threads ran the 0.4 ms encode of each output 1.8x instead of 1.1x, at
    the same cost (bench/RESULTS.md). PNG and WebP gain nothing (Pillow writes them through
    Python either way), so they stay in a ``BytesIO``, whose buffer is handed over uncopied.

    The output is held twice for a moment (the memfd's pages, the bytes read from them): at most
    1.7 bytes a pixel each at quality 100 on pure noise, within the ``final + final`` of
    ``DecodePlan.peak_bytes``."""
    if _MEMFD is not None:
        try:
            fd = _MEMFD("hookline-encode", os.MFD_CLOEXEC)
        except OSError:
            return io.BytesIO()
        try:
            return open(fd, "w+b")
        except BaseException:
            os.close(fd)
            raise
    return io.BytesIO()


_MEMFD: Final = getattr(os, "memfd_create", None)


def _save(img: Image.Image, fmt: str, quality: int, out: IO[bytes]) -> None:
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
    JPEG), without metadata; as bytes, or as a ``data:`` URI when ``data_uri``. A large JPEG is
    decoded at a DCT scale (``plan_decode(data, fit=max_side, shrink=True)`` says which)."""
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    opened = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, fit=max_side, shrink=True)
    img = opened.image
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    fmt = _pick_format(img.mode, tuple(f.upper() for f in formats))
    out = encode(img, fmt, UPLOAD_JPEG_QUALITY)
    if not data_uri:
        return out
    return f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(out).decode('ascii')}"


def _pick_format(mode: str, formats: tuple[str, ...]) -> str:
    usable = [f for f in formats if f in ("JPEG", "PNG", "WEBP")]
    if not usable:
        raise ValueError(f"none of {formats} can be produced; use JPEG, PNG or WEBP")
    preferred = ("PNG", "WEBP", "JPEG") if mode == "RGBA" else ("JPEG", "WEBP", "PNG")
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
