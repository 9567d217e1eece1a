"""``hookline submit`` against a real server: it uploads, creates the task, follows it live to the
end and prints the output URLs; a bad key, a non-image or a failed task exit non-zero with the
error."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from service.cli import main
from tests.support.hookline import running_hookline

pytestmark = pytest.mark.asyncio


def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), "purple").save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


async def run_cli(argv: list[str]) -> int:
    """The CLI in a thread: it is synchronous and the server runs on this test's loop."""
    async with asyncio.timeout(60):
        return await asyncio.to_thread(main, argv)


async def test_submit_wait_follows_the_task_and_prints_output_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=100)
        argv = ["submit", str(photo(tmp_path)), "--prompt", "a lighthouse", "--style", "anime"]
        code = await run_cli([*argv, "--url", hl.base_url, "--key", key, "--wait"])
        out, err = capsys.readouterr()
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("task tsk_")
        assert lines[1].startswith(hl.base_url)
        image = await hl.client.get(lines[1])
        assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
        progress = err.splitlines()
        assert progress[-1].split()[1] == "completed"  # one progress line per state (not a tty)


async def test_submit_takes_the_key_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice", credits=100)
        monkeypatch.setenv("HOOKLINE_API_KEY", key)
        argv = ["submit", str(photo(tmp_path)), "--prompt", "p", "--url", hl.base_url]
        code = await run_cli(argv)  # no --wait: the task is created and left to run
        out, _ = capsys.readouterr()
        assert code == 0 and "(pending, cost" in out


async def test_submit_reports_a_bad_key_a_non_image_and_a_failed_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOOKLINE_API_KEY", raising=False)
    async with running_hookline(tmp_path, sim_failure_rate=1.0, max_attempts=1) as hl:
        key = await hl.create_user("alice", credits=100)
        image = str(photo(tmp_path))
        base = ["--prompt", "p", "--url", hl.base_url, "--wait"]

        assert await run_cli(["submit", image, *base, "--key", "hk_wrong"]) == 1
        assert "invalid API key (invalid_key)" in capsys.readouterr().err

        text = tmp_path / "notes.png"
        text.write_text("not an image at all")
        assert await run_cli(["submit", str(text), *base, "--key", key]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "image" in err

        assert await run_cli(["submit", image, *base, "--key", key]) == 1
        err = capsys.readouterr().err
        assert "failed" in err.splitlines()[-2] and "credits refunded" in err.splitlines()[-1]

        assert await run_cli(["submit", image, "--prompt", "p", "--url", hl.base_url]) == 2
        assert "HOOKLINE_API_KEY" in capsys.readouterr().err
