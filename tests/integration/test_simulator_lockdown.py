"""The simulator is a development tool (issue 13, item 4), proved through running servers.

- It runs only when asked: ``hookline serve --demo`` (what ``make run`` does) or
  ``HOOKLINE_SIMULATOR=true``. Without it there is no ``/sim`` route and no "sim" provider, and a
  default provider of "sim" stops the start with a message saying how to turn it on.
- Its API token is random per start unless ``HOOKLINE_SIM_API_TOKEN`` sets one; the old fixed
  token opens nothing. ``hookline simulator`` prints its random token.
- It fetches URL inputs only through hookline's SSRF-safe fetcher and posts webhooks only to its
  own hookline or ``HOOKLINE_SIM_WEBHOOK_HOSTS``: a loopback listener that records every
  connection proves no request is ever made anywhere else.
- Inputs it reads are bounded: no 100000x100000 render, no endless prompt, no 500 on deep JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.http.app import create_app
from service.providers import SimulatorOff
from service.settings import Settings
from tests.integration.test_api import assert_error
from tests.support.hookline import Hookline, running_hookline

HOOKLINE = str(Path(sys.executable).parent / "hookline")
OLD_FIXED_TOKEN = "sim-token"  # what every simulator accepted before
PREDICTIONS = "/sim/v1/models/acme/painter/predictions"
SMALL = {"width": 64, "height": 48}
WAIT_S = 60.0  # generous bounds: only reached when something is broken


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Recorder:
    """A loopback listener that records every connection made to it (and answers 204)."""

    port: int = 0
    connections: int = 0
    request_lines: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.request_lines.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            writer.write(
                b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # a TLS hello or a dropped connection: counted all the same
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def recording_listener() -> AsyncIterator[Recorder]:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.on_connect, "127.0.0.1", 0)
    recorder.port = server.sockets[0].getsockname()[1]
    async with server:
        yield recorder


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "teal").save(buf, "PNG")
    return buf.getvalue()


async def create_prediction(
    hl: Hookline, model_input: dict[str, Any] | None = None, **body: Any
) -> httpx.Response:
    """``POST`` a prediction to the mounted simulator with its own token."""
    payload = {"input": {"prompt": "a lighthouse", **SMALL, **(model_input or {})}, **body}
    return await hl.client.post(PREDICTIONS, json=payload, headers=hl.sim_auth)


async def finished(hl: Hookline, prediction_id: str) -> dict[str, Any]:
    """Poll the prediction until it is terminal (a hang fails; speed is not tested)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            r = await hl.client.get(f"/sim/v1/predictions/{prediction_id}", headers=hl.sim_auth)
            prediction: dict[str, Any] = r.json()
            if prediction["status"] in {"succeeded", "failed", "canceled"}:
                return prediction
            await asyncio.sleep(0.02)


async def sim_stats(hl: Hookline) -> dict[str, int]:
    stats: dict[str, int] = (await hl.client.get("/sim/v1/_sim/stats")).json()
    return stats


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A fresh machine: no HOOKLINE_* from the runner's shell, data under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
    env.update(
        HOOKLINE_STORE_URL=f"sqlite:///{tmp_path / 'hookline.db'}",
        HOOKLINE_BLOB_URL=f"file://{tmp_path / 'blobs'}",
        HOOKLINE_VAR_DIR=str(tmp_path / "var"),
        HOOKLINE_LOG_LEVEL="warning",
        **{f"HOOKLINE_{name.upper()}": value for name, value in settings.items()},
    )
    return env


@contextlib.asynccontextmanager
async def child(tmp_path: Path, *argv: str, env: dict[str, str]) -> AsyncIterator[Any]:
    """``hookline ARGV`` as a child process (stdout piped, stderr to a file), stopped after."""
    with (tmp_path / "child.err").open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            HOOKLINE,
            *argv,
            env=env,
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def read_until(proc: Any, marker: str) -> list[str]:
    """Lines of the child's stdout up to the first one holding ``marker``."""
    lines: list[str] = []
    async with asyncio.timeout(WAIT_S):
        while not lines or marker not in lines[-1]:
            line = await proc.stdout.readline()
            assert line, f"stdout ended before {marker!r}: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


async def wait_ok(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(WAIT_S):
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await client.get(url, headers=headers)
                if response.status_code == 200:
                    return response
            await asyncio.sleep(0.05)


# -- mounted only when asked -----------------------------------------------------------------


def test_a_sim_default_without_the_simulator_refuses_to_start(tmp_path: Path) -> None:
    """The default provider is "sim": with the simulator off, building the app stops with a
    message naming both ways to turn it on and the alternative."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, var_dir=tmp_path / "var", blob_url=f"file://{tmp_path / 'blobs'}"
    )
    assert settings.provider == "sim" and settings.simulator is False
    with pytest.raises(SimulatorOff) as refused:
        create_app(settings)
    message = str(refused.value)
    assert "hookline serve --demo" in message and "HOOKLINE_SIMULATOR=true" in message
    assert "HOOKLINE_PROVIDER" in message


async def test_hookline_serve_without_demo_exits_with_the_message(tmp_path: Path) -> None:
    """``hookline serve`` on a fresh machine (provider "sim" by default) exits 2 and says how
    to enable the simulator, instead of serving an open one."""
    env = cli_env(tmp_path)
    async with child(tmp_path, "serve", "--port", str(free_port()), env=env) as proc:
        async with asyncio.timeout(WAIT_S):
            code = await proc.wait()
    assert code == 2
    err = (tmp_path / "child.err").read_text()
    assert err.startswith("error: ") and "hookline serve --demo" in err, err


async def test_hookline_serve_demo_runs_the_simulator_on_a_fresh_machine(tmp_path: Path) -> None:
    """What ``make run`` does: ``serve --demo`` mounts the simulator, says so in its banner, and
    the demo key gets a task through to ``completed``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = cli_env(tmp_path, public_url=base, sim_latency="fixed:0.05")
    async with child(tmp_path, "serve", "--demo", "--port", str(port), env=env) as proc:
        banner = await read_until(proc, "simulator:")
        assert any(f"{base}/sim/v1" in line for line in banner)
        await wait_ok(f"{base}/healthz")
        key = (tmp_path / "var" / "demo.key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as http:
            up = await http.post(
                "/v1/uploads", content=png_bytes(), headers={"Content-Type": "image/png"}
            )
            assert up.status_code == 201, up.text
            body = {"inputs": [{"upload": up.json()["key"]}], "prompt": "a lighthouse"}
            task = (await http.post("/v1/tasks", json=body)).json()
            assert task["provider"] == "sim"
            async with asyncio.timeout(WAIT_S):
                while (state := (await http.get(f"/v1/tasks/{task['id']}")).json()["state"]) in {
                    "pending",
                    "processing",
                    "ai_processing",
                    "watermarking",
                }:
                    await asyncio.sleep(0.05)
            assert state == "completed"


async def test_without_the_setting_there_is_no_sim_route_and_no_sim_provider(
    tmp_path: Path,
) -> None:
    """With another provider and the simulator off, ``/sim`` is 404 (whatever the token) and a
    task naming "sim" is refused as an unknown provider, charging nothing. (A guard: this
    configuration had no simulator before either; the one that had it, a "sim" default, now
    refuses to start, proved above.)"""
    async with running_hookline(
        tmp_path,
        simulator=False,
        provider="replicate",
        replicate_api_token="r8_unused",
        replicate_base_url="http://127.0.0.1:9/v1",
    ) as hl:
        assert "sim" not in hl.runtime.providers and hl.runtime.simulator is None
        for path in ("/sim/v1/_sim/stats", "/sim/v1/webhooks/default/secret"):
            r = await hl.client.get(path, headers=hl.auth(OLD_FIXED_TOKEN))
            assert r.status_code == 404, path
        r = await hl.client.post(PREDICTIONS, json={"input": {"prompt": "x"}})
        assert r.status_code == 404
        key = await hl.create_user("alice", 100)
        upload = await hl.upload(key)
        r = await hl.client.post(
            "/v1/tasks",
            json={"inputs": [{"upload": upload}], "prompt": "p", "provider": "sim"},
            headers=hl.auth(key),
        )
        assert_error(r, 422, "unknown_provider")
        assert (await hl.client.get("/v1/me", headers=hl.auth(key))).json()["balance"] == 100


# -- its token -------------------------------------------------------------------------------


async def test_the_secret_route_refuses_the_old_fixed_token_and_a_wrong_one(
    tmp_path: Path,
) -> None:
    async with running_hookline(tmp_path) as hl:
        route = "/sim/v1/webhooks/default/secret"
        for token in (OLD_FIXED_TOKEN, "wrong-token", hl.sim_token + "x"):
            r = await hl.client.get(route, headers=hl.auth(token))
            assert r.status_code == 401, token
            assert "key" not in r.json()
        assert (await hl.client.get(route)).status_code == 401
        r = await hl.client.get(route, headers=hl.sim_auth)
        assert r.status_code == 200 and r.json()["key"].startswith("whsec_")


async def test_each_start_has_its_own_token_unless_one_is_configured(tmp_path: Path) -> None:
    """Two starts get different tokens (each refused by the other), the "sim" provider of each
    uses its own (a task completes), and ``HOOKLINE_SIM_API_TOKEN`` fixes it."""
    route = "/sim/v1/webhooks/default/secret"
    async with (
        running_hookline(tmp_path / "a") as a,
        running_hookline(tmp_path / "b") as b,
    ):
        assert a.sim_token != b.sim_token
        assert OLD_FIXED_TOKEN not in (a.sim_token, b.sim_token)
        assert (await a.client.get(route, headers=b.sim_auth)).status_code == 401
        assert (await b.client.get(route, headers=a.sim_auth)).status_code == 401
        key = await a.create_user("alice", 100)
        done = await a.wait_terminal(key, (await a.create_task(key))["id"])
        assert done["state"] == "completed" and done["provider"] == "sim"
    configured = "configured-sim-token-0123456789"
    async with running_hookline(tmp_path / "c", sim_api_token=configured) as c:
        assert c.sim_token == configured
        assert (await c.client.get(route, headers=c.auth(configured))).status_code == 200


async def test_the_standalone_simulator_prints_a_random_token_or_uses_the_setting(
    tmp_path: Path,
) -> None:
    """``hookline simulator`` prints the random token it accepts; with HOOKLINE_SIM_API_TOKEN
    it accepts that one and does not print it."""
    for configured in (None, "configured-standalone-token-42"):
        port = free_port()
        base = f"http://127.0.0.1:{port}/v1"
        env = cli_env(tmp_path, **({"sim_api_token": configured} if configured else {}))
        async with child(tmp_path, "simulator", "--port", str(port), env=env) as proc:
            lines = await read_until(proc, "API token")
            token = configured or lines[-1].rsplit(" ", 1)[-1]
            if configured:
                assert configured not in "\n".join(lines)
            secret = await wait_ok(
                f"{base}/webhooks/default/secret", {"Authorization": f"Bearer {token}"}
            )
            assert secret.json()["key"].startswith("whsec_")
            async with httpx.AsyncClient(timeout=5) as http:
                old = {"Authorization": f"Bearer {OLD_FIXED_TOKEN}"}
                r = await http.get(f"{base}/webhooks/default/secret", headers=old)
            assert r.status_code == 401


# -- whom it calls ---------------------------------------------------------------------------


async def test_an_input_url_to_a_private_address_is_refused_and_never_fetched(
    tmp_path: Path,
) -> None:
    """Input URLs on a loopback port that is not hookline's (http and https, by address and by
    name) fail their prediction with ``url_forbidden`` and the listener sees no connection;
    hookline's own signed file URL is fetched."""
    async with recording_listener() as listener, running_hookline(tmp_path) as hl:
        urls = [
            f"http://{listener.host}/in.png",
            f"https://{listener.host}/in.png",
            f"http://localhost:{listener.port}/in.png",
            f"https://localhost:{listener.port}/in.png",
        ]
        for url in urls:
            r = await create_prediction(hl, {"image": url})
            assert r.status_code == 201, r.text
            done = await finished(hl, r.json()["id"])
            assert done["status"] == "failed", url
            assert "url_forbidden" in done["error"], done["error"]
        assert listener.connections == 0

        key = await hl.create_user("alice")
        own = await hl.runtime.blobs.url(await hl.upload(key), 600)
        r = await create_prediction(hl, {"image": own})
        done = await finished(hl, r.json()["id"])
        assert done["status"] == "succeeded", done["error"]


async def test_a_webhook_to_a_host_not_allowed_is_refused_and_never_contacted(
    tmp_path: Path,
) -> None:
    """A webhook on a host that is neither this hookline nor in HOOKLINE_SIM_WEBHOOK_HOSTS is
    refused at creation with Replicate's 422 problem JSON; nothing is created and the listener
    sees no connection. A listed host is called."""
    async with (
        recording_listener() as refused,
        recording_listener() as listed,
        running_hookline(tmp_path, sim_webhook_hosts=listed.host) as hl,
    ):
        for webhook in (
            f"http://{refused.host}/hook",
            f"http://localhost:{listed.port}/hook",  # listed by address, not by this name
            f"http://user@{listed.host}/hook",
        ):
            r = await create_prediction(hl, webhook=webhook)
            assert r.status_code == 422, webhook
            problem = r.json()
            assert set(problem) == {"title", "detail", "status"} and problem["status"] == 422
            assert "HOOKLINE_SIM_WEBHOOK_HOSTS" in problem["detail"]
        assert (await sim_stats(hl))["predictions_created"] == 0

        r = await create_prediction(hl, webhook=f"http://{listed.host}/hook")
        assert r.status_code == 201, r.text
        assert (await finished(hl, r.json()["id"]))["status"] == "succeeded"
        async with asyncio.timeout(WAIT_S):
            while not listed.request_lines:
                await asyncio.sleep(0.02)
        assert listed.request_lines[0].startswith("POST /hook ")
        assert refused.connections == 0


async def test_huge_or_hostile_inputs_are_refused_before_any_work(tmp_path: Path) -> None:
    """Sizes outside 16-2048 pixels, a non-finite size, an endless prompt and too many outputs
    answer 422; JSON nested past the parser's stack answers 400. Nothing is created."""
    async with running_hookline(tmp_path) as hl:
        for model_input in (
            {"width": 100_000, "height": 100_000},
            {"width": 2049},
            {"height": 15},
            {"num_outputs": 5},
            {"prompt": "x" * 10_001},
        ):
            r = await create_prediction(hl, model_input)
            assert r.status_code == 422, model_input
            assert r.json()["status"] == 422
        raw = b'{"input": {"prompt": "x", "width": Infinity, "height": 64}}'
        r = await hl.client.post(PREDICTIONS, content=raw, headers=hl.sim_auth)
        assert r.status_code == 422, r.text
        deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = await hl.client.post(PREDICTIONS, content=deep, headers=hl.sim_auth)
        assert r.status_code == 400, r.text
        assert (await sim_stats(hl))["predictions_created"] == 0
        assert json.loads((await create_prediction(hl)).text)["status"] == "starting"
