"""Hostile inputs through a real server: a URL input that is a compression bomb, JSON nested to
blow the parser's stack, and a stream of wrong keys. Each gets a clear error, charges nothing (or
refunds), and leaves the server answering — and a real key keeps working throughout.

The bomb is served by a loopback HTTP server listed in ``input_hosts``; different client
addresses come from ``X-Forwarded-For``, which uvicorn trusts from loopback (as it would from a
proxy listed in ``FORWARDED_ALLOW_IPS``).
"""

from __future__ import annotations

import gzip
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from service.http.ratelimit import RateLimiter, client_address
from service.http.requests import _JSON_STRING, nests_deeper
from tests.integration.test_api import (
    account,
    all_tasks,
    assert_error,
    body_for,
    new_caller,
    post_task,
)
from tests.support.hookline import running_hookline


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(out, "PNG")
    return out.getvalue()


# 50 MB once decoded, 50 KB on the wire. Without the fix the fetcher counted decoded bytes and
# stopped at its limit: this size keeps such a run bounded, while still telling the two apart.
BOMB = gzip.compress(png() + b"\0" * 50_000_000, compresslevel=9, mtime=0)


@pytest.fixture(scope="module")
def bomb_server() -> Iterator[str]:
    """``host:port`` of a loopback server answering ``/bomb.png`` with a gzip bomb."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(BOMB)))
            self.end_headers()
            self.wfile.write(BOMB)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the fetcher hangs up without reading the body: expected

    httpd = Quiet(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- a compression bomb as a URL input ------------------------------------------------------------


async def test_a_bomb_url_input_fails_its_task_with_a_refund_and_the_server_lives_on(
    tmp_path: Path, bomb_server: str
) -> None:
    async with running_hookline(tmp_path, input_hosts=bomb_server) as hl:
        alice = await new_caller(hl, "alice")
        before = await account(hl, alice)
        task = await hl.create_task(alice.key, inputs=[{"url": f"http://{bomb_server}/bomb.png"}])
        final = await hl.wait_terminal(alice.key, task["id"])
        assert final["state"] == "failed"
        assert final["error"]["code"] == "unsupported_encoding"
        assert "Content-Encoding" in final["error"]["message"]
        assert final["refunded"] is True
        assert (await account(hl, alice)).balance == before.balance
        assert (await hl.client.get("/healthz")).status_code == 200
        after = await hl.create_task(alice.key)  # the same process goes on working
        assert (await hl.wait_terminal(alice.key, after["id"]))["state"] == "completed"


# --- JSON nested too deep -------------------------------------------------------------------------


def nested(depth: int) -> str:
    """A task body whose ``params`` value nests lists so the whole body is ``depth`` deep."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return '{"inputs": [], "prompt": "a", "params": {"x": ' + inner + "}}"


@pytest.mark.parametrize("depth", [33, 100_000])
async def test_json_nested_past_the_limit_is_400_and_writes_nothing(
    tmp_path: Path, depth: int
) -> None:
    """32 levels are allowed (``max_json_depth``); 33 are refused, and so are 100,000, which
    used to crash the parser (a 500)."""
    async with running_hookline(tmp_path) as hl:
        alice = await new_caller(hl, "alice")
        before = await account(hl, alice)
        headers = {**hl.auth(alice.key), "Content-Type": "application/json"}
        r = await hl.client.post("/v1/tasks", content=nested(depth), headers=headers)
        error = assert_error(r, 400, "json_too_deep")
        assert error["details"] == {"max_depth": 32}
        assert await account(hl, alice) == before
        assert await all_tasks(hl) == []
        at_limit = await hl.client.post("/v1/tasks", content=nested(32), headers=headers)
        assert at_limit.status_code == 422, at_limit.text  # parsed; refused by validation
        assert (await hl.client.get("/healthz")).status_code == 200


def test_the_depth_check_counts_arrays_and_objects_but_not_brackets_in_strings() -> None:
    four_deep = b'{"a": [{"b": []}], "c": {}}'
    assert not nests_deeper(four_deep, 4)
    assert nests_deeper(four_deep, 3)
    assert not nests_deeper(b'{"a": "[[[[[[[[\\"[[[[", "b": "]]}}"}', 1)
    assert nests_deeper(b"[{[{[{}]}]}]", 5)  # alternating kinds count one level each
    assert not nests_deeper(b"[{[{[{}]}]}]", 6)
    assert nests_deeper(b"[" * 100_000 + b"]" * 100_000, 32)


def test_an_unterminated_string_is_blanked_to_the_end_so_no_quote_is_scanned_twice() -> None:
    """A body of unterminated strings (``"\\"\\"\\"…``) once cost quadratic time: each quote
    started a string that ran to the end, failed for want of a closing quote, and the scan began
    again at the next quote (64 KB took 25 s of CPU). A string now ends at its closing quote or at
    the end of the body, so one pass blanks it all."""
    hostile = b'"' + b'\\"' * 32_000
    match = _JSON_STRING.match(hostile)
    assert match is not None and match.end() == len(hostile)
    assert _JSON_STRING.sub(b"", b'[1, "a\\"b", "open [[[') == b"[1, , "
    assert not nests_deeper(hostile, 400)
    assert nests_deeper(b"[" * 401 + hostile, 400)


# --- failed authentication, per client address ---------------------------------------------------


async def test_failed_auth_is_429_after_the_burst_while_a_valid_key_still_works(
    tmp_path: Path,
) -> None:
    # burst 3, then about one failure every 17 minutes: the test never sees a refill
    async with running_hookline(
        tmp_path, auth_failure_burst=3, auth_failure_rate_per_s=0.001
    ) as hl:
        alice = await new_caller(hl, "alice")
        before = await account(hl, alice)
        wrong = hl.auth("hk_not-a-real-key")
        for _ in range(3):
            assert_error(await hl.client.get("/v1/me", headers=wrong), 401, "invalid_key")
        r = await hl.client.get("/v1/me", headers=wrong)
        error = assert_error(r, 429, "too_many_auth_failures")
        assert int(r.headers["retry-after"]) >= 1
        assert error["details"]["retry_after_s"] > 0
        assert_error(await post_task(hl, alice, body_for(alice), headers=wrong), 429)
        assert_error(await hl.client.get("/v1/tasks"), 429, "too_many_auth_failures")  # no key
        # the real key, from the very same address, is never refused by this limit
        for _ in range(5):
            assert (await hl.client.get("/v1/me", headers=hl.auth(alice.key))).status_code == 200
        assert (await post_task(hl, alice, body_for(alice))).status_code == 202
        # another client address has its own budget of failures
        elsewhere = {**wrong, "X-Forwarded-For": "203.0.113.7"}
        assert_error(await hl.client.get("/v1/me", headers=elsewhere), 401, "invalid_key")
        # nothing was charged by the refused requests (the one task cost what it costs)
        after = await account(hl, alice)
        assert len(after.task_ids) == 1 and after.balance < before.balance


def test_the_table_of_failing_addresses_is_bounded() -> None:
    limiter = RateLimiter(0.001, 1, max_keys=100)
    for i in range(1_000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100


def test_an_ipv6_client_counts_as_its_64_prefix() -> None:
    assert client_address("2001:db8:1:2::1") == client_address("2001:db8:1:2:ffff::9")
    assert client_address("2001:db8:1:2::1") != client_address("2001:db8:1:3::1")
    assert client_address("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_address("203.0.113.7") == "203.0.113.7"
    assert client_address(None) == "unknown"
