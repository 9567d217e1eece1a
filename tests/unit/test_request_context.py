"""The request id middleware (service/http/middleware.py)."""

from __future__ import annotations

import os
import random
import re

import httpx
import pytest
import structlog
from starlette.types import Receive, Scope, Send

from service.http.middleware import RequestContext


async def _echo_bound_id(scope: Scope, receive: Receive, send: Send) -> None:
    bound = structlog.contextvars.get_contextvars()["request_id"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": bound.encode()})


def _client() -> httpx.AsyncClient:
    app = RequestContext(_echo_bound_id)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hl")


async def test_a_new_request_id_is_echoed_bound_and_needs_no_os_randomness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_os_randomness(n: int) -> bytes:
        raise AssertionError("a request id asked the OS for randomness (a GIL-releasing call)")

    monkeypatch.setattr(os, "urandom", no_os_randomness)
    monkeypatch.setattr(random, "_urandom", no_os_randomness)  # behind secrets.token_*
    async with _client() as client:
        answers = [await client.get("/") for _ in range(3)]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert [a.text for a in answers] == ids  # the id in the logs is the one answered
    assert len(set(ids)) == 3


async def test_a_callers_request_id_is_kept_and_cut_to_64_characters() -> None:
    async with _client() as client:
        mine = await client.get("/", headers={"X-Request-ID": "trace-7"})
        long = await client.get("/", headers={"X-Request-ID": "x" * 100})
    assert mine.headers["x-request-id"] == mine.text == "trace-7"
    assert long.headers["x-request-id"] == "x" * 64
