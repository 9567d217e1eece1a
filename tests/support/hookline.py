"""The whole hookline app on a real loopback port, for integration tests.

    async with running_hookline(tmp_path, sim_latency="fixed:0.05") as hl:
        key = await hl.create_user("alice", credits=100)
        r = await hl.client.post("/v1/tasks", json=..., headers=hl.auth(key))

Everything is real: uvicorn, SQLite on disk under ``tmp_path``, local blobs, the simulator mounted
in-process under /sim (switched on here, as ``serve --demo`` does; ``simulator=False`` turns it
off), signed webhooks over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from service.http.app import create_app
from service.http.auth import hash_key, new_api_key
from service.http.state import Web
from service.runtime import Runtime
from service.settings import Settings
from statemachine import clock
from statemachine.states import TERMINAL
from statemachine.store import TaskStore
from tests.support.server import listening_socket, serve_app


@dataclass
class Hookline:
    base_url: str
    settings: Settings
    client: httpx.AsyncClient
    app: Any

    @property
    def runtime(self) -> Runtime:
        """The running app's runtime (store, blobs, providers, runner, …), for white-box
        assertions."""
        runtime: Runtime = self.app.state.runtime
        return runtime

    @property
    def web(self) -> Web:
        """The HTTP layer's state (rate limiter, caches, SSE ping interval)."""
        web: Web = self.app.state.web
        return web

    @property
    def store(self) -> TaskStore:
        return self.runtime.store

    @property
    def sim_token(self) -> str:
        """The API token of the mounted simulator (random per start unless configured)."""
        simulator = self.runtime.simulator
        assert simulator is not None, "the simulator is not mounted (simulator=False)"
        return simulator.config.api_token

    @property
    def sim_auth(self) -> dict[str, str]:
        """The Authorization header the mounted simulator accepts."""
        return self.auth(self.sim_token)

    async def create_user(self, name: str, credits: int = 100, *, admin: bool = False) -> str:
        key = new_api_key()
        await self.store.create_user(
            name, credits, is_admin=admin, key_hash=hash_key(key), now=clock.now()
        )
        return key

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def upload(self, key: str, size: tuple[int, int] = (64, 48), color: str = "teal") -> str:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "JPEG")
        r = await self.client.post(
            "/v1/uploads",
            content=buf.getvalue(),
            headers={**self.auth(key), "Content-Type": "image/jpeg"},
        )
        assert r.status_code == 201, r.text
        upload: str = r.json()["key"]
        return upload

    async def create_task(self, key: str, **body: Any) -> dict[str, Any]:
        if "inputs" not in body:
            body["inputs"] = [{"upload": await self.upload(key)}]
        body.setdefault("prompt", "a lighthouse at dusk")
        r = await self.client.post("/v1/tasks", json=body, headers=self.auth(key))
        assert r.status_code == 202, r.text
        task: dict[str, Any] = r.json()
        return task

    async def wait_terminal(
        self, key: str, task_id: str, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll until the task is terminal (a generous bound: a hang fails, speed is not tested)."""
        terminal = {s.value for s in TERMINAL}
        async with asyncio.timeout(timeout_s):
            while True:
                r = await self.client.get(f"/v1/tasks/{task_id}", headers=self.auth(key))
                task: dict[str, Any] = r.json()
                if task["state"] in terminal:
                    return task
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_hookline(tmp_path: Path, **overrides: Any) -> AsyncIterator[Hookline]:
    """hookline with test-friendly defaults (fast simulator, fast reaper); ``overrides`` are
    Settings fields."""
    sock, base_url = listening_socket()
    values: dict[str, Any] = {
        "store_url": f"sqlite:///{tmp_path / 'hookline.db'}",
        "blob_url": f"file://{tmp_path / 'blobs'}",
        "var_dir": tmp_path / "var",
        "public_url": base_url,
        "provider": "sim",
        "simulator": True,
        "sim_latency": "fixed:0.05",
        "reaper_interval_s": 0.2,
        "retry_backoff_s": 0.05,
        "rate_limit_per_s": 0,
        "log_level": "warning",
    }
    values.update(overrides)
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    app = create_app(settings)
    async with (
        serve_app(app, sock=sock) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield Hookline(url, settings, client, app)


async def install_manual_provider(hl: Hookline) -> Any:
    """Register a ``ManualProvider`` named "manual" in the running app; its outputs are a real
    image served by hookline's own signed file URLs."""
    from service.media.fetch import SafeFetcher
    from service.styles import ProviderRule
    from tests.support.manual_provider import ManualProvider

    rt = hl.runtime
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), "orange").save(buf, "PNG")
    await rt.blobs.put("fixtures/output.png", buf.getvalue(), "image/png")
    url = await rt.blobs.url("fixtures/output.png", 3600)
    provider = ManualProvider(http=rt.http, output_url=url)
    rt.providers["manual"] = provider
    rt.catalogue.providers["manual"] = ProviderRule("manual")  # users may choose it
    host = httpx.URL(hl.base_url)
    rt.output_fetchers["manual"] = SafeFetcher(
        rt.http, allow_hosts={f"{host.host}:{host.port}"}, max_bytes=10_000_000, timeout_s=10
    )
    return provider
