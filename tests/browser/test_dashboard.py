"""The dashboard in headless Chromium, driven over the DevTools protocol: a wrong key is refused
clearly, the right one connects, a photo is uploaded and its task is watched live to ``completed``
with the watermarked result shown; the page keeps its key out of localStorage and breaks no CSP
rule. A screenshot goes to tests/artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image, ImageDraw

from tests.support.hookline import running_hookline

pytestmark = [pytest.mark.asyncio, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TIMEOUT_S = 90


class Cdp:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            future = self._pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(message)
            elif "method" in message:
                self.events.append(message)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        message = await asyncio.wait_for(future, TIMEOUT_S)
        if "error" in message:
            raise RuntimeError(f"{method}: {message['error']}")
        result: dict[str, Any] = message["result"]
        return result

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str) -> Any:
        """Wait until ``expression`` is truthy in the page (a generous bound, no timing test)."""
        async with asyncio.timeout(TIMEOUT_S):
            while not (value := await self.js(expression)):
                await asyncio.sleep(0.05)
        return value

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Cdp]:
    """Headless Chromium on a free DevTools port; yields a client of its first page."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--window-size=1280,1500",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(TIMEOUT_S):
            while b"DevTools listening on" not in (line := await proc.stderr.readline()):
                assert line, "chromium exited before opening its DevTools port"
        port = httpx.URL(line.decode().split("on", 1)[1].strip()).port
        # Keep draining stderr so Chromium never blocks on a full pipe.
        drain = asyncio.create_task(proc.stderr.read())
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            cdp = Cdp(ws)
            try:
                yield cdp
            finally:
                await cdp.close()
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def portrait(path: Path) -> Path:
    image = Image.new("RGB", (480, 360), "#31556f")
    draw = ImageDraw.Draw(image)
    draw.ellipse((170, 70, 310, 230), fill="#e8c39e")
    draw.rectangle((140, 230, 340, 360), fill="#c0392b")
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return path


async def submit_form(cdp: Cdp, form: str) -> None:
    await cdp.js(f"document.getElementById({form!r}).requestSubmit()")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
async def test_dashboard_submits_a_photo_and_shows_it_completed(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl, chromium(tmp_path) as cdp:
        key = await hl.create_user("alice", credits=100)
        page = await hl.client.get("/")
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"

        await cdp.call("Page.enable")
        await cdp.call("Log.enable")
        await cdp.call("Runtime.enable")
        await cdp.call("Page.navigate", url=hl.base_url + "/")
        await cdp.until("document.readyState === 'complete' && !!document.getElementById('key')")

        # A wrong key: a clear error, and the app stays closed.
        await cdp.js("document.getElementById('key').value = 'hk_wrong'")
        await submit_form(cdp, "key-form")
        error = await cdp.until(
            "(e => !e.hidden && e.textContent)(document.getElementById('key-error'))"
        )
        assert "refused" in error and "invalid API key" in error
        assert await cdp.js("document.getElementById('app').hidden") is True

        # The right key, not remembered: sessionStorage only.
        await cdp.js(f"document.getElementById('key').value = {key!r}")
        await submit_form(cdp, "key-form")
        await cdp.until("document.getElementById('style').options.length > 1")
        assert await cdp.js("localStorage.getItem('hookline.key')") is None
        assert await cdp.js("sessionStorage.getItem('hookline.key')") == key
        assert "alice" in await cdp.js("document.getElementById('whoami').textContent")

        doc = await cdp.call("DOM.getDocument")
        node = await cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        photo = portrait(tmp_path / "portrait.jpg")
        await cdp.call("DOM.setFileInputFiles", files=[str(photo)], nodeId=node["nodeId"])
        await cdp.js("document.getElementById('prompt').value = 'a portrait at golden hour'")
        await cdp.js("document.getElementById('style').value = 'anime'")
        await submit_form(cdp, "submit-form")

        await cdp.until("document.getElementById('live-state').textContent === 'completed'")
        width = await cdp.until(
            "(i => i && i.complete && i.naturalWidth)(document.querySelector('#result img'))"
        )
        assert width > 0
        await cdp.until("!!document.querySelector('#histogram svg')")
        await cdp.until("document.querySelectorAll('#tasks tbody tr').length === 1")
        log = await cdp.js("document.getElementById('live-log').textContent")
        assert "finished → completed" in log

        shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))

        messages = [
            e["params"]["entry"]["text"] for e in cdp.events if e["method"] == "Log.entryAdded"
        ]
        assert not [m for m in messages if "Content Security Policy" in m], messages
        exceptions = [e for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
        assert not exceptions, exceptions
