"""How an input reaches the provider: an upload that already conforms to the provider's limits goes
as it is (nothing decoded), one that does not is prepared once into a derived blob that every
later task reuses, and a URL input that conforms is passed by its URL."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import service.steps.processing as processing
from callbacks.provider import Limits
from service.media.fetch import FetchResult, SafeFetcher
from statemachine.states import State
from tests.support.hookline import Hookline, install_manual_provider, running_hookline


def data_uri_bytes(ref: str) -> tuple[str, bytes]:
    head, _, b64 = ref.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), ref[:60]
    return head.removeprefix("data:").removesuffix(";base64"), base64.b64decode(b64)


def counting_prepares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the decodes of provider inputs (the real function still runs)."""
    calls: list[int] = []
    real: Callable[..., Any] = processing.prepare_input

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(processing, "prepare_input", counted)
    return calls


def processing_step(hl: Hookline) -> processing.ProcessingStep:
    assert hl.runtime.runner is not None
    step = hl.runtime.runner.steps[State.PENDING]
    assert isinstance(step, processing.ProcessingStep)
    return step


async def submitted(hl: Hookline, manual: Any, n: int) -> list[Any]:
    async with asyncio.timeout(30):
        while len(manual.jobs) < n:
            await asyncio.sleep(0.02)
    return [job.submission for job in manual.jobs.values()]


async def test_a_conforming_upload_goes_to_the_provider_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload was normalised when it arrived (upright, no metadata, JPEG): within the
    provider's limits it is sent as it is stored — not decoded and re-encoded for every task."""
    decodes = counting_prepares(monkeypatch)
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        upload = await hl.upload(key, size=(64, 48))
        for _ in range(3):
            await hl.create_task(key, provider="manual", inputs=[{"upload": upload}])
        stored = await hl.runtime.blobs.get(upload)
        for submission in await submitted(hl, manual, 3):
            assert data_uri_bytes(submission.inputs[0]) == ("image/jpeg", stored)
        assert decodes == []
        assert await hl.runtime.blobs.list_keys("derived/") == []


async def test_an_upload_over_the_limits_is_prepared_once_for_every_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four tasks on one upload larger than the provider takes: one decode, one derived blob
    (``derived/<limits>/<upload>``), the same bytes in every submission."""
    decodes = counting_prepares(monkeypatch)
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        manual.limits = Limits(max_side=32, formats=("JPEG", "PNG"), accepts_data_uri=True)
        key = await hl.create_user("alice")
        upload = await hl.upload(key, size=(64, 48))
        tasks = [
            hl.create_task(key, provider="manual", inputs=[{"upload": upload}]) for _ in range(4)
        ]
        await asyncio.gather(*tasks)
        submissions = await submitted(hl, manual, 4)
        derived = await hl.runtime.blobs.list_keys("derived/")
        stem = upload.rpartition(".")[0]
        assert derived == [f"derived/32-jpeg-png/{stem}.jpeg"]
        prepared = await hl.runtime.blobs.get(derived[0])
        assert Image.open(io.BytesIO(prepared)).size == (32, 24)
        assert {data_uri_bytes(s.inputs[0]) for s in submissions} == {("image/jpeg", prepared)}
        assert decodes == [1]


async def test_a_provider_without_data_uris_gets_a_signed_url_of_the_derived_blob(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        manual.limits = Limits(max_side=32, formats=("JPEG",), accepts_data_uri=False)
        key = await hl.create_user("alice")
        upload = await hl.upload(key, size=(64, 48))
        await hl.create_task(key, provider="manual", inputs=[{"upload": upload}])
        (submission,) = await submitted(hl, manual, 1)
        ref = submission.inputs[0]
        assert ref.startswith(f"{hl.base_url}/files/derived/32-jpeg/"), ref
        served = await hl.client.get(ref)
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(served.content)).size == (32, 24)


async def test_a_url_input_from_a_listed_private_host_is_prepared_not_passed_on(
    tmp_path: Path,
) -> None:
    """A provider cannot reach a host the operator listed for inputs (often private): the image
    is fetched, prepared and handed over as data, whatever it looks like."""
    async with running_hookline(tmp_path, input_hosts="127.0.0.1") as hl:
        await hl.runtime.blobs.put("fixtures/in.jpg", jpeg((40, 30)), "image/jpeg")
        url = await hl.runtime.blobs.url("fixtures/in.jpg", 3600)
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        await hl.create_task(key, provider="manual", inputs=[{"url": url}])
        (submission,) = await submitted(hl, manual, 1)
        content_type, data = data_uri_bytes(submission.inputs[0])
        assert content_type == "image/jpeg"
        assert Image.open(io.BytesIO(data)).size == (40, 30)


def jpeg(size: tuple[int, int], *, exif: bool = False) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, "teal")
    if exif:
        tags = Image.Exif()
        tags[0x0112] = 6  # rotate 90° when shown
        img.save(buf, "JPEG", exif=tags.tobytes())
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


class PublicFetcher:
    """A stand-in for the public internet (no https host can be reached from the tests): it
    serves one image at one public https URL, as the safe fetcher would."""

    def __init__(self, url: str, data: bytes) -> None:
        self.url, self.data = url, data

    async def fetch(self, url: str, **_: Any) -> FetchResult:
        assert url == self.url
        return FetchResult(self.data, "image/jpeg", url)

    def reachable_by_anyone(self, url: str) -> bool:
        return True


@pytest.mark.parametrize(
    ("image", "passed_by_url"),
    [
        (jpeg((40, 30)), True),  # conforms: the provider fetches it itself
        (jpeg((4000, 30)), False),  # over max_side: prepared
        (jpeg((40, 30), exif=True), False),  # EXIF (rotation, camera data): prepared
    ],
)
async def test_a_conforming_public_url_input_is_passed_by_its_url(
    tmp_path: Path, image: bytes, passed_by_url: bool
) -> None:
    url = "https://images.example/in.jpg"
    # "never": this fake fetcher calls every URL public, hookline's own files included
    async with running_hookline(tmp_path, inputs_by_url="never") as hl:
        processing_step(hl).input_fetcher = PublicFetcher(url, image)  # type: ignore[assignment]
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        await hl.create_task(key, provider="manual", inputs=[{"url": url}])
        (submission,) = await submitted(hl, manual, 1)
        if passed_by_url:
            assert submission.inputs == (url,)
        else:
            _, data = data_uri_bytes(submission.inputs[0])
            assert data != image
            assert "exif" not in Image.open(io.BytesIO(data)).info


def test_only_public_https_urls_are_reachable_by_anyone() -> None:
    fetcher = SafeFetcher(None, allow_hosts={"127.0.0.1:8000"}, max_bytes=1, timeout_s=1)
    assert fetcher.reachable_by_anyone("https://images.example/a.jpg")
    assert not fetcher.reachable_by_anyone("http://images.example/a.jpg")
    assert not fetcher.reachable_by_anyone("https://127.0.0.1:8000/a.jpg")
    assert not fetcher.reachable_by_anyone("http://127.0.0.1:8000/a.jpg")
    assert not fetcher.reachable_by_anyone("https://10.0.0.7/a.jpg")  # never fetched anyway
    assert fetcher.reachable_by_anyone("https://8.8.8.8/a.jpg")


@pytest.mark.parametrize(
    ("mode", "public", "by_url"),
    [
        ("auto", False, False),  # hookline's files on loopback: the provider could not fetch them
        ("auto", True, True),  # public https: a URL instead of the image, in every echo too
        ("never", True, False),
        ("always", False, True),
    ],
)
async def test_a_stored_input_goes_by_url_when_the_provider_can_fetch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, public: bool, by_url: bool
) -> None:
    async with running_hookline(tmp_path, inputs_by_url=mode) as hl:
        manual = await install_manual_provider(hl)
        step = processing_step(hl)
        if public:
            monkeypatch.setattr(step.input_fetcher, "reachable_by_anyone", lambda url: True)
        key = await hl.create_user("alice")
        upload = await hl.upload(key, size=(64, 48))
        await hl.create_task(key, provider="manual", inputs=[{"upload": upload}])
        (submission,) = await submitted(hl, manual, 1)
        ref = submission.inputs[0]
        if by_url:
            assert ref.startswith(f"{hl.base_url}/files/{upload}"), ref[:80]
            served = await hl.client.get(ref)
            assert served.content == await hl.runtime.blobs.get(upload)
        else:
            assert data_uri_bytes(ref) == ("image/jpeg", await hl.runtime.blobs.get(upload))


@pytest.mark.parametrize("burst", [False, True], ids=["one by one", "at once"])
@pytest.mark.parametrize("mode", ["always", "never"])
async def test_an_upload_is_read_once_per_process_by_url_or_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, burst: bool
) -> None:
    """Uploads never change: once a process knows which key of an upload a provider gets (and
    its size), a task sending it by URL reads nothing, and tasks sending it inline share one
    data URI (one string, not a copy of hundreds of KB per submit in flight), also when they
    all start at once (the first makes it, the others wait for it)."""
    async with running_hookline(tmp_path, inputs_by_url=mode) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        upload = await hl.upload(key, size=(64, 48))
        blobs = hl.runtime.blobs
        read: list[str] = []
        real_get = blobs.get

        async def counted_get(blob_key: str) -> bytes:
            read.append(blob_key)
            return await real_get(blob_key)

        monkeypatch.setattr(blobs, "get", counted_get)
        if burst:
            three = [{"upload": upload}] * 3
            await asyncio.gather(
                *(hl.create_task(key, provider="manual", inputs=[i]) for i in three)
            )
            await submitted(hl, manual, 3)
        for n in range(1, 4) if not burst else ():
            await hl.create_task(key, provider="manual", inputs=[{"upload": upload}])
            await submitted(hl, manual, n)
        assert read == [upload]
        sent = [job.submission.inputs[0] for job in manual.jobs.values()]
        refs = set(sent)
        if mode == "always":
            assert all(ref.startswith(f"{hl.base_url}/files/{upload}") for ref in refs)
            served = await hl.client.get(sorted(refs)[-1])
            assert served.content == await real_get(upload)
        else:
            assert {data_uri_bytes(ref)[1] for ref in refs} == {await real_get(upload)}
            assert len({id(ref) for ref in sent}) == 1
