"""Image pipeline throughput: watermark + encode + store outputs, and upload decoding.

    python -m bench.bench_images [--quick]

Outputs: a generated-looking JPEG (smooth gradients plus fine noise) at 1024² and 2048² goes
through ``apply_watermark`` (JPEG, quality 90) and ``LocalBlobStore.put`` (atomic write with
fsync, in a temporary directory) — per image on one thread, then two pipelines at once the way the
worker runs them (``asyncio.to_thread``). Uploads: ``decode_upload`` of ~1 MB JPEGs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageChops

from service.blobs.local import LocalBlobStore
from service.media.images import decode_upload
from service.media.watermark import WatermarkConfig, apply_watermark

GOAL_IMAGES_PER_S_1024 = 40.0
THREADS = 2


def synthetic_photo(side: int, *, noise: float = 24.0, seed_shift: int = 0) -> Image.Image:
    """Something shaped like a generated image: colour gradients with fine texture."""
    ramp = Image.linear_gradient("L").resize((side, side))
    channels = (
        ramp,
        ramp.rotate(90 + seed_shift),
        ImageChops.multiply(ramp, ramp.rotate(180)),
    )
    base = Image.merge("RGB", channels)
    grain = Image.effect_noise((side, side), noise).convert("RGB")
    return Image.blend(base, grain, 0.18)


def jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def about_one_mb_jpeg() -> bytes:
    """A JPEG of roughly 1 MB (the size of a typical phone upload after the app's own resize)."""
    img = synthetic_photo(1600, noise=40.0)
    for quality in (95, 92, 90, 85, 80, 75):
        data = jpeg(img, quality)
        if len(data) <= 1_100_000:
            return data
    return data


async def watermark_and_store(
    store: LocalBlobStore, cfg: WatermarkConfig, source: bytes, key: str
) -> None:
    rendered = await asyncio.to_thread(apply_watermark, source, cfg)
    await store.put(key, rendered.data, rendered.content_type)


async def pipeline_rates(side: int, count: int, root: Path) -> tuple[float, float]:
    """(ms per image on one thread, images/s with THREADS concurrent pipelines)."""
    store = LocalBlobStore(root / f"s{side}", "http://127.0.0.1:8000", b"bench-secret")
    cfg = WatermarkConfig(output_format="JPEG", quality=90)
    source = jpeg(synthetic_photo(side), 92)
    await watermark_and_store(store, cfg, source, f"warm/{side}.jpg")

    started = time.perf_counter()
    for i in range(count):
        await watermark_and_store(store, cfg, source, f"outputs/seq{side}/{i}.jpg")
    per_image_ms = (time.perf_counter() - started) * 1000 / count

    async def worker(w: int) -> None:
        for i in range(w, count, THREADS):
            await watermark_and_store(store, cfg, source, f"outputs/par{side}/{i}.jpg")

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(THREADS)))
    rate = count / (time.perf_counter() - started)
    return per_image_ms, rate


async def decode_rates(count: int) -> tuple[float, float, float, float]:
    """(MB/s, images/s on one thread, images/s with THREADS threads, source MB)."""
    data = about_one_mb_jpeg()
    decode_upload(data, "image/jpeg")
    started = time.perf_counter()
    for _ in range(count):
        decode_upload(data, "image/jpeg")
    elapsed = time.perf_counter() - started

    async def worker(w: int) -> None:
        for _ in range(w, count, THREADS):
            await asyncio.to_thread(decode_upload, data, "image/jpeg")

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(THREADS)))
    parallel = count / (time.perf_counter() - started)
    megabytes = len(data) / 1e6
    return megabytes * count / elapsed, count / elapsed, parallel, megabytes


async def _run(quick: bool) -> dict[str, float]:
    n1024, n2048, ndecode = (20, 6, 10) if quick else (120, 30, 60)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hookline-bench-") as tmp:
        for side, count in ((1024, n1024), (2048, n2048)):
            per_image_ms, rate = await pipeline_rates(side, count, Path(tmp))
            results[f"watermark_store_{side}_ms_per_image"] = per_image_ms
            results[f"watermark_store_{side}_images_per_s_{THREADS}_threads"] = rate
    mb_s, img_s, img_s_par, mb = await decode_rates(ndecode)
    results["decode_upload_1mb_jpeg_mb_per_s"] = mb_s
    results["decode_upload_1mb_jpeg_images_per_s"] = img_s
    results[f"decode_upload_1mb_jpeg_images_per_s_{THREADS}_threads"] = img_s_par
    results["decode_upload_source_mb"] = mb
    return results


def run(quick: bool) -> dict[str, float]:
    """Run the benchmark; ``quick`` uses fewer iterations (CI smoke)."""
    return asyncio.run(_run(quick))


def describe(name: str, value: float) -> str:
    """``name: value unit (goal …)``."""
    goal = "goal: none, reported"
    if "ms_per_image" in name:
        unit = "ms"
    elif "images_per_s" in name:
        unit = "images/s"
        if name.startswith("watermark_store_1024_images_per_s"):
            goal = f"goal >= {GOAL_IMAGES_PER_S_1024:g}"
    elif "mb_per_s" in name:
        unit = "MB/s"
    else:
        unit = "MB"
    return f"{name}: {value:.1f} {unit} ({goal})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    for name, value in run(args.quick).items():
        print(describe(name, value))


if __name__ == "__main__":
    main()
