"""The API fuzzed by schemathesis from its own document, against a live server.

Every operation of ``/openapi.json`` gets generated requests (valid and invalid) with a real API
key; schemathesis's ``ignored_auth`` check resends the successful ones without a key and with a
made-up one. Every response must be no 5xx and conform to the document (status code, content
type, body schema). Afterwards the store must be consistent: each user's balance is the sum of
their ledger, and each task's history is a path through the state machine.

``HOOKLINE_FUZZ_EXAMPLES`` (per operation; small in ``make test``, 2000 in ``make fuzz``) and
``HOOKLINE_FUZZ_SEED`` set the size and the seed: a run is reproducible.

Requests are steered at the edges so the server never leaves loopback and real tasks run: URL
inputs are pointed at a closed loopback port (the input fetcher refuses it and the task fails
with a refund), and some upload keys are replaced by the caller's real upload.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from service.http.app import create_app
from service.http.auth import hash_key, new_api_key
from service.settings import Settings
from statemachine import clock
from statemachine.sqlite_store import SqliteStore
from statemachine.states import Event, is_valid_path
from tests.support.server import listening_socket, serve_app_in_thread

EXAMPLES = int(os.environ.get("HOOKLINE_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("HOOKLINE_FUZZ_SEED", "20260909"))
USERS = {"fuzzer": 400, "admin": 0}
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REFUSED_URL = "http://127.0.0.1:9/input.png"  # loopback, not an allowed input host
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
]


@dataclass
class FuzzServer:
    base_url: str
    store_url: str
    keys: dict[str, str]
    upload: str
    started: float = field(default_factory=time.monotonic)
    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def _create_users(store_url: str) -> dict[str, str]:
    store = SqliteStore.from_url(store_url)
    await store.open()
    try:
        keys = {}
        for name, credits in USERS.items():
            keys[name] = new_api_key()
            await store.create_user(
                name,
                credits,
                is_admin=name == "admin",
                key_hash=hash_key(keys[name]),
                now=clock.now(),
            )
        return keys
    finally:
        await store.close()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    tmp = tmp_path_factory.mktemp("fuzz")
    store_url = f"sqlite:///{tmp / 'hookline.db'}"
    keys = asyncio.run(_create_users(store_url))
    sock, base_url = listening_socket()
    values: dict[str, Any] = {
        "store_url": store_url,
        "blob_url": f"file://{tmp / 'blobs'}",
        "var_dir": tmp / "var",
        "public_url": base_url,
        "provider": "sim",
        "simulator": True,
        "auth_failure_rate_per_s": 0,
        "sim_latency": "fixed:0.05",
        "reaper_interval_s": 0.2,
        "retry_backoff_s": 0.05,
        "rate_limit_per_s": 0,
        "log_level": "error",
    }
    app = create_app(Settings(_env_file=None, **values))  # type: ignore[call-arg]
    with serve_app_in_thread(app, sock=sock) as url:
        r = httpx.post(
            url + "/v1/uploads",
            content=_jpeg(),
            headers={"Authorization": f"Bearer {keys['fuzzer']}", "Content-Type": "image/jpeg"},
        )
        assert r.status_code == 201, r.text
        server = FuzzServer(url, store_url, keys, r.json()["key"])
        yield server
        summary = {
            "cases": server.cases,
            "duration_s": round(time.monotonic() - server.started, 1),
            "seed": SEED,
            "examples_per_operation": EXAMPLES,
            "statuses": dict(sorted(server.statuses.items())),
        }
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "fuzz.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nfuzz: {summary}")


def _call(case: Any, server: FuzzServer) -> None:
    _steer(case.body, server.upload)
    headers = {}
    if case.operation.definition.raw.get("security") != []:
        headers["Authorization"] = f"Bearer {server.keys['fuzzer']}"
    response = case.call_and_validate(
        base_url=server.base_url, headers=headers, checks=CHECKS, timeout=60
    )
    server.cases += 1
    server.statuses[response.status_code] = server.statuses.get(response.status_code, 0) + 1


def _steer(body: Any, upload: str) -> None:
    """Keep URL inputs on loopback; in two requests of three (chosen deterministically), use the
    caller's real upload and drop a made-up style or provider, so that tasks get created."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return
    steer = zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 3 != 0
    for item in body["inputs"]:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            item["url"] = REFUSED_URL
        if steer and isinstance(item, dict) and isinstance(item.get("upload"), str):
            item["upload"] = upload
    if steer:
        body.pop("style", None)
        body.pop("provider", None)


def test_every_response_conforms_to_the_document(fuzz_server: FuzzServer) -> None:
    """Each operation, with valid and with invalid requests; every failure is reported."""
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19  # every route of the app (test_openapi.py checks which)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(SEED)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                _call(case, fuzz_server)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing in the request can be invalid
            except (Exception, BaseExceptionGroup) as exc:  # (schemathesis's FailureGroup)
                # one operation's failure must not hide the others'
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)


async def _consistency(store_url: str) -> tuple[int, list[str]]:
    store = SqliteStore.from_url(store_url)
    await store.open()
    problems: list[str] = []
    try:
        for name in USERS:
            user = await store.get_user(name)
            assert user is not None
            ledger = await store.ledger(name)
            if user.balance != sum(e.amount for e in ledger):
                problems.append(f"{name}: balance {user.balance} != ledger {ledger}")
        count, cursor = 0, None
        while True:
            page = await store.list_tasks(None, None, 100, cursor)
            for task in page.items:
                count += 1
                try:
                    steps = [(h.source, h.dest, Event(h.event)) for h in task.history]
                except ValueError:
                    steps = []
                    problems.append(f"{task.id}: unknown event in {task.history}")
                if not is_valid_path(steps) or (steps and steps[-1][1] is not task.state):
                    problems.append(f"{task.id}: history {task.history} is no path to {task.state}")
            if page.next is None:
                break
            cursor = page.next
        return count, problems
    finally:
        await store.close()


def test_the_store_is_consistent_after_fuzzing(fuzz_server: FuzzServer) -> None:
    """Runs after the fuzzing above (same module, same server)."""
    tasks, problems = asyncio.run(_consistency(fuzz_server.store_url))
    assert not problems, problems
    print(f"\nfuzz: {tasks} tasks checked")
