"""The REST contract through a real server: every bad input gets a clear JSON error with the right
status AND changes nothing (no task, no charge, no ledger entry); the happy paths return the shapes
DESIGN.md promises.

"Nothing written" is checked three ways after each refusal: the caller's balance (``/v1/me``), the
caller's task list (``/v1/tasks``) and the store's ledger for the user.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from statemachine.states import State
from statemachine.store import LedgerKind
from tests.support.hookline import Hookline, running_hookline
from tests.support.logs import captured_logs

COST = 5  # one output of a task without a style ([plain] in service/styles.toml)
MAX_INPUTS = 2
MAX_PROMPT = 50
MAX_BODY = 4096
HOLD = {"sim_latency": "fixed:600", "sim_webhook_loss": 1.0}  # tasks wait in ai_processing

TASK_FIELDS = {
    "id",
    "state",
    "attempts",
    "provider",
    "model",
    "style",
    "prompt",
    "cost",
    "refunded",
    "created_at",
    "updated_at",
    "history",
    "outputs",
    "error",
}


@dataclass
class Account:
    """What a refusal must leave untouched."""

    balance: int
    task_ids: list[str]
    ledger: list[tuple[LedgerKind, int, str | None]]


@dataclass
class Caller:
    name: str
    key: str
    upload: str


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``r`` is a JSON error of DESIGN.md's shape with ``status`` (and ``code``); its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


async def account(hl: Hookline, who: Caller) -> Account:
    me = await hl.client.get("/v1/me", headers=hl.auth(who.key))
    assert me.status_code == 200, me.text
    listed = await hl.client.get("/v1/tasks", params={"limit": 100}, headers=hl.auth(who.key))
    assert listed.status_code == 200, listed.text
    ledger = [(e.kind, e.amount, e.task_id) for e in await hl.store.ledger(who.name)]
    return Account(me.json()["balance"], [t["id"] for t in listed.json()["items"]], ledger)


async def all_tasks(hl: Hookline) -> list[str]:
    page = await hl.store.list_tasks(None, None, 100, None)
    return [t.id for t in page.items]


async def new_caller(hl: Hookline, name: str, credits: int = 100, *, admin: bool = False) -> Caller:
    key = await hl.create_user(name, credits, admin=admin)
    return Caller(name, key, await hl.upload(key))


def body_for(who: Caller, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"upload": who.upload}], "prompt": "a lighthouse"}
    body.update(fields)
    return body


async def post_task(
    hl: Hookline, who: Caller, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    # json.dumps rather than httpx's json=: a None body must be sent as ``null``, not omitted
    return await hl.client.post(
        "/v1/tasks",
        content=json.dumps(body),
        headers={**hl.auth(who.key), "Content-Type": "application/json", **(headers or {})},
    )


async def wait_state(hl: Hookline, who: Caller, task_id: str, state: str) -> dict[str, Any]:
    """Poll until the task reaches ``state`` (a generous bound: a hang fails, speed is untested)."""
    async with asyncio.timeout(30):
        while True:
            r = await hl.client.get(f"/v1/tasks/{task_id}", headers=hl.auth(who.key))
            task: dict[str, Any] = r.json()
            if task["state"] == state:
                return task
            await asyncio.sleep(0.02)


@pytest.fixture
async def hl(tmp_path: Path) -> AsyncIterator[Hookline]:
    async with running_hookline(
        tmp_path, max_inputs=MAX_INPUTS, max_prompt_chars=MAX_PROMPT, max_body_bytes=MAX_BODY
    ) as running:
        yield running


@pytest.fixture
async def alice(hl: Hookline) -> Caller:
    return await new_caller(hl, "alice")


# --- bad bodies: 400 / 422, nothing written ------------------------------------------------------


def _too_many_inputs(who: Caller) -> dict[str, Any]:
    return body_for(who, inputs=[{"upload": who.upload}] * (MAX_INPUTS + 1))


INVALID_BODIES: dict[str, tuple[Any, str | None]] = {
    # name: (body, or a function of the caller giving it; the expected error code)
    "prompt_not_a_string": (lambda w: body_for(w, prompt=5), "invalid_request"),
    "num_outputs_as_string": (lambda w: body_for(w, num_outputs="2"), "invalid_request"),
    "num_outputs_as_bool": (lambda w: body_for(w, num_outputs=True), "invalid_request"),
    "num_outputs_as_float": (lambda w: body_for(w, num_outputs=2.0), "invalid_request"),
    "num_outputs_zero": (lambda w: body_for(w, num_outputs=0), "invalid_request"),
    "num_outputs_too_many": (lambda w: body_for(w, num_outputs=5), "invalid_request"),
    "unknown_top_level_field": (lambda w: body_for(w, colour="red"), "invalid_request"),
    "unknown_input_field": (
        lambda w: body_for(w, inputs=[{"upload": w.upload, "crop": True}]),
        "invalid_request",
    ),
    "input_with_upload_and_url": (
        lambda w: body_for(w, inputs=[{"upload": w.upload, "url": "https://a.example/x.jpg"}]),
        "invalid_request",
    ),
    "input_url_not_http": (
        lambda w: body_for(w, inputs=[{"url": "file:///etc/passwd"}]),
        "invalid_request",
    ),
    "no_inputs": (lambda w: body_for(w, inputs=[]), "invalid_request"),
    "inputs_missing": (lambda w: {"prompt": "a lighthouse"}, "invalid_request"),
    "prompt_missing": (lambda w: {"inputs": [{"upload": w.upload}]}, "invalid_request"),
    "prompt_empty": (lambda w: body_for(w, prompt=""), "invalid_request"),
    "prompt_blank": (lambda w: body_for(w, prompt="   \n\t "), "invalid_request"),
    "too_many_inputs": (_too_many_inputs, "too_many_inputs"),
    "prompt_too_long": (lambda w: body_for(w, prompt="x" * (MAX_PROMPT + 1)), "prompt_too_long"),
    "unknown_provider": (lambda w: body_for(w, provider="midjourney"), "unknown_provider"),
    "unknown_style": (lambda w: body_for(w, style="cubism"), "unknown_style"),
    "unknown_upload": (
        lambda w: body_for(w, inputs=[{"upload": f"uploads/{w.name}/{'0' * 32}.jpg"}]),
        "unknown_upload",
    ),
    "upload_key_traversal": (
        lambda w: body_for(w, inputs=[{"upload": f"uploads/{w.name}/../../secret.key"}]),
        "unknown_upload",
    ),
    "params_nested_object": (lambda w: body_for(w, params={"a": {"b": 1}}), "invalid_request"),
    "params_null_value": (lambda w: body_for(w, params={"a": None}), "invalid_request"),
    "params_huge_int": (lambda w: body_for(w, params={"seed": 2**70}), "invalid_request"),
    "params_bad_name": (lambda w: body_for(w, params={"a b;": 1}), "invalid_request"),
    "params_long_string": (lambda w: body_for(w, params={"a": "x" * 2001}), "invalid_request"),
    "model_with_odd_characters": (lambda w: body_for(w, model="a b\n"), "invalid_request"),
    "body_is_a_list": (lambda w: [body_for(w)], "invalid_request"),
    "body_is_null": (lambda w: None, "invalid_request"),
    "body_is_a_string": (lambda w: "inputs", "invalid_request"),
}


@pytest.mark.parametrize("case", sorted(INVALID_BODIES))
async def test_invalid_body_is_422_and_writes_nothing(
    hl: Hookline, alice: Caller, case: str
) -> None:
    make, code = INVALID_BODIES[case]
    before = await account(hl, alice)
    r = await post_task(hl, alice, make(alice))
    error = assert_error(r, 422, code)
    if code == "invalid_request":
        assert isinstance(error["details"], list) and error["details"], error  # says what and where
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


MALFORMED = {
    "truncated": b'{"inputs": [',
    "trailing_comma": b'{"prompt": "a",}',
    "single_quotes": b"{'prompt': 'a'}",
    "empty": b"",
    "not_utf8": b'{"prompt": "\xff\xfe"}',
    "nan_constant": b'{"inputs": [], "prompt": "a", "params": {"x": NaN}}',
    "infinity_constant": b'{"inputs": [], "prompt": "a", "params": {"x": -Infinity}}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_json_is_400_and_writes_nothing(
    hl: Hookline, alice: Caller, case: str
) -> None:
    before = await account(hl, alice)
    r = await hl.client.post(
        "/v1/tasks",
        content=MALFORMED[case],
        headers={**hl.auth(alice.key), "Content-Type": "application/json"},
    )
    assert_error(r, 400, "malformed_json")
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def test_another_users_upload_is_refused(hl: Hookline, alice: Caller) -> None:
    """Bob can't use (or learn about) Alice's upload: the same answer as for an unknown key."""
    bob = await new_caller(hl, "bob")
    before = await account(hl, bob)
    r = await post_task(hl, bob, body_for(bob, inputs=[{"upload": alice.upload}]))
    assert_error(r, 422, "unknown_upload")
    assert await account(hl, bob) == before
    assert await all_tasks(hl) == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_non_json_content_type_is_415(hl: Hookline, alice: Caller, content_type: str) -> None:
    before = await account(hl, alice)
    r = await hl.client.post(
        "/v1/tasks",
        content=json.dumps(body_for(alice)),
        headers={**hl.auth(alice.key), "Content-Type": content_type},
    )
    assert_error(r, 415, "not_json")
    assert await account(hl, alice) == before


async def test_json_with_charset_is_accepted(hl: Hookline, alice: Caller) -> None:
    r = await hl.client.post(
        "/v1/tasks",
        content=json.dumps(body_for(alice)),
        headers={**hl.auth(alice.key), "Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 202, r.text


# --- oversized bodies: 413 before reading them all ------------------------------------------------


def padded_body(who: Caller, size: int) -> bytes:
    """A valid task body padded with whitespace to ``size`` bytes (only its size is wrong)."""
    raw = json.dumps(body_for(who)).encode()
    return raw + b" " * (size - len(raw))


async def test_body_over_limit_with_content_length_is_413(hl: Hookline, alice: Caller) -> None:
    before = await account(hl, alice)
    r = await hl.client.post(
        "/v1/tasks",
        content=padded_body(alice, MAX_BODY + 1),
        headers={**hl.auth(alice.key), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "body_too_large")
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def test_body_at_limit_is_accepted(hl: Hookline, alice: Caller) -> None:
    r = await hl.client.post(
        "/v1/tasks",
        content=padded_body(alice, MAX_BODY),
        headers={**hl.auth(alice.key), "Content-Type": "application/json"},
    )
    assert r.status_code == 202, r.text


async def test_chunked_body_over_limit_is_413(hl: Hookline, alice: Caller) -> None:
    """No Content-Length (chunked transfer encoding): the limit is enforced while streaming."""
    data = padded_body(alice, MAX_BODY * 3)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    before = await account(hl, alice)
    r = await hl.client.post(
        "/v1/tasks",
        content=chunks(),
        headers={**hl.auth(alice.key), "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "body_too_large")
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def raw_request(base_url: str, head: bytes) -> tuple[int, bytes]:
    """Send a request head over a plain socket (no body follows) and read the answer."""
    parts = urlsplit(base_url)
    assert parts.hostname and parts.port
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            rest = await reader.read(65536)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1]), rest


async def test_huge_declared_length_is_refused_without_waiting_for_the_body(
    hl: Hookline, alice: Caller
) -> None:
    """A client declaring a gigabyte gets 413 at once: the server does not wait for the bytes."""
    host = urlsplit(hl.base_url).netloc
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    ).encode()
    status, rest = await raw_request(hl.base_url, head)
    assert status == 413
    assert b'"body_too_large"' in rest
    assert (await hl.client.get("/healthz")).status_code == 200


async def test_lying_content_length_cannot_smuggle_a_bigger_body(
    hl: Hookline, alice: Caller
) -> None:
    """A Content-Length smaller than the bytes sent: only the declared bytes are the body (which
    is then malformed), the rest is never taken as part of it; nothing is written."""
    before = await account(hl, alice)
    host = urlsplit(hl.base_url).netloc
    body = padded_body(alice, MAX_BODY * 2)
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
    ).encode()
    status, _ = await raw_request(hl.base_url, head + body)
    assert status == 400
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def test_client_disconnecting_mid_body_is_not_a_server_error(
    hl: Hookline, alice: Caller
) -> None:
    """A client that hangs up halfway through its body is logged as such, not as an unhandled
    500 with a traceback; nothing is written and the server keeps answering."""
    before = await account(hl, alice)
    host = urlsplit(hl.base_url).netloc
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    # the server logs at warning in tests; see its info lines too while this test runs
    with captured_logs() as logs:
        parts = urlsplit(hl.base_url)
        assert parts.hostname and parts.port
        _, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(head + b'{"prompt": ')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):
            while not any(e["event"] == "client_disconnected" for e in logs):
                await asyncio.sleep(0.01)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert await account(hl, alice) == before
    assert (await hl.client.get("/healthz")).status_code == 200


# --- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_key"),
        ({"Authorization": "Bearer"}, "missing_key"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "missing_key"),
        ({"Authorization": "Bearer hk_not-a-real-key"}, "invalid_key"),
    ],
)
async def test_missing_or_invalid_key_is_401_and_writes_nothing(
    hl: Hookline, alice: Caller, headers: dict[str, str], code: str
) -> None:
    before = await account(hl, alice)
    for method, path in [
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/me"),
        ("GET", "/v1/styles"),
        ("POST", "/v1/uploads"),
    ]:
        r = await hl.client.request(method, path, json=body_for(alice), headers=headers)
        assert_error(r, 401, code)
    assert await account(hl, alice) == before
    assert await all_tasks(hl) == []


async def test_another_users_task_looks_exactly_like_an_unknown_one(
    hl: Hookline, alice: Caller
) -> None:
    """404 with the same body for a task that exists but is Alice's and for a made-up id, on
    every route that names a task: ids can't be probed."""
    bob = await new_caller(hl, "bob")
    task = (await post_task(hl, alice, body_for(alice))).json()
    unknown = "tsk_" + "0" * 24
    for path in ["/v1/tasks/{}", "/v1/tasks/{}/cancel"]:
        method = "POST" if path.endswith("cancel") else "GET"
        theirs = await hl.client.request(method, path.format(task["id"]), headers=hl.auth(bob.key))
        made_up = await hl.client.request(method, path.format(unknown), headers=hl.auth(bob.key))
        a = assert_error(theirs, 404, "task_not_found")
        b = assert_error(made_up, 404, "task_not_found")
        assert json.loads(json.dumps(a).replace(task["id"], unknown)) == b
    mine = await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(alice.key))
    assert mine.json()["state"] != State.CANCELLED.value  # bob's cancel did nothing
    assert (await account(hl, alice)).balance == 100 - COST


# --- credits --------------------------------------------------------------------------------------


async def test_insufficient_credits_is_402_and_writes_nothing(hl: Hookline) -> None:
    poor = await new_caller(hl, "poor", credits=COST - 1)
    before = await account(hl, poor)
    r = await post_task(hl, poor, body_for(poor))
    error = assert_error(r, 402, "insufficient_credits")
    assert error["details"] == {"balance": COST - 1, "cost": COST}
    after = await account(hl, poor)
    assert after == before
    assert after.ledger == [("grant", COST - 1, None)]
    assert await all_tasks(hl) == []


async def test_exact_balance_is_enough(hl: Hookline) -> None:
    exact = await new_caller(hl, "exact", credits=COST)
    assert (await post_task(hl, exact, body_for(exact))).status_code == 202
    assert (await account(hl, exact)).balance == 0
    assert_error(await post_task(hl, exact, body_for(exact, prompt="again")), 402)


# --- rate limit -----------------------------------------------------------------------------------


async def test_rate_limit_is_429_with_retry_after_per_key(tmp_path: Path) -> None:
    # burst 3, refill about one token every 17 minutes: the test never sees a refill
    async with running_hookline(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=3) as hl:
        alice = await new_caller(hl, "alice")  # token 1: the upload
        bob = await new_caller(hl, "bob")
        for _ in range(2):  # tokens 2 and 3
            assert (await hl.client.get("/v1/me", headers=hl.auth(alice.key))).status_code == 200
        r = await post_task(hl, alice, body_for(alice))
        error = assert_error(r, 429, "rate_limited")
        retry_after = r.headers["retry-after"]
        assert retry_after.isdigit() and int(retry_after) >= 1
        assert error["details"]["retry_after_s"] > 0
        assert_error(await hl.client.get("/v1/me", headers=hl.auth(alice.key)), 429)
        # nothing written for alice (checked in the store: the API would refuse her now)
        user = await hl.store.get_user("alice")
        assert user is not None and user.balance == 100
        assert [e.kind for e in await hl.store.ledger("alice")] == ["grant"]
        assert await all_tasks(hl) == []
        # another key is not affected
        assert (await post_task(hl, bob, body_for(bob))).status_code == 202


# --- idempotency ----------------------------------------------------------------------------------


async def test_idempotent_replay_returns_the_same_task_and_charges_once(
    hl: Hookline, alice: Caller
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await post_task(hl, alice, body_for(alice), headers)
    again = await post_task(hl, alice, body_for(alice), headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    after = await account(hl, alice)
    assert after.balance == 100 - COST
    assert after.task_ids == [first.json()["id"]]
    assert [kind for kind, _, _ in after.ledger] == ["grant", "debit"]


async def test_idempotency_key_with_another_body_is_409(hl: Hookline, alice: Caller) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await post_task(hl, alice, body_for(alice), headers)
    assert first.status_code == 202
    before = await account(hl, alice)
    r = await post_task(hl, alice, body_for(alice, prompt="something else"), headers)
    assert_error(r, 409, "idempotency_conflict")
    assert await account(hl, alice) == before


async def test_same_idempotency_key_for_two_users_is_independent(
    hl: Hookline, alice: Caller
) -> None:
    bob = await new_caller(hl, "bob")
    headers = {"Idempotency-Key": "shared-key"}
    a = await post_task(hl, alice, body_for(alice), headers)
    b = await post_task(hl, bob, body_for(bob, prompt="another body"), headers)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    assert (await account(hl, alice)).balance == 100 - COST
    assert (await account(hl, bob)).balance == 100 - COST


async def test_concurrent_requests_with_one_key_make_one_task_and_one_charge(
    hl: Hookline, alice: Caller
) -> None:
    headers = {"Idempotency-Key": "burst"}
    answers = await asyncio.gather(
        *(post_task(hl, alice, body_for(alice), headers) for _ in range(20))
    )
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["id"] for r in answers}) == 1
    after = await account(hl, alice)
    assert after.balance == 100 - COST
    assert len(after.task_ids) == 1
    assert [kind for kind, _, _ in after.ledger] == ["grant", "debit"]


@pytest.mark.parametrize("key", ["", "k" * 201])
async def test_bad_idempotency_key_is_422(hl: Hookline, alice: Caller, key: str) -> None:
    before = await account(hl, alice)
    r = await post_task(hl, alice, body_for(alice), {"Idempotency-Key": key})
    assert_error(r, 422, "bad_idempotency_key")
    assert await account(hl, alice) == before


# --- happy paths ----------------------------------------------------------------------------------


async def test_create_returns_202_with_every_task_field(hl: Hookline, alice: Caller) -> None:
    r = await post_task(hl, alice, body_for(alice, style="portrait", params={"seed": 7}))
    assert r.status_code == 202, r.text
    task = r.json()
    assert set(task) >= TASK_FIELDS
    assert task["id"].startswith("tsk_")
    assert task["state"] == "pending"
    assert task["attempts"] == 0
    assert task["provider"] == "sim"
    assert task["style"] == "portrait"
    assert task["prompt"] == "a lighthouse"
    assert task["cost"] == 10  # the style's cost (styles.toml), not the default
    assert task["refunded"] is False
    assert task["created_at"].endswith("Z") and task["updated_at"].endswith("Z")
    assert task["history"] == [] and task["outputs"] == [] and task["error"] is None
    assert "callback_token" not in json.dumps(task)
    got = await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(alice.key))
    assert got.status_code == 200
    assert got.json()["id"] == task["id"] and set(got.json()) >= TASK_FIELDS


async def test_a_task_runs_to_completed_with_outputs_and_history(
    hl: Hookline, alice: Caller
) -> None:
    task = (await post_task(hl, alice, body_for(alice))).json()
    done = await hl.wait_terminal(alice.key, task["id"])
    assert done["state"] == "completed"
    assert [h["event"] for h in done["history"]] == [
        "start",
        "submitted",
        "ai_succeeded",
        "finished",
    ]
    for entry in done["history"]:
        assert {"from", "to", "event", "at"} <= set(entry)
    assert len(done["outputs"]) == 1
    output = done["outputs"][0]
    assert set(output) == {"url", "width", "height", "content_type"}
    image = await hl.client.get(output["url"])
    assert image.status_code == 200 and image.headers["content-type"] == output["content_type"]


async def test_list_filters_by_state_and_pages_with_a_cursor(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, **HOLD) as hl:
        alice = await new_caller(hl, "alice")
        ids: list[str] = []
        for i in range(5):
            ids.append((await post_task(hl, alice, body_for(alice, prompt=f"n{i}"))).json()["id"])
        for task_id in ids[:2]:
            r = await hl.client.post(f"/v1/tasks/{task_id}/cancel", headers=hl.auth(alice.key))
            assert r.status_code == 200, r.text

        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            r = await hl.client.get("/v1/tasks", params=params, headers=hl.auth(alice.key))
            assert r.status_code == 200, r.text
            page = r.json()
            assert set(page) == {"items", "next"}
            assert len(page["items"]) <= 2
            seen += [t["id"] for t in page["items"]]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == list(reversed(ids))  # newest first, no duplicates, no gaps

        r = await hl.client.get(
            "/v1/tasks", params={"state": "cancelled"}, headers=hl.auth(alice.key)
        )
        cancelled = r.json()["items"]
        assert {t["id"] for t in cancelled} == set(ids[:2])
        assert {t["state"] for t in cancelled} == {"cancelled"}
        r = await hl.client.get(
            "/v1/tasks", params={"state": "completed"}, headers=hl.auth(alice.key)
        )
        assert r.json() == {"items": [], "next": None}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"state": "sleeping"}, "bad_state"),
        ({"limit": "0"}, "bad_limit"),
        ({"limit": "101"}, "bad_limit"),
        ({"limit": "ten"}, "bad_limit"),
        ({"limit": "-1"}, "bad_limit"),
        ({"cursor": "!!not-a-cursor!!"}, None),
        ({"cursor": "W10"}, None),  # base64 of "[]": decodes, but is not a cursor
    ],
)
async def test_bad_list_parameters_are_422(
    hl: Hookline, alice: Caller, params: dict[str, str], code: str | None
) -> None:
    r = await hl.client.get("/v1/tasks", params=params, headers=hl.auth(alice.key))
    assert_error(r, 422, code)


async def test_cancel_refunds_once_and_is_idempotent(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, **HOLD) as hl:
        alice = await new_caller(hl, "alice")
        task = (await post_task(hl, alice, body_for(alice))).json()
        await wait_state(hl, alice, task["id"], "ai_processing")
        assert (await account(hl, alice)).balance == 100 - COST

        first = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(alice.key))
        assert first.status_code == 200, first.text
        assert first.json()["state"] == "cancelled" and first.json()["refunded"] is True
        assert (await account(hl, alice)).balance == 100

        second = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(alice.key))
        assert second.status_code == 200, second.text
        assert second.json()["state"] == "cancelled" and second.json()["refunded"] is True
        after = await account(hl, alice)
        assert after.balance == 100
        assert [kind for kind, _, _ in after.ledger] == ["grant", "debit", "refund"]
        history = second.json()["history"]
        assert [h["event"] for h in history].count("cancel") == 1


async def test_cancelling_a_completed_task_is_409_and_refunds_nothing(
    hl: Hookline, alice: Caller
) -> None:
    task = (await post_task(hl, alice, body_for(alice))).json()
    done = await hl.wait_terminal(alice.key, task["id"])
    assert done["state"] == "completed"
    before = await account(hl, alice)
    r = await hl.client.post(f"/v1/tasks/{task['id']}/cancel", headers=hl.auth(alice.key))
    assert_error(r, 409, "not_cancellable")
    assert await account(hl, alice) == before
    got = await hl.client.get(f"/v1/tasks/{task['id']}", headers=hl.auth(alice.key))
    assert got.json()["state"] == "completed" and got.json()["refunded"] is False


async def test_me_styles_and_health(hl: Hookline, alice: Caller) -> None:
    me = await hl.client.get("/v1/me", headers=hl.auth(alice.key))
    assert me.status_code == 200
    assert me.json()["user"] == "alice" and me.json()["balance"] == 100

    styles = await hl.client.get("/v1/styles", headers=hl.auth(alice.key))
    assert styles.status_code == 200
    items = styles.json()["items"]
    assert {"portrait", "anime", "vintage"} <= {s["name"] for s in items}
    for style in items:
        assert {"name", "prompt_template", "provider", "model", "cost", "fallbacks"} <= set(style)

    assert (await hl.client.get("/healthz")).json() == {"status": "ok"}
    ready = await hl.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_admin_sees_every_users_tasks_and_users_only_their_own(
    hl: Hookline, alice: Caller
) -> None:
    bob = await new_caller(hl, "bob")
    root = await hl.create_user("root", 0, admin=True)
    a = (await post_task(hl, alice, body_for(alice))).json()["id"]
    b = (await post_task(hl, bob, body_for(bob))).json()["id"]

    listed = await hl.client.get("/v1/tasks", headers=hl.auth(root))
    assert {t["id"] for t in listed.json()["items"]} == {a, b}
    assert (await hl.client.get(f"/v1/tasks/{a}", headers=hl.auth(root))).status_code == 200
    assert (await account(hl, bob)).task_ids == [b]
    assert (await account(hl, alice)).task_ids == [a]


async def test_unknown_route_and_wrong_method_are_json_errors(hl: Hookline) -> None:
    assert_error(await hl.client.get("/v1/nothing-here"), 404)
    assert_error(await hl.client.delete("/v1/tasks"), 405)
