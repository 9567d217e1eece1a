"""HTTP benchmarks of a real ``hookline serve`` process: ``python -m bench.bench_http [--quick]``.

(a) ``POST /v1/tasks``: SQLite, one uvicorn worker in its own OS process with only the ``api`` role
    (no dispatcher or reaper competing), loopback, 64 concurrent keep-alive connections from a
    load generator in another process: requests/s and p50/p99 latency.
(b) webhook ingest: tasks loaded straight into ``ai_processing`` in the store, then 64 concurrent
    senders POST valid, signed, distinct deliveries: deliveries/s and p99.
(c) overhead: a server with the dispatcher whose watermarking step is a pass-through (claim, then
    ``finished``): from the provider's webhook leaving to the task reaching ``completed``, read
    from the task's history (same machine, same clock), p50/p99 under a light open-loop load.

The load generator is ``wrk`` when installed (C: it leaves the CPU to the server on a small
machine), else ``bench/loadgen.py``; both send the same pre-built requests, each exactly once.
Rate limiting is switched off for (a): one API key sends everything. ``--profile`` samples the
server with py-spy (``/tmp/pyspy/bin/py-spy`` or on PATH) during (a) and (b).

Goals: (a) ≥ 2,000 tasks/s with p99 ≤ 50 ms; (b) ≥ 3,000 deliveries/s with p99 ≤ 30 ms;
(c) p50 ≤ 20 ms. Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.loadgen import SEPARATOR, percentile
from callbacks.standard_webhooks import sign_headers
from service.http.auth import hash_key, new_api_key
from service.settings import SIM_MODEL
from statemachine import clock
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.task import Attempt, Task, to_doc
from tests.support.factories import make_task

CONCURRENCY = 64
USER = "bench"
# the token of the server's simulator (HOOKLINE_SIM_API_TOKEN): fresh for each bench run
SIM_TOKEN = secrets.token_urlsafe(24)
ROOT = Path(__file__).resolve().parent.parent

WRK_SCRIPT = """
local requests = {}
local sent, received, limit = 0, 0, 0
function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  local start = 1
  while true do
    local stop = string.find(data, "\\0", start, true)
    if stop == nil then break end
    if stop > start then table.insert(requests, string.sub(data, start, stop - 1)) end
    start = stop + 1
  end
  limit = #requests
end
local probed = false
function request()
  -- wrk calls request() once before connecting, to see whether requests vary; that call's
  -- answer is never sent, so it must not use up a request
  if not probed then
    probed = true
    return requests[1]
  end
  sent = sent + 1
  if sent > limit then sent = limit end  -- after the last answer: wrk is being stopped
  return requests[sent]
end
function response(status, headers, body)
  received = received + 1
  if status ~= 200 and status ~= 202 then errors_seen = (errors_seen or 0) + 1 end
  if received == limit then
    -- wrk sleeps out its whole -d otherwise: tell the runner, which interrupts it (SIGINT)
    io.write("DONE\\n")
    io.flush()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "elapsed_s": %.6f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, '
    .. '"max_ms": %.3f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout))
end
"""


# --- the server process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_env(workdir: Path, port: int, roles: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLINE_")}
    env.update(
        HOOKLINE_STORE_URL=f"sqlite:///{workdir / 'hookline.db'}",
        HOOKLINE_BLOB_URL=f"file://{workdir / 'blobs'}",
        HOOKLINE_VAR_DIR=str(workdir / "var"),
        HOOKLINE_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HOOKLINE_HOST="127.0.0.1",
        HOOKLINE_PORT=str(port),
        HOOKLINE_ROLES=roles,
        HOOKLINE_PROVIDER="sim",
        HOOKLINE_SIMULATOR="true",
        HOOKLINE_SIM_API_TOKEN=SIM_TOKEN,
        HOOKLINE_SIM_LATENCY="fixed:600",
        HOOKLINE_SIM_WEBHOOK_LOSS="1.0",
        HOOKLINE_RATE_LIMIT_PER_S="0",
        HOOKLINE_LOG_LEVEL="warning",
        HOOKLINE_AI_DEADLINE_S="3600",
    )
    return env


@contextlib.contextmanager
def server(workdir: Path, roles: str, *, passthrough: bool = False) -> Iterator[int]:
    """A hookline server process on a free port (its port), stopped with SIGTERM afterwards."""
    port = free_port()
    if passthrough:
        cmd = [sys.executable, "-m", "bench.bench_http", "--serve-passthrough"]
    else:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--roles", roles]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=server_env(workdir, port, roles))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_passthrough() -> None:
    """``hookline serve`` whose watermarking step only finishes the task under its lease: what is
    left is the framework's own cost (feed, dispatch, lease claim, two compare-and-sets)."""
    import uvicorn

    from service.http.app import create_app
    from service.settings import Settings
    from service.steps.runner import Lease
    from statemachine import lifecycle
    from statemachine.states import Event

    class PassThrough:
        async def ready(self, task: Task, now: float) -> bool:
            return task.state is State.WATERMARKING

        async def run(self, lease: Lease) -> None:
            rt = app.state.runtime
            await lifecycle.advance(
                rt.store,
                lease.task.id,
                Event.FINISHED,
                rt.now(),
                rt.timings.base,
                guard=lease.holds,
            )

    settings = Settings()
    app = create_app(settings)
    runner = app.state.runtime.runner
    assert runner is not None, "the passthrough server runs the dispatcher"
    runner.steps[State.WATERMARKING] = PassThrough()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)


# --- fixtures in the store ------------------------------------------------------------------------


async def prepare_store(workdir: Path, waiting: int) -> str:
    """A user with plenty of credits (its API key) and ``waiting`` tasks in ai_processing."""
    store = SqliteStore(workdir / "hookline.db")
    await store.open()
    try:
        key = new_api_key()
        await store.create_user(
            USER, 10**9, is_admin=False, key_hash=hash_key(key), now=clock.now()
        )
        await store.bulk_load_for_bench(to_doc(t) for t in waiting_tasks(waiting))
    finally:
        await store.close()
    return key


def waiting_tasks(n: int) -> Iterator[Task]:
    now = clock.now()
    for i in range(n):
        job = f"job{i:07d}"
        yield make_task(
            id=f"tsk_wait{i:07d}",
            now=now,
            owner=USER,
            state=State.AI_PROCESSING,
            version=3,
            model=SIM_MODEL,
            prompt="waiting",
            cost=1,
            attempts=1,
            deadline=now + 3600,
            provider_job_id=job,
            attempt_log=(
                Attempt(number=1, provider="sim", model=SIM_MODEL, job_id=job, submitted_at=now),
            ),
        )


async def read_tasks(workdir: Path, ids: list[str]) -> list[Task]:
    store = SqliteStore(workdir / "hookline.db")
    await store.open()
    try:
        found = [await store.get_task(i) for i in ids]
    finally:
        await store.close()
    return [t for t in found if t is not None]


# --- requests -------------------------------------------------------------------------------------


def raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def upload_one(port: int, key: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/uploads",
        content=buf.getvalue(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"},
    )
    r.raise_for_status()
    upload: str = r.json()["key"]
    return upload


def create_requests(port: int, key: str, upload: str, n: int, tag: str) -> list[bytes]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return [
        raw_request(
            port,
            "POST",
            "/v1/tasks",
            headers,
            json.dumps({"inputs": [{"upload": upload}], "prompt": f"{tag} {i}"}).encode(),
        )
        for i in range(n)
    ]


def sim_secret(port: int) -> str:
    r = httpx.get(
        f"http://127.0.0.1:{port}/sim/v1/webhooks/default/secret",
        headers={"Authorization": f"Bearer {SIM_TOKEN}"},
    )
    r.raise_for_status()
    secret: str = r.json()["key"]
    return secret


def delivery(port: int, task: Task, secret: str) -> bytes:
    assert task.provider_job_id is not None
    body = json.dumps(
        {
            "id": task.provider_job_id,
            "status": "succeeded",
            "output": [f"http://127.0.0.1:{port}/sim/v1/files/{task.provider_job_id}/0.png"],
            "error": None,
        }
    ).encode()
    headers = sign_headers(secret, f"msg_{task.id}", int(clock.now()), body)
    headers["Content-Type"] = "application/json"
    path = f"/v1/callbacks/sim/{task.id}?token={task.callback_token}"
    return raw_request(port, "POST", path, headers, body)


# --- load -----------------------------------------------------------------------------------------


def load(port: int, requests: list[bytes], workdir: Path, tool: str) -> dict[str, Any]:
    """Send ``requests`` once each over CONCURRENCY connections with ``tool``; its summary."""
    path = workdir / f"requests-{secrets.token_hex(4)}.bin"
    path.write_bytes(SEPARATOR.join(requests) + SEPARATOR)
    if tool == "wrk":
        script = workdir / "requests.lua"
        script.write_text(WRK_SCRIPT)
        result: dict[str, Any] = run_wrk(port, script, path)
        result["rps"] = result["requests"] / result["elapsed_s"]
    else:
        out = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--port", str(port),
             "--concurrency", str(CONCURRENCY), str(path)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
        result = json.loads(out)
    path.unlink()
    return result


def run_wrk(port: int, script: Path, requests_file: Path) -> dict[str, Any]:
    """wrk until the script says every request was answered (then SIGINT: wrk reports at once)."""
    proc = subprocess.Popen(
        ["wrk", "-t1", f"-c{CONCURRENCY}", "-d600s", "--timeout", "30s", "-s", str(script),
         f"http://127.0.0.1:{port}", "--", str(requests_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "DONE":
            proc.send_signal(signal.SIGINT)
            break
    out = proc.stdout.read()
    proc.wait()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def profiled(pid_of_port: int, seconds: float, out: Path | None) -> Iterator[None]:
    """Sample the server listening on the port with py-spy while the block runs."""
    spy = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
    if out is None or not Path(spy).exists():
        yield
        return
    pid = server_pid(pid_of_port)
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
         "--format", "raw", "--output", str(out), "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def server_pid(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    marker = "pid="
    start = out.index(marker) + len(marker)
    return int(out[start : out.index(",", start)])


# --- the three benchmarks -------------------------------------------------------------------------


def bench_create(workdir: Path, n: int, tool: str, profile: Path | None) -> dict[str, Any]:
    key = asyncio.run(prepare_store(workdir, 0))
    with server(workdir, "api") as port:
        upload = upload_one(port, key)
        load(port, create_requests(port, key, upload, min(2000, n), "warm"), workdir, tool)
        with profiled(port, 60, profile):
            result = load(port, create_requests(port, key, upload, n, "bench"), workdir, tool)
    return result


def bench_webhooks(workdir: Path, n: int, tool: str, profile: Path | None) -> dict[str, Any]:
    warm = min(2000, n)
    asyncio.run(prepare_store(workdir, n + warm))
    ids = [f"tsk_wait{i:07d}" for i in range(n + warm)]
    tasks = asyncio.run(read_tasks(workdir, ids))
    with server(workdir, "api") as port:
        secret = sim_secret(port)
        load(port, [delivery(port, t, secret) for t in tasks[:warm]], workdir, tool)
        requests = [delivery(port, t, secret) for t in tasks[warm:]]
        with profiled(port, 60, profile):
            result = load(port, requests, workdir, tool)
    done = asyncio.run(read_tasks(workdir, ids[warm:]))
    result["applied"] = sum(1 for t in done if t.state is State.WATERMARKING)
    return result


def bench_overhead(workdir: Path, n: int, rate_per_s: float) -> dict[str, Any]:
    """Open loop at ``rate_per_s``: each webhook leaves at a known wall time; the task's history
    says when ai_succeeded and finished were decided."""
    asyncio.run(prepare_store(workdir, n))
    ids = [f"tsk_wait{i:07d}" for i in range(n)]
    tasks = asyncio.run(read_tasks(workdir, ids))
    sent_at: dict[str, float] = {}
    with server(workdir, "api,dispatcher", passthrough=True) as port:
        secret = sim_secret(port)

        async def send_all() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                pending: list[asyncio.Task[httpx.Response]] = []
                for task in tasks:
                    raw = delivery(port, task, secret)
                    head, _, body = raw.partition(b"\r\n\r\n")
                    lines = head.decode().split("\r\n")
                    path = lines[0].split(" ")[1]
                    headers = dict(line.split(": ", 1) for line in lines[1:])
                    headers.pop("Content-Length")
                    sent_at[task.id] = clock.now()
                    pending.append(
                        asyncio.create_task(client.post(path, content=body, headers=headers))
                    )
                    await asyncio.sleep(1 / rate_per_s)
                for response in await asyncio.gather(*pending):
                    response.raise_for_status()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    done = await read_tasks(workdir, [tasks[-1].id])
                    if done and done[0].state is State.COMPLETED:
                        break
                    await asyncio.sleep(0.1)

        asyncio.run(send_all())
    total, ingest, step = [], [], []
    for task in asyncio.run(read_tasks(workdir, ids)):
        at = {h.event: h.at for h in task.history}
        if task.state is not State.COMPLETED or "finished" not in at:
            continue
        total.append((at["finished"] - sent_at[task.id]) * 1000)
        ingest.append((at["ai_succeeded"] - sent_at[task.id]) * 1000)
        step.append((at["finished"] - at["ai_succeeded"]) * 1000)
    for values in (total, ingest, step):
        values.sort()
    return {
        "completed": len(total),
        "p50_ms": percentile(total, 50),
        "p99_ms": percentile(total, 99),
        "webhook_to_ai_succeeded_p50_ms": percentile(ingest, 50),
        "ai_succeeded_to_finished_p50_ms": percentile(step, 50),
        "ai_succeeded_to_finished_p99_ms": percentile(step, 99),
    }


def run(quick: bool, *, profile_dir: Path | None = None) -> dict[str, float]:
    """All three benchmarks; flat figures (``*_rps``, ``*_p50_ms``, ``*_p99_ms``)."""
    n_create = 5_000 if quick else 30_000
    n_hooks = 5_000 if quick else 30_000
    n_overhead = 200 if quick else 1_000
    tool = "wrk" if shutil.which("wrk") else "loadgen"
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hookline-bench-http-") as tmp:
        root = Path(tmp)
        for name in ("create", "webhooks", "overhead"):
            (root / name).mkdir()
        create = bench_create(
            root / "create", n_create, tool, profile_dir and profile_dir / "create.txt"
        )
        hooks = bench_webhooks(
            root / "webhooks", n_hooks, tool, profile_dir and profile_dir / "webhooks.txt"
        )
        overhead = bench_overhead(root / "overhead", n_overhead, rate_per_s=100)
    figures.update(
        create_rps=create["rps"],
        create_p50_ms=create["p50_ms"],
        create_p99_ms=create["p99_ms"],
        create_errors=create["errors"],
        webhook_rps=hooks["rps"],
        webhook_p50_ms=hooks["p50_ms"],
        webhook_p99_ms=hooks["p99_ms"],
        webhook_errors=hooks["errors"],
        webhook_applied=hooks["applied"],
        overhead_p50_ms=overhead["p50_ms"],
        overhead_p99_ms=overhead["p99_ms"],
        overhead_ingest_p50_ms=overhead["webhook_to_ai_succeeded_p50_ms"],
        overhead_step_p50_ms=overhead["ai_succeeded_to_finished_p50_ms"],
        overhead_completed=overhead["completed"],
    )
    return {k: round(float(v), 2) for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_http", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--profile", type=Path, help="write py-spy raw profiles into this directory")
    p.add_argument("--serve-passthrough", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_passthrough:
        serve_passthrough()
        return 0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    figures = run(args.quick, profile_dir=args.profile)
    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_generator": "wrk" if shutil.which("wrk") else "bench.loadgen",
    }
    print(json.dumps({"machine": machine, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
