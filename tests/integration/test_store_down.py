"""A store that is unreachable at start-up: the process starts anyway, says it is not ready,
answers 503 with a clear error, and keeps trying to connect."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.hookline import running_hookline

pytestmark = pytest.mark.asyncio


async def test_unreachable_mongodb_gives_503_and_not_ready(tmp_path: Path) -> None:
    async with running_hookline(
        tmp_path, store_url="mongodb://127.0.0.1:1/hookline", store_timeout_s=0.2
    ) as hl:
        assert (await hl.client.get("/healthz")).status_code == 200
        ready = await hl.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] in ("unavailable", "store_unavailable")
        r = await hl.client.get("/v1/me", headers=hl.auth("hk_whatever"))
        assert r.status_code == 503 and "error" in r.json()
        create = await hl.client.post(
            "/v1/tasks",
            json={"inputs": [{"url": "https://x.test/a.png"}], "prompt": "p"},
            headers=hl.auth("hk_whatever"),
        )
        assert create.status_code == 503
