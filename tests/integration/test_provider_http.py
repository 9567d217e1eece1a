"""``request_json``, the one way adapters call a provider: a large body (a data-URI input, and its
echo in the answer) is not left for the cyclic GC.

httpx's request objects and httpcore's hold each other, and a response is reachable from them: a
body either kept lingered until a full collection — hundreds of KB for every submit in flight,
which made every waiting task cost ~600 KiB of memory in bench_e2e.

Each test runs on both ways a call can go: ``new_client``'s client (``OutboundClient.exchange``,
aiohttp only: what hookline runs) and any other httpx client (httpx's own path)."""

from __future__ import annotations

import gc
import tracemalloc

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from callbacks.errors import PermanentProviderError, RetryableProviderError
from callbacks.http import request_json
from callbacks.transport import new_client
from tests.support.gc import collector_off
from tests.support.server import serve_app

BIG = 300_000


async def echo(request: Request) -> Response:
    body = await request.body()
    if request.query_params.get("fail"):
        return Response(b'{"detail": "no such model"}', 404, media_type="application/json")
    if request.query_params.get("junk"):
        return Response(b"<html>", 200, media_type="text/html")
    return Response(b'{"id": "p1", "input": "' + b"x" * len(body) + b'"}', 201)


APP = Starlette(routes=[Route("/", echo, methods=["POST"])])
CLIENTS = {"exchange": lambda: new_client(timeout=10), "httpx": lambda: httpx.AsyncClient()}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> httpx.AsyncClient:
    return CLIENTS[request.param]()


async def test_large_bodies_are_freed_when_the_call_returns_not_by_the_cyclic_gc(
    client: httpx.AsyncClient,
) -> None:
    with collector_off():
        async with serve_app(APP) as url, client:
            await request_json(client, "POST", url, provider="p", json={"warm": True})
            tracemalloc.start()
            try:
                for _ in range(5):
                    body = {"a": "y" * BIG}
                    answer = await request_json(client, "POST", url, provider="p", json=body)
                    assert answer["id"] == "p1" and len(answer["input"]) > BIG
                del answer, body
                held = tracemalloc.get_traced_memory()[0]
                gc.collect()
                left_for_the_gc = held - tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
    # 5 requests and 5 answers of 300 KB each: ~3 MB if the cycles kept them
    assert left_for_the_gc < BIG, f"{left_for_the_gc} bytes were waiting for the cyclic GC"


async def test_errors_and_non_json_answers_keep_their_status_and_snippet(
    client: httpx.AsyncClient,
) -> None:
    async with serve_app(APP) as url, client:
        with pytest.raises(PermanentProviderError) as refused:
            await request_json(client, "POST", f"{url}/?fail=1", provider="p", json={})
        assert refused.value.details["status"] == 404
        assert "no such model" in refused.value.message
        assert isinstance(refused.value.__cause__, httpx.HTTPStatusError)
        with pytest.raises(RetryableProviderError) as junk:
            await request_json(client, "POST", f"{url}/?junk=1", provider="p", json={})
        assert junk.value.details["body"] == "<html>"
