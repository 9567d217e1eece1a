"""Live progress at scale: ``python -m bench.bench_sse [--quick]``.

One hookline process (a real uvicorn server in a subprocess, SQLite, roles=api so tasks wait in
``pending`` until the bench moves them) and 1,000 concurrent ``GET /v1/tasks/{id}/events`` clients
(``--quick``: 200) on raw sockets in this process, spread over 10 tasks (``--tasks 1``: all
watching one task, the worst fan-out). Two figures:

- **memory per client**: the server's RSS (``/proc/<pid>/status``) with every client connected and
  holding its opening frame, minus the RSS before, divided by the clients. Goal ≤ 50 KB.
- **fan-out delay**: each task is cancelled in turn; for every client, the time from the
  transition's own timestamp (the ``at`` of its event, taken by the server just before the write)
  to the moment the client has read the frame. Goal: p99 ≤ 100 ms.

Every hookline process runs the live watchers that feed the streams (service/ops/live.py).
Figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from service.http.auth import hash_key, new_api_key
from statemachine import clock
from statemachine.sqlite_store import SqliteStore

Message = MutableMapping[str, Any]
TASKS = 10  # clients are spread over this many tasks; --tasks 1: all on one
STARTUP_S = 60.0
PHASE_S = 120.0


# --- the server process ----------------------------------------------------------------------


def serve(directory: Path, port: int) -> None:
    """The server side: hookline with the operations loops started after its lifespan's startup."""
    import uvicorn

    from service.http.app import create_app
    from service.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        store_url=f"sqlite:///{directory / 'hookline.db'}",
        blob_url=f"file://{directory / 'blobs'}",
        var_dir=directory / "var",
        public_url=f"http://127.0.0.1:{port}",
        roles="api",
        simulator=True,  # the default provider, as `make run` has it
        rate_limit_per_s=0,
        log_level="warning",
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=2,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def create_user(directory: Path) -> str:
    store = SqliteStore(directory / "hookline.db")
    await store.open()
    try:
        key = new_api_key()
        await store.create_user(
            "bench", 1_000_000, is_admin=False, key_hash=hash_key(key), now=clock.now()
        )
        return key
    finally:
        await store.close()


# --- the clients -----------------------------------------------------------------------------


class Client:
    """One SSE client on a raw socket: connects, reads frames, stamps their arrival."""

    def __init__(self, port: int, key: str, task_id: str) -> None:
        self.port = port
        self.key = key
        self.task_id = task_id
        self.opened = asyncio.Event()
        self.delays_s: list[float] = []
        self.states: list[str] = []
        self.done = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer = writer
        request = (
            f"GET /v1/tasks/{self.task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {self.key}\r\nAccept: text/event-stream\r\n\r\n"
        )
        writer.write(request.encode())
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream refused: {status!r}")
        while await reader.readline() not in (b"\r\n", b""):
            pass  # headers
        while line := await reader.readline():  # chunked framing: data lines pass through as-is
            if not line.startswith(b"data: "):
                continue
            received = time.time()
            data = json.loads(line[6:])
            self.states.append(data["state"])
            if len(self.states) == 1:
                self.opened.set()
                continue
            at = datetime.fromisoformat(data["at"].replace("Z", "+00:00")).timestamp()
            self.delays_s.append(received - at)
            if data["state"] in ("completed", "failed", "cancelled"):
                break
        self.done.set()
        writer.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


async def measure(port: int, pid: int, key: str, clients_n: int, tasks_n: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        auth = {"Authorization": f"Bearer {key}"}
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
        up = await http.post(
            "/v1/uploads", content=buf.getvalue(), headers=auth | {"Content-Type": "image/jpeg"}
        )
        upload = up.json()["key"]
        tasks = []
        for _ in range(tasks_n):
            r = await http.post(
                "/v1/tasks", json={"inputs": [{"upload": upload}], "prompt": "p"}, headers=auth
            )
            tasks.append(r.json()["id"])
        # Warm up every code path once so the baseline includes imports and first-use caches.
        warm = Client(port, key, tasks[0])
        warm_run = asyncio.create_task(warm.run())
        await asyncio.wait_for(warm.opened.wait(), PHASE_S)
        warm.close()
        await asyncio.gather(warm_run, return_exceptions=True)
        await http.get("/metrics")
        await asyncio.sleep(0.5)  # let the server settle (not a wait for logic: a quiet baseline)
        before_kb = rss_kb(pid)

        clients = [Client(port, key, tasks[i % tasks_n]) for i in range(clients_n)]
        runs = []
        for start in range(0, clients_n, 100):
            batch = clients[start : start + 100]
            runs += [asyncio.create_task(c.run()) for c in batch]
            await asyncio.wait_for(asyncio.gather(*(c.opened.wait() for c in batch)), PHASE_S)
        after_kb = rss_kb(pid)
        live = (await http.get("/metrics")).text
        sse_clients = next(
            float(line.split()[1])
            for line in live.splitlines()
            if line.startswith("hookline_sse_clients ")
        )

        for task_id in tasks:
            r = await http.post(f"/v1/tasks/{task_id}/cancel", headers=auth)
            r.raise_for_status()
            waiting = [c.done.wait() for c in clients if c.task_id == task_id]
            await asyncio.wait_for(asyncio.gather(*waiting), PHASE_S)
        await asyncio.wait_for(asyncio.gather(*runs), PHASE_S)
        delays = [d for c in clients for d in c.delays_s]
        left = await wait_metric_zero(http)
    return {
        "clients": float(clients_n),
        "tasks": float(tasks_n),
        "sse_clients_seen_by_server": sse_clients,
        "sse_clients_after_close": left,
        "rss_before_mb": before_kb / 1024,
        "rss_after_mb": after_kb / 1024,
        "kb_per_client": (after_kb - before_kb) / clients_n,
        "fanout_p50_ms": percentile(delays, 0.50) * 1000,
        "fanout_p99_ms": percentile(delays, 0.99) * 1000,
        "fanout_max_ms": max(delays) * 1000,
        "deliveries": float(len(delays)),
    }


async def wait_metric_zero(http: httpx.AsyncClient) -> float:
    """The server's open-stream gauge once every client has left (waits for it to reach 0)."""
    deadline = time.monotonic() + PHASE_S
    while True:
        text = (await http.get("/metrics")).text
        value = next(
            float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("hookline_sse_clients ")
        )
        if value == 0 or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def run(quick: bool, tasks_n: int = TASKS) -> dict[str, float]:
    """Start a server process, measure, stop it; the figures."""
    clients_n = 200 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="bench_sse_") as tmp:
        directory = Path(tmp)
        port = free_port()
        key = asyncio.run(create_user(directory))
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_sse", "--serve", str(directory), str(port)],
            env=env,
        )
        try:
            wait_healthy(proc, port)
            return _run_clients(port, proc.pid, key, clients_n, tasks_n)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run_clients(port: int, pid: int, key: str, clients_n: int, tasks_n: int) -> dict[str, float]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(measure(port, pid, key, clients_n, tasks_n))
    return uvloop.run(measure(port, pid, key, clients_n, tasks_n))


def wait_healthy(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sse", description=__doc__)
    p.add_argument("--quick", action="store_true", help="200 clients instead of 1,000")
    p.add_argument("--tasks", type=int, default=TASKS, help="tasks the clients watch")
    p.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return
    figures = run(args.quick, args.tasks)
    for name, value in figures.items():
        print(f"{name:28} {value:10.2f}")
    print(
        f"goals: ≤ 50 KB per client ({'met' if figures['kb_per_client'] <= 50 else 'MISSED'}), "
        f"p99 ≤ 100 ms ({'met' if figures['fanout_p99_ms'] <= 100 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
