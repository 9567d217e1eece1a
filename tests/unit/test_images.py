"""Upload decoding and normalisation: clear errors for bad input, and the normalised output."""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import math
import os
import random
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFile, ImageStat, PngImagePlugin

from service.http.errors import http_status
from service.media import images
from service.media.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from service.media.images import (
    DEFAULT_MAX_PIXELS,
    decode_upload,
    encode,
    open_image,
    plan_decode,
    prepare_input,
    sniff_content_type,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def save(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    """A pixel as a tuple, whatever the mode."""
    value = img.getpixel(xy)
    assert value is not None
    return tuple(int(v) for v in value) if isinstance(value, tuple) else (int(value),)


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=False))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is garbage: decoding
    it would fail, so a 413 proves the size was refused before any pixel was decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"not zlib")
        + chunk(b"IEND", b"")
    )


# -- refusals ------------------------------------------------------------------------------------


def test_empty_body_is_422_empty_body() -> None:
    with pytest.raises(InvalidImage) as err:
        decode_upload(b"", "image/png")
    assert (http_status(err.value), err.value.code) == (422, "empty_body")


def test_body_over_max_bytes_is_413() -> None:
    data = save(Image.new("RGB", (64, 64), RED), "PNG")
    with pytest.raises(ImageTooLarge) as err:
        decode_upload(data, "image/png", max_bytes=len(data) - 1)
    assert http_status(err.value) == 413


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "application/pdf"])
def test_non_image_content_type_is_415(content_type: str) -> None:
    data = save(Image.new("RGB", (8, 8), RED), "PNG")
    with pytest.raises(UnsupportedImage) as err:
        decode_upload(data, content_type)
    assert http_status(err.value) == 415


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    with pytest.raises(ImageTooLarge) as err:
        decode_upload(png_header_only(8000, 8000), "image/png", max_pixels=40_000_000)
    assert err.value.code == "image_too_large"
    assert err.value.details["width"] == 8000


def test_pixel_limit_is_per_call_not_global() -> None:
    """A generous limit on one call and a strict one on the next: the global stays untouched."""
    global_limit = Image.MAX_IMAGE_PIXELS
    data = save(Image.new("RGB", (100, 100), RED), "PNG")
    assert decode_upload(data, "image/png", max_pixels=10_000).width == 100
    with pytest.raises(ImageTooLarge):
        decode_upload(data, "image/png", max_pixels=9_999)
    assert global_limit == Image.MAX_IMAGE_PIXELS


def test_decompression_bomb_beyond_pillows_own_limit_is_413() -> None:
    """Even when the per-call limit is huge, Pillow's DecompressionBombError becomes a 413."""
    with pytest.raises(ImageTooLarge) as err:
        decode_upload(png_header_only(100_000, 100_000), "image/png", max_pixels=10**12)
    assert err.value.code == "image_too_large"


def test_truncated_jpeg_is_422_invalid_image() -> None:
    data = save(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG", quality=90)
    with pytest.raises(InvalidImage) as err:
        decode_upload(data[: len(data) // 2], "image/jpeg")
    assert (http_status(err.value), err.value.code) == (422, "invalid_image")


@pytest.mark.parametrize(
    "body", [b"<html><body>hello</body></html>", b"\x00" * 100, b"GIF89a-nope", b"\x89PNG\r\n"]
)
def test_non_image_with_image_content_type_is_422(body: bytes) -> None:
    with pytest.raises(InvalidImage) as err:
        decode_upload(body, "image/jpeg")
    assert err.value.code == "invalid_image"
    assert not isinstance(err.value, ImageTooLarge | UnsupportedImage)


def test_other_image_formats_are_415() -> None:
    ico = save(Image.new("RGB", (16, 16), RED), "ICO")
    heic_like = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64
    for data in (ico, heic_like):
        with pytest.raises(UnsupportedImage) as err:
            decode_upload(data, "image/x-whatever")
        assert err.value.code == "unsupported_format"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupted_images_never_crash() -> None:
    """Byte flips and truncations of valid files give a result or one of our errors, nothing
    else (a deterministic mini-fuzz)."""
    rng = random.Random(1234)
    sources = [
        save(Image.effect_noise((64, 48), 40).convert("RGB"), "JPEG"),
        save(Image.new("RGBA", (40, 30), (1, 2, 3, 100)), "PNG"),
        save(Image.new("P", (40, 30)), "GIF"),
        save(Image.new("RGB", (40, 30), BLUE), "WEBP"),
        save(Image.new("RGB", (40, 30), BLUE), "TIFF"),
        save(Image.new("RGB", (40, 30), BLUE), "BMP"),
    ]
    for source in sources:
        for _ in range(60):
            data = bytearray(source)
            if rng.random() < 0.5:
                del data[rng.randrange(1, len(data)) :]
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            with contextlib.suppress(InvalidImage, ImageTooLarge, UnsupportedImage):
                decode_upload(bytes(data), "image/png", max_pixels=1_000_000)


# -- normalisation -------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 (rotate 90° clockwise to display): the left half ends up on top."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    result = decode_upload(save(img, "JPEG", exif=exif, quality=95), "image/jpeg")
    assert (result.width, result.height) == (20, 40)
    out = opened(result.data).convert("RGB")
    assert close_to(px(out, (10, 5)), RED, 40)
    assert close_to(px(out, (10, 35)), BLUE, 40)


def test_cmyk_becomes_rgb_jpeg() -> None:
    data = save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    result = decode_upload(data, "image/jpeg")
    out = opened(result.data)
    assert (result.format, result.content_type, out.mode) == ("JPEG", "image/jpeg", "RGB")
    assert close_to(px(out, (16, 16)), RED)


def test_16_bit_grayscale_is_scaled_to_8_bit_not_clipped() -> None:
    img = Image.new("I;16", (256, 4))
    img.putdata([x * 256 for x in range(256)] * 4)
    result = decode_upload(save(img, "PNG"), "image/png")
    out = opened(result.data)
    assert out.mode == "L"
    assert px(out, (0, 1))[0] <= 4
    assert 120 <= px(out, (128, 1))[0] <= 136  # mid-grey, not white
    assert px(out, (255, 1))[0] >= 250


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 128)),
        lambda: Image.new("LA", (20, 20), (200, 128)),
    ],
)
def test_alpha_is_kept_and_stored_as_png(make: object) -> None:
    img = make()  # type: ignore[operator]
    result = decode_upload(save(img, "PNG"), "image/png")
    out = opened(result.data)
    assert (result.format, result.content_type, out.mode) == ("PNG", "image/png", "RGBA")
    assert px(out, (10, 10))[3] == 128


def test_palette_with_transparency_keeps_alpha() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    result = decode_upload(save(img, "GIF", transparency=1), "image/gif")
    out = opened(result.data)
    assert result.format == "PNG"
    assert px(out, (5, 5))[3] == 0
    assert px(out, (15, 5)) == (255, 0, 0, 255)


def test_opaque_images_become_jpeg_92() -> None:
    for fmt in ("PNG", "BMP", "TIFF", "WEBP", "GIF"):
        result = decode_upload(save(Image.new("RGB", (30, 20), BLUE), fmt), None)
        assert (result.format, result.source_format) == ("JPEG", fmt)
        assert close_to(px(opened(result.data).convert("RGB"), (15, 10)), BLUE)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_keep_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (24, 24), RED), Image.new("RGB", (24, 24), BLUE)]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = decode_upload(out.getvalue(), f"image/{fmt.lower()}")
    assert result.animated_first_frame
    assert close_to(px(opened(result.data).convert("RGB"), (12, 12)), RED, 20)


def test_still_images_are_not_marked_animated() -> None:
    assert not decode_upload(
        save(Image.new("RGB", (8, 8)), "GIF"), "image/gif"
    ).animated_first_frame


def test_metadata_is_stripped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 1
    data = save(Image.new("RGB", (32, 32), RED), "JPEG", exif=exif, comment=b"gps: here")
    out = opened(decode_upload(data, "image/jpeg").data)
    assert not dict(out.getexif())
    assert "comment" not in out.info
    assert b"SecretCam" not in decode_upload(data, "image/jpeg").data


def test_icc_profile_is_converted_and_dropped() -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = save(Image.new("RGB", (16, 16), BLUE), "PNG", icc_profile=srgb)
    out = opened(decode_upload(data, "image/png").data)
    assert "icc_profile" not in out.info
    assert close_to(px(out, (8, 8)), BLUE)


def test_content_type_parameters_are_ignored() -> None:
    data = save(Image.new("RGB", (8, 8)), "PNG")
    assert decode_upload(data, "image/png; charset=binary").width == 8


# -- prepare_input and encode ----------------------------------------------------------------------


def test_prepare_input_resizes_to_max_side_keeping_aspect() -> None:
    data = save(Image.new("RGB", (3000, 1500), RED), "PNG")
    out = prepare_input(data, max_side=1024, formats=("JPEG", "PNG"), data_uri=False)
    img = opened(out)
    assert (img.format, img.size) == ("JPEG", (1024, 512))


def test_prepare_input_never_upscales() -> None:
    data = save(Image.new("RGB", (300, 200), RED), "PNG")
    assert opened(prepare_input(data, max_side=1024, formats=("PNG",), data_uri=False)).size == (
        300,
        200,
    )


def test_prepare_input_data_uri_in_an_accepted_format() -> None:
    data = save(Image.new("RGB", (40, 40), RED), "BMP")
    uri = prepare_input(data, max_side=2048, formats=("WEBP",), data_uri=True)
    assert uri.startswith("data:image/webp;base64,")
    assert opened(base64.b64decode(uri.split(",", 1)[1])).format == "WEBP"


def test_prepare_input_keeps_alpha_when_the_provider_takes_png() -> None:
    data = save(Image.new("RGBA", (40, 40), (0, 0, 255, 100)), "PNG")
    out = opened(prepare_input(data, max_side=64, formats=("JPEG", "PNG"), data_uri=False))
    assert (out.format, out.mode) == ("PNG", "RGBA")
    flat = opened(prepare_input(data, max_side=64, formats=("JPEG",), data_uri=False))
    assert (flat.format, flat.mode) == ("JPEG", "RGB")


def test_prepare_input_applies_the_same_limits() -> None:
    with pytest.raises(ImageTooLarge):
        prepare_input(png_header_only(9000, 9000), max_side=1024, formats=("PNG",), data_uri=False)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_encode_round_trips(fmt: str) -> None:
    data = encode(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), fmt, 90)
    assert opened(data).format == fmt
    assert sniff_content_type(data) == f"image/{fmt.lower()}"


def test_encode_refuses_unknown_formats() -> None:
    with pytest.raises(ValueError):
        encode(Image.new("RGB", (4, 4)), "PSD", 90)


# -- the pixel limit and decoding at a DCT scale --------------------------------------------------


def photo(width: int, height: int) -> Image.Image:
    """Something shaped like a photo: gradients, noise, hard edges and text."""
    ramp = Image.linear_gradient("L").resize((width, height))
    grain = Image.effect_noise((width, height), 30).convert("RGB")
    img = Image.blend(Image.merge("RGB", (ramp, ramp.rotate(180), ramp)), grain, 0.2)
    draw = ImageDraw.Draw(img)
    for x in range(0, width, 53):
        draw.line([(x, 0), (width - x, height)], fill=(255, 255, 255), width=2)
    for y in range(0, height, 97):
        draw.text((10, y), "hookline " * 40, fill=(0, 0, 0))
    return img


def psnr(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    rms = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).rms
    mse = sum(v * v for v in rms) / len(rms)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_the_default_pixel_limit_is_twice_the_largest_provider_input_per_side() -> None:
    assert DEFAULT_MAX_PIXELS == 4096 * 4096


def test_a_jpeg_over_the_limit_is_decoded_at_the_dct_scale_that_fits() -> None:
    """Like a 48 MP phone photo under a 16.8 MP limit: decoded at half size, not refused."""
    data = save(photo(400, 300), "JPEG", quality=90)
    plan = plan_decode(data, max_pixels=40_000, shrink=True)
    assert (plan.scale, plan.decoded_size) == (2, (200, 150))
    result = decode_upload(data, "image/jpeg", max_pixels=40_000)
    assert (result.width, result.height) == (200, 150)
    assert opened(result.data).size == (200, 150)
    quarter = decode_upload(data, "image/jpeg", max_pixels=10_000)
    assert (quarter.width, quarter.height) == (100, 75)


def test_a_multi_picture_jpeg_from_a_phone_is_shrunk_like_a_jpeg() -> None:
    frames = [Image.new("RGB", (400, 300), RED), Image.new("RGB", (400, 300), BLUE)]
    out = io.BytesIO()
    frames[0].save(out, "MPO", save_all=True, append_images=frames[1:])
    result = decode_upload(out.getvalue(), "image/jpeg", max_pixels=40_000)
    assert (result.width, result.height, result.source_format) == (200, 150, "MPO")
    assert close_to(px(opened(result.data), (100, 75)), RED)


def test_a_jpeg_too_large_for_any_allowed_scale_and_other_formats_are_refused() -> None:
    jpeg = save(photo(400, 300), "JPEG")
    with pytest.raises(ImageTooLarge) as err:
        decode_upload(jpeg, "image/jpeg", max_pixels=7_000)  # 1/4 would be 7,500
    assert (http_status(err.value), err.value.details["width"]) == (413, 400)
    with pytest.raises(ImageTooLarge):
        decode_upload(save(photo(400, 300), "PNG"), "image/png", max_pixels=40_000)
    with pytest.raises(ImageTooLarge):  # without ``shrink`` (outputs to watermark): refused
        open_image(jpeg, max_bytes=10**7, max_pixels=40_000)


def test_an_image_within_the_limit_is_stored_exactly_as_a_full_decode_gives_it() -> None:
    data = save(photo(400, 300), "JPEG", quality=90)
    assert plan_decode(data, max_pixels=120_000, shrink=True).scale == 1
    full = Image.open(io.BytesIO(data))
    full.load()
    assert decode_upload(data, "image/jpeg", max_pixels=120_000).data == encode(full, "JPEG", 92)


def test_a_downscaled_input_is_drafted_and_equivalent_to_a_full_decode() -> None:
    """``prepare_input`` decodes a large JPEG at 1/2 (still twice the final size, as
    ``Image.thumbnail`` would). Against a full decode, the difference is far below what the JPEG
    encode that follows costs anyway: at least 40 dB PSNR, and 6 dB (4x less error) better than
    that encode, on a sharp, noisy image (the hardest case for a DCT-domain downscale)."""
    data = save(photo(2400, 1800), "JPEG", quality=90)
    plan = plan_decode(data, fit=512, shrink=True)
    assert (plan.scale, plan.final_size) == (2, (512, 384))
    drafted = opened(prepare_input(data, max_side=512, formats=("PNG",), data_uri=False))
    full = Image.open(io.BytesIO(data))
    full.load()
    full.thumbnail((512, 512), Image.Resampling.LANCZOS)
    assert drafted.size == full.size == (512, 384)
    encoded = opened(encode(full, "JPEG", 92))  # what prepare_input's own encode costs
    assert psnr(drafted, full) >= max(40.0, psnr(encoded, full) + 6.0)
    small = save(photo(600, 400), "JPEG")  # no room for a scale that keeps twice the size
    assert plan_decode(small, fit=512, shrink=True).scale == 1


def test_the_plan_reads_the_header_only_and_refuses_what_the_decode_would() -> None:
    plan = plan_decode(png_header_only(3000, 2000), max_pixels=10_000_000)
    assert (plan.size, plan.scale, plan.source_format) == ((3000, 2000), 1, "PNG")
    assert plan.peak_bytes >= 3000 * 2000 * 4  # RGB is stored in 4 bytes a pixel
    with pytest.raises(ImageTooLarge):
        plan_decode(png_header_only(3000, 2000), max_pixels=5_000_000)
    with pytest.raises(InvalidImage):
        plan_decode(b"not an image")


def test_a_jpeg_decoded_at_a_scale_plans_for_the_smaller_size() -> None:
    data = save(photo(800, 600), "JPEG")
    full = plan_decode(data, max_pixels=10**7)
    half = plan_decode(data, max_pixels=200_000, shrink=True)
    assert half.decoded_size == (400, 300)
    assert half.peak_bytes < full.peak_bytes / 3


def test_png_text_chunks_cannot_hold_megabytes_before_the_pixel_limit_applies() -> None:
    info = PngImagePlugin.PngInfo()
    for i in range(4):
        info.add_text(f"t{i}", "x" * 400_000, zip=True)  # 1.6 MB of text in a few KB
    data = save(Image.new("RGB", (8, 8), RED), "PNG", pnginfo=info)
    assert len(data) < 20_000
    with pytest.raises(InvalidImage):
        decode_upload(data, "image/png")


ENCODE_PARAMS: dict[str, dict[str, object]] = {
    "JPEG": {"quality": 90, "comment": b""},
    "PNG": {"compress_level": 6},
    "WEBP": {"quality": 90, "method": 4},
}


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this platform")
def test_a_jpeg_is_encoded_to_a_descriptor_with_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pillow's JPEG encoder releases the GIL only when it writes to a file descriptor (the
    ``fh`` of ``_encode_tile``); to a ``BytesIO`` it holds it, and the watermark step's encode
    stalled the event loop. The bytes are those of an encode to a ``BytesIO``."""
    descriptors: list[int | None] = []
    real = ImageFile._encode_tile

    def watching(im: Image.Image, fp: object, tile: object, bufsize: int, fh: int | None,
                 exc: BaseException | None = None) -> None:  # fmt: skip
        descriptors.append(fh)
        real(im, fp, tile, bufsize, fh, exc)  # type: ignore[arg-type]

    img = Image.effect_noise((64, 48), 40).convert("RGB")
    monkeypatch.setattr(ImageFile, "_encode_tile", watching)
    data = encode(img, "JPEG", 90)
    monkeypatch.undo()
    assert descriptors and all(fh is not None for fh in descriptors)
    assert data == save(img, "JPEG", **ENCODE_PARAMS["JPEG"])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_encoding_needs_no_descriptor(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No memfd to be had (descriptors exhausted, a sandbox, another platform): the same bytes
    through a ``BytesIO``."""

    def refused(name: str, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(images, "_MEMFD", refused)
    img = Image.effect_noise((64, 48), 40).convert("RGB")
    assert encode(img, fmt, 90) == save(img, fmt, **ENCODE_PARAMS[fmt])
