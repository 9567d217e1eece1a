"""Watermarking: the mark lands where configured and nowhere else, judged by pixel statistics."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from service.media.errors import ImageTooLarge, InvalidImage
from service.media.watermark import POSITIONS, Position, WatermarkConfig, apply_watermark
from service.settings import Settings

SIZE = 400
GREY = (90, 120, 150)


def encoded(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def source() -> Image.Image:
    """A flat image: any change a watermark makes stands out."""
    return Image.new("RGB", (SIZE, SIZE), GREY)


def changed(original: Image.Image, marked: Image.Image, box: tuple[int, int, int, int]) -> float:
    """Mean absolute difference (0-255) of the two images inside ``box``."""
    diff = ImageChops.difference(original.convert("RGB"), marked.convert("RGB")).crop(box)
    return sum(ImageStat.Stat(diff).mean) / 3


def quadrants() -> dict[str, tuple[int, int, int, int]]:
    h = SIZE // 2
    return {
        "top-left": (0, 0, h, h),
        "top-right": (h, 0, SIZE, h),
        "bottom-left": (0, h, h, SIZE),
        "bottom-right": (h, h, SIZE, SIZE),
    }


def centre_box() -> tuple[int, int, int, int]:
    q = SIZE // 4
    return (q, q + q // 2, SIZE - q, SIZE - q - q // 2)


def mark(img: Image.Image, **cfg: object) -> Image.Image:
    config = WatermarkConfig(**{"output_format": "PNG", "opacity": 1.0, **cfg})  # type: ignore[arg-type]
    return decoded(apply_watermark(encoded(img), config).data)


@pytest.mark.parametrize("position", [p for p in POSITIONS if p != "center"])
def test_corner_watermark_is_in_its_corner_only(position: Position) -> None:
    original = source()
    marked = mark(original, position=position)
    for name, box in quadrants().items():
        if name == position:
            assert changed(original, marked, box) > 1.0, name
        else:
            assert changed(original, marked, box) == 0.0, name


def test_centre_watermark_is_in_the_middle() -> None:
    original = source()
    marked = mark(original, position="center")
    assert changed(original, marked, centre_box()) > 1.0
    for corner in ((0, 0, 100, 100), (300, 0, 400, 100), (0, 300, 100, 400), (300, 300, 400, 400)):
        assert changed(original, marked, corner) == 0.0


def test_margin_keeps_the_mark_off_the_edge() -> None:
    original = source()
    marked = mark(original, position="bottom-right", margin=0.1)
    edge = (SIZE - 40, 0, SIZE, SIZE)  # the right-most 10 %
    assert changed(original, marked, edge) == 0.0
    assert changed(original, marked, (SIZE // 2, SIZE // 2, SIZE - 40, SIZE - 40)) > 2.0


def test_scale_sets_the_mark_width() -> None:
    original = source()
    marked = mark(original, position="top-left", margin=0.0, scale=0.5)
    diff = ImageChops.difference(original, marked.convert("RGB")).convert("L")
    left, _, right, _ = diff.getbbox() or (0, 0, 0, 0)
    assert 0.45 * SIZE <= right - left <= 0.5 * SIZE + 1


def test_tiling_touches_most_of_the_image() -> None:
    original = source()
    marked = mark(original, tile=True)
    cells = [(x, y, x + 80, y + 80) for x in range(0, SIZE, 80) for y in range(0, SIZE, 80)]
    touched = sum(changed(original, marked, cell) > 1.0 for cell in cells)
    assert touched >= 0.8 * len(cells)


def test_opacity_zero_leaves_the_image_unchanged() -> None:
    """Compared with the same picture merely re-encoded: only JPEG noise may differ."""
    original = Image.linear_gradient("L").resize((SIZE, SIZE)).convert("RGB")
    plain = decoded(encoded(original, "JPEG", quality=90))
    out = decoded(
        apply_watermark(encoded(original), WatermarkConfig(opacity=0.0, output_format="JPEG")).data
    )
    for box in quadrants().values():
        assert changed(plain, out, box) < 1.0
        assert changed(original, out, box) < 3.0


def test_higher_opacity_changes_more() -> None:
    original = source()
    box = quadrants()["bottom-right"]
    faint = changed(original, mark(original, opacity=0.2), box)
    strong = changed(original, mark(original, opacity=0.9), box)
    assert 0 < faint < strong


def test_logo_with_alpha_is_drawn_and_its_transparent_parts_are_not() -> None:
    logo = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    logo.paste((255, 0, 0, 255), (0, 0, 50, 100))  # left half opaque red, right half transparent
    original = source()
    marked = mark(
        original, text=None, logo=encoded(logo), position="top-left", margin=0.0, scale=0.5
    )
    assert marked.convert("RGB").getpixel((50, 100)) == (255, 0, 0)
    assert changed(original, marked, (110, 10, 190, 190)) == 0.0
    assert changed(original, marked, quadrants()["bottom-right"]) == 0.0


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")],
)
def test_output_formats(fmt: str, content_type: str) -> None:
    cfg = WatermarkConfig(output_format=fmt, quality=85)  # type: ignore[arg-type]
    result = apply_watermark(encoded(Image.new("RGB", (300, 200), GREY)), cfg)
    assert (result.content_type, result.width, result.height) == (content_type, 300, 200)
    assert decoded(result.data).format == fmt


def test_transparent_inputs_keep_alpha_in_png() -> None:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    result = decoded(
        apply_watermark(encoded(img), WatermarkConfig(opacity=1.0, output_format="PNG")).data
    )
    assert result.mode == "RGBA"
    assert result.getchannel("A").getpixel((5, 5)) == 0
    alpha = result.getchannel("A").crop(quadrants()["bottom-right"])
    assert ImageStat.Stat(alpha).extrema[0][1] > 0


def test_inputs_get_the_upload_limits() -> None:
    with pytest.raises(InvalidImage):
        apply_watermark(b"<html>", WatermarkConfig())
    with pytest.raises(ImageTooLarge):
        apply_watermark(encoded(source()), WatermarkConfig(max_pixels=1000))


def test_from_settings_reads_every_knob(tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    logo.write_bytes(encoded(Image.new("RGBA", (10, 10), (255, 0, 0, 255))))
    settings = Settings(
        watermark_text="acme",
        watermark_logo=logo,
        watermark_position="top-left",
        watermark_opacity=0.7,
        watermark_scale=0.3,
        watermark_margin=0.05,
        watermark_tile=True,
        output_format="WEBP",
        output_quality=80,
        max_image_pixels=1234,
    )
    cfg = WatermarkConfig.from_settings(settings)
    assert (cfg.text, cfg.position, cfg.opacity, cfg.scale, cfg.margin, cfg.tile) == (
        "acme",
        "top-left",
        0.7,
        0.3,
        0.05,
        True,
    )
    assert (cfg.output_format, cfg.quality, cfg.max_pixels) == ("WEBP", 80, 1234)
    assert cfg.logo == logo.read_bytes()


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError):
        WatermarkConfig(opacity=1.5)
    with pytest.raises(ValueError):
        WatermarkConfig(position="middle")  # type: ignore[arg-type]
