"""``POST /v1/uploads`` through a real server: accepted images come back normalised (201 with key,
width, height, content_type, bytes); every refusal is a JSON error with the right status and
leaves the blob directory exactly as it was."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.integration.test_api import assert_error
from tests.support.hookline import Hookline, running_hookline

MAX_UPLOAD = 200_000


def encoded(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def blob_files(root: Path) -> set[str]:
    """Every file under the blob root (temporary files included: a refusal leaves none)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares ``width``x``height``
    grey pixels, with a zlib stream that would inflate to all of them."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row_zeros = zlib.compressobj(9)
    # the first rows only: enough to start decoding, the header alone is the bomb
    idat = row_zeros.compress(b"\x00" * (width + 1) * 4) + row_zeros.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encoded(Image.new("RGB", (width, height), "orange"), "JPEG", exif=exif.tobytes())


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    async with running_hookline(tmp_path, max_upload_bytes=MAX_UPLOAD) as running:
        yield running


@pytest.fixture
async def key(hl: Hookline) -> str:
    return await hl.create_user("alice", 100)


def blob_root(hl: Hookline) -> Path:
    return Path(hl.settings.blob_url.removeprefix("file://"))


async def upload(hl: Hookline, key: str, data: Any, content_type: str | None) -> httpx.Response:
    headers = hl.auth(key)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await hl.client.post("/v1/uploads", content=data, headers=headers)


def assert_created(r: httpx.Response, width: int, height: int, content_type: str) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"key", "width", "height", "content_type", "bytes"}
    assert (body["width"], body["height"], body["content_type"]) == (width, height, content_type)
    assert body["key"].startswith("uploads/alice/")
    assert isinstance(body["bytes"], int) and body["bytes"] > 0
    return body


# --- accepted -------------------------------------------------------------------------------------


ACCEPTED: dict[str, tuple[bytes, str | None, tuple[int, int], str]] = {
    # name: (bytes, content type sent, (width, height) expected, content type stored)
    "jpeg": (
        encoded(Image.new("RGB", (40, 30), "teal"), "JPEG"),
        "image/jpeg",
        (40, 30),
        "image/jpeg",
    ),
    "png": (encoded(Image.new("RGB", (41, 31), "red"), "PNG"), "image/png", (41, 31), "image/jpeg"),
    "png_with_alpha": (
        encoded(Image.new("RGBA", (20, 10), (0, 0, 255, 128)), "PNG"),
        "image/png",
        (20, 10),
        "image/png",
    ),
    "webp": (
        encoded(Image.new("RGB", (33, 22), "navy"), "WEBP"),
        "image/webp",
        (33, 22),
        "image/jpeg",
    ),
    "cmyk_jpeg": (
        encoded(Image.new("CMYK", (24, 12), (0, 255, 255, 0)), "JPEG"),
        "image/jpeg",
        (24, 12),
        "image/jpeg",
    ),
    "png_16_bit": (
        encoded(Image.new("I;16", (18, 9), 40_000), "PNG"),
        "image/png",
        (18, 9),
        "image/jpeg",
    ),
    "palette_with_transparency": (
        encoded(Image.new("P", (16, 8), 1), "PNG", transparency=1),
        "image/png",
        (16, 8),
        "image/png",
    ),
    "content_type_with_parameters": (
        encoded(Image.new("RGB", (10, 10), "teal"), "JPEG"),
        "image/jpeg; charset=binary",
        (10, 10),
        "image/jpeg",
    ),
    "no_content_type": (
        encoded(Image.new("RGB", (12, 12), "teal"), "PNG"),
        None,
        (12, 12),
        "image/jpeg",
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
async def test_image_is_accepted_and_normalised(hl: Hookline, key: str, case: str) -> None:
    data, sent_type, (width, height), stored_type = ACCEPTED[case]
    r = await upload(hl, key, data, sent_type)
    body = assert_created(r, width, height, stored_type)
    stored = blob_root(hl) / body["key"]
    assert stored.stat().st_size == body["bytes"]
    with Image.open(stored) as img:
        assert img.size == (width, height)
        assert img.mode in ("L", "RGB", "RGBA")


async def test_exif_orientation_is_applied(hl: Hookline, key: str) -> None:
    """Orientation 6 (rotate 90° clockwise to view): a 60x20 sensor image is 20x60 upright."""
    r = await upload(hl, key, jpeg_with_orientation(60, 20, 6), "image/jpeg")
    body = assert_created(r, 20, 60, "image/jpeg")
    with Image.open(blob_root(hl) / body["key"]) as img:
        assert img.size == (20, 60)
        assert 0x0112 not in img.getexif()  # applied, so no longer declared


async def test_animated_gif_keeps_its_first_frame(hl: Hookline, key: str) -> None:
    frames = [Image.new("RGB", (30, 20), c) for c in ("red", "green", "blue")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(gif)) as check:
        assert getattr(check, "n_frames", 1) == 3
    body = assert_created(await upload(hl, key, gif, "image/gif"), 30, 20, "image/jpeg")
    with Image.open(blob_root(hl) / body["key"]) as img:
        assert getattr(img, "n_frames", 1) == 1
        red, green, _ = img.convert("RGB").getpixel((15, 10))  # type: ignore[misc]
        assert red > 200 and green < 60  # the first (red) frame


async def test_same_bytes_twice_land_on_one_key(hl: Hookline, key: str) -> None:
    data = ACCEPTED["jpeg"][0]
    first = (await upload(hl, key, data, "image/jpeg")).json()
    second = (await upload(hl, key, data, "image/jpeg")).json()
    assert first["key"] == second["key"]
    assert len(blob_files(blob_root(hl) / "uploads")) == 1


# --- refused: nothing stored ----------------------------------------------------------------------


REFUSED: dict[str, tuple[bytes, str, int, str]] = {
    # name: (bytes, content type, status, code)
    "zero_bytes": (b"", "image/jpeg", 422, "empty_body"),
    "text_pretending_to_be_an_image": (b"hello, not a picture", "image/png", 422, "invalid_image"),
    "html_pretending_to_be_an_image": (
        b"<html><body>x</body></html>",
        "image/jpeg",
        422,
        "invalid_image",
    ),
    "text_plain": (b"hello", "text/plain", 415, "unsupported_media_type"),
    "json_content_type": (ACCEPTED["jpeg"][0], "application/json", 415, "unsupported_media_type"),
    "truncated_jpeg": (
        encoded(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")[:1500],
        "image/jpeg",
        422,
        "invalid_image",
    ),
    "truncated_png": (
        encoded(Image.effect_noise((200, 200), 50).convert("RGB"), "PNG")[:2000],
        "image/png",
        422,
        "invalid_image",
    ),
    "header_only_png": (ACCEPTED["png"][0][:33], "image/png", 422, "invalid_image"),
    "unsupported_format_svg": (
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "image/svg+xml",
        415,
        "unsupported_format",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_bad_upload_is_refused_and_stores_nothing(hl: Hookline, key: str, case: str) -> None:
    data, content_type, status, code = REFUSED[case]
    before = blob_files(blob_root(hl))
    assert_error(await upload(hl, key, data, content_type), status, code)
    assert blob_files(blob_root(hl)) == before


async def test_decompression_bomb_is_413_and_the_server_keeps_answering(
    hl: Hookline, key: str
) -> None:
    bomb = png_bomb(100_000, 100_000)  # 10 gigapixels declared in a few hundred bytes
    assert len(bomb) < 2_000
    before = blob_files(blob_root(hl))
    assert_error(await upload(hl, key, bomb, "image/png"), 413, "image_too_large")
    assert blob_files(blob_root(hl)) == before
    assert (await hl.client.get("/healthz")).status_code == 200
    assert_created(await upload(hl, key, ACCEPTED["jpeg"][0], "image/jpeg"), 40, 30, "image/jpeg")


async def test_bomb_just_over_the_pixel_limit_is_413(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, max_image_pixels=10_000) as hl:
        key = await hl.create_user("alice", 100)
        before = blob_files(blob_root(hl))
        r = await upload(hl, key, png_bomb(101, 100), "image/png")
        assert_error(r, 413, "image_too_large")
        assert blob_files(blob_root(hl)) == before
        assert_created(
            await upload(hl, key, png_bomb(100, 100), "image/png"), 100, 100, "image/jpeg"
        )


async def test_upload_over_max_bytes_is_413(hl: Hookline, key: str) -> None:
    big = encoded(Image.effect_noise((400, 400), 80).convert("RGB"), "PNG")
    assert len(big) > MAX_UPLOAD
    before = blob_files(blob_root(hl))
    assert_error(await upload(hl, key, big, "image/png"), 413)

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 16_384):
            yield big[i : i + 16_384]

    assert_error(await upload(hl, key, chunked(), "image/png"), 413)
    assert blob_files(blob_root(hl)) == before
    assert (await hl.client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_key"), ({"Authorization": "Bearer hk_wrong"}, "invalid_key")],
)
async def test_upload_without_a_valid_key_is_401(
    hl: Hookline, headers: dict[str, str], code: str
) -> None:
    before = blob_files(blob_root(hl))
    r = await hl.client.post(
        "/v1/uploads",
        content=ACCEPTED["jpeg"][0],
        headers={**headers, "Content-Type": "image/jpeg"},
    )
    assert_error(r, 401, code)
    assert blob_files(blob_root(hl)) == before


# --- large JPEGs and concurrent uploads -----------------------------------------------------------


async def test_a_jpeg_over_the_pixel_limit_is_stored_at_a_smaller_scale(tmp_path: Path) -> None:
    """A phone photo over the limit is not refused: it is decoded at 1/2 (or 1/4) size."""
    async with running_hookline(tmp_path, max_image_pixels=40_000) as hl:
        key = await hl.create_user("alice", 100)
        photo = encoded(Image.effect_noise((400, 300), 40).convert("RGB"), "JPEG")
        body = assert_created(await upload(hl, key, photo, "image/jpeg"), 200, 150, "image/jpeg")
        with Image.open(blob_root(hl) / body["key"]) as img:
            assert img.size == (200, 150)


def slow_body(data: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """The first half of ``data`` at once, the rest once ``release`` is set."""

    async def chunks() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        await release.wait()
        yield data[len(data) // 2 :]

    return chunks()


async def test_a_users_uploads_beyond_the_cap_are_429_and_other_users_are_unaffected(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path, upload_decodes_per_user=2) as hl:
        alice = await hl.create_user("alice", 100)
        bob = await hl.create_user("bob", 100)
        image = ACCEPTED["jpeg"][0]
        release = asyncio.Event()
        running = [
            asyncio.create_task(upload(hl, alice, slow_body(image, release), "image/jpeg"))
            for _ in range(2)
        ]

        def held() -> int:
            """Alice's uploads under way, as the server counts them."""
            guards = getattr(hl.app.state, "hookline_guards", None)
            return 0 if guards is None else int(guards.uploads.held("alice"))

        async with asyncio.timeout(30):  # a bound against hangs, not a measurement
            while held() < 2:
                await asyncio.sleep(0.01)
        before = blob_files(blob_root(hl))
        r = await upload(hl, alice, image, "image/jpeg")
        error = assert_error(r, 429, "too_many_concurrent_uploads")
        assert int(r.headers["retry-after"]) >= 1 and error["details"]["retry_after_s"] > 0
        assert blob_files(blob_root(hl)) == before
        assert (await upload(hl, bob, image, "image/jpeg")).status_code == 201
        release.set()
        for done in running:
            assert (await done).status_code == 201
        assert held() == 0
        assert (await upload(hl, alice, image, "image/jpeg")).status_code == 201
