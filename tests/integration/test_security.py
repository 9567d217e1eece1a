"""Security properties: CORS off by default, callback tokens unguessable and bound to one task."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from statemachine.states import State
from tests.support.hookline import install_manual_provider, running_hookline

pytestmark = pytest.mark.asyncio


async def test_cors_is_off_by_default(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        r = await hl.client.options(
            "/v1/tasks",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers
        r = await hl.client.get("/healthz", headers={"Origin": "https://evil.test"})
        assert "access-control-allow-origin" not in r.headers


async def test_cors_allows_only_the_configured_origins(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, cors_origins="https://app.example") as hl:
        ok = await hl.client.get("/healthz", headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = await hl.client.get("/healthz", headers={"Origin": "https://evil.test"})
        assert "access-control-allow-origin" not in other.headers


async def test_callback_tokens_have_at_least_128_bits_and_are_bound_to_one_task(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        manual = await install_manual_provider(hl)
        key = await hl.create_user("alice")
        a = (await hl.create_task(key, provider="manual"))["id"]
        b = (await hl.create_task(key, provider="manual"))["id"]
        ta = await hl.store.get_task(a)
        tb = await hl.store.get_task(b)
        assert ta is not None and tb is not None
        for token in (ta.callback_token, tb.callback_token):
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            assert len(raw) * 8 >= 128
        assert ta.callback_token != tb.callback_token
        # wait until both are submitted, then use A's token on B's callback
        async with asyncio.timeout(30):  # a hang fails the test instead of stalling the suite
            for task_id in (a, b):
                while (
                    t := await hl.store.get_task(task_id)
                ) and t.state is not State.AI_PROCESSING:
                    await asyncio.sleep(0.01)
        job_b = next(j for j in manual.jobs.values() if j.submission.task_id == b)
        manual.finish(job_b.job_id)
        r = await manual.deliver(job_b.job_id, token=ta.callback_token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_token"
        still = await hl.store.get_task(b)
        assert still is not None and still.state is State.AI_PROCESSING
