"""Hostile inputs against a real ``hookline serve`` process: ``python -m bench.bench_hostile
[--quick]``.

(a) **Compression bombs.** A loopback server (its host in ``HOOKLINE_INPUT_HOSTS``) answers
    ``Content-Encoding: gzip`` with bodies that decode to 16 GiB: one gzip layer (16 MB on the
    wire), two (``gzip, gzip``: 26 KB) and three (a few hundred bytes). Tasks naming them as URL
    inputs are created at once (``--quick``: fewer) while the server's RSS and PSS (``/proc``) are
    sampled every 20 ms; the figures are the peak growth over the idle server (after one normal
    task warmed it up). Goal: ≤ 50 MB. Every bomb task must fail ``unsupported_encoding`` with a
    refund, and a normal task must complete afterwards (the process survived). Before the fix the
    fetcher decoded what it counted: a ``gzip, gzip`` body expands to all 16 GiB in one decoded
    chunk, and the process is killed.
(b) **The CPU cost of a refused request**: the server's CPU time (every thread's, from
    ``/proc/<pid>/task/*/schedstat``) over many refused requests of one kind, sent by 16
    keep-alive connections, less what the idle server spends meanwhile, divided by their number
    (µs per request): a wrong key from many addresses (401: a key lookup in the store), a wrong
    key from one address past its burst (429 ``too_many_auth_failures``), JSON nested 100,000
    deep (400 ``json_too_deep``) and a ``Content-Length`` of 1 GB (413 before the body is read;
    a new connection each). For scale, the same for ``GET /healthz`` (no authentication) and
    ``GET /v1/me`` with a valid key.
(c) **Decoding a large upload, before and after**: CPU seconds and peak memory (the growth of
    the peak RSS, ``VmHWM``, in a fresh process per measurement) of ``decode_upload`` on
    phone-sized JPEGs and on small PNGs declaring many pixels, and of ``prepare_input`` (a 40 MP
    URL input made a 2048 px provider input). *Before* is the previous code path, rebuilt from
    the same functions: the 40 MP limit and every JPEG decoded at full size (``open_image``
    without ``fit``/``shrink``); *after* is the code as it is (4096² limit, DCT-scale decoding).

Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from service.http.auth import hash_key, new_api_key
from service.media.images import decode_upload, encode, open_image, prepare_input
from statemachine import clock
from statemachine.sqlite_store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
USER = "hostile"
MiB = 1 << 20
BOMB_GIB = 16
SAMPLE_S = 0.02
CONNECTIONS = 16
GOALS = {"bomb_rss_growth_mb": "≤ 50 MB", "bomb_pss_growth_mb": "≤ 50 MB"}


# --- the bombs ------------------------------------------------------------------------------------


def deflate_zeros(gib: int) -> bytes:
    """A raw deflate stream of ``gib`` GiB of zeros (about 1 MB per GiB), built in a blink:
    zlib's output for a run of zeros settles into a cycle of 16 MiB of input, which is repeated
    instead of compressed again. Only its end is approximate (by a fraction of a MiB)."""
    warmup, cycle = 9, 16  # in MiB of input; found by comparing zlib's output chunks
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\0" * MiB
    parts = [compressor.compress(zeros) for _ in range(warmup + cycle)]
    repeats = max(1, (gib * 1024 - warmup) // cycle)
    return b"".join(parts[:warmup]) + b"".join(parts[warmup:]) * repeats + compressor.flush()


def gzip_member(deflated: bytes) -> bytes:
    """A gzip member around a raw deflate stream. Its CRC is not computed (0): a decoder only
    checks it after inflating everything, which is the point of the bomb."""
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + deflated + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"


def gzip_of(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def bombs(gib: int) -> dict[str, tuple[str, bytes]]:
    """path: (Content-Encoding, body), each decoding to ``gib`` GiB."""
    one = gzip_member(deflate_zeros(gib))
    two = gzip_of(one)
    three = gzip_of(two)
    return {
        "/gzip.png": ("gzip", one),
        "/gzip2.png": ("gzip, gzip", two),
        "/gzip3.png": ("gzip, gzip, gzip", three),
    }


@contextlib.contextmanager
def bomb_server(routes: dict[str, tuple[str, bytes]]) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            encoding, body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # hookline hangs up after the headers
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass

    httpd = Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the server process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def hookline(workdir: Path, input_hosts: str) -> Iterator[tuple[int, int]]:
    """``hookline serve`` (all roles, SQLite, the built-in simulator): (port, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
    env.update(
        HOOKLINE_STORE_URL=f"sqlite:///{workdir / 'hookline.db'}",
        HOOKLINE_BLOB_URL=f"file://{workdir / 'blobs'}",
        HOOKLINE_VAR_DIR=str(workdir / "var"),
        HOOKLINE_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HOOKLINE_HOST="127.0.0.1",
        HOOKLINE_PORT=str(port),
        HOOKLINE_PROVIDER="sim",
        HOOKLINE_SIMULATOR="true",
        HOOKLINE_SIM_API_TOKEN=secrets.token_urlsafe(24),
        HOOKLINE_SIM_LATENCY="fixed:0.05",
        HOOKLINE_INPUT_HOSTS=input_hosts,
        HOOKLINE_RATE_LIMIT_PER_S="0",
        HOOKLINE_REAPER_INTERVAL_S="5",
        HOOKLINE_LOG_LEVEL="error",
    )
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hookline serve did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def create_user(workdir: Path) -> str:
    store = SqliteStore(workdir / "hookline.db")
    await store.open()
    try:
        key = new_api_key()
        await store.create_user(
            USER, 10**6, is_admin=False, key_hash=hash_key(key), now=clock.now()
        )
    finally:
        await store.close()
    return key


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of ``pid`` in MB."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "Rss":
            rss = int(value.split()[0]) / 1024
        elif name == "Pss":
            pss = int(value.split()[0]) / 1024
    return rss, pss


def cpu_s(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in seconds (nanosecond resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


class Sampler:
    """Samples a process's memory in a thread; ``peak`` is the highest (RSS, PSS) seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = memory_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rss, pss = memory_mb(self.pid)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- (a) bombs ------------------------------------------------------------------------------------


async def wait_terminal(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async with asyncio.timeout(120):
        while True:
            task: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
            if task["state"] in ("completed", "failed", "cancelled"):
                return task
            await asyncio.sleep(0.05)


async def normal_task(http: httpx.AsyncClient) -> dict[str, Any]:

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    up = await http.post(
        "/v1/uploads", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    up.raise_for_status()
    body = {"inputs": [{"upload": up.json()["key"]}], "prompt": "a lighthouse"}
    created = await http.post("/v1/tasks", json=body)
    created.raise_for_status()
    return await wait_terminal(http, created.json()["id"])


async def bomb_run(base: str, key: str, pid: int, urls: list[str]) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as http:
        warm = await normal_task(http)
        assert warm["state"] == "completed", warm
        idle = []
        for _ in range(10):
            idle.append(memory_mb(pid))
            await asyncio.sleep(0.05)
        rss0 = statistics.median(r for r, _ in idle)
        pss0 = statistics.median(p for _, p in idle)
        with Sampler(pid) as sampler:
            started = time.monotonic()
            created = await asyncio.gather(
                *(
                    http.post("/v1/tasks", json={"inputs": [{"url": u}], "prompt": "x"})
                    for u in urls
                )
            )
            ids = [r.json()["id"] for r in created]
            finals = await asyncio.gather(*(wait_terminal(http, i) for i in ids))
            took = time.monotonic() - started
        refused = sum(
            t["state"] == "failed"
            and t["refunded"]
            and (t["error"] or {}).get("code") == "unsupported_encoding"
            for t in finals
        )
        after = await normal_task(http)
    return {
        "bomb_tasks": float(len(urls)),
        "bomb_tasks_refused_and_refunded": float(refused),
        "bomb_decoded_gib_each": float(BOMB_GIB),
        "bomb_rss_growth_mb": sampler.peak[0] - rss0,
        "bomb_pss_growth_mb": sampler.peak[1] - pss0,
        "bomb_idle_rss_mb": rss0,
        "bomb_all_terminal_s": took,
        "normal_task_after_bombs_completed": float(after["state"] == "completed"),
    }


# --- (b) refused requests -------------------------------------------------------------------------


async def cpu_per_request(
    pid: int, count: int, send: Callable[[httpx.AsyncClient, int], Any], base: str
) -> tuple[float, dict[int, int]]:
    """µs of server CPU per request, and the statuses seen."""
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                r = await send(http, i)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await send(http, -1)  # connections up, code paths warm
        idle = await idle_cpu_per_s(pid)
        before, started = cpu_s(pid), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        used = cpu_s(pid) - before - idle * (time.monotonic() - started)
    return used / count * 1e6, statuses


async def idle_cpu_per_s(pid: int, over_s: float = 1.0) -> float:
    """The CPU the idle server spends per second on its own loops (feed, reaper, watchers), to
    be taken out of what requests cost."""
    before = cpu_s(pid)
    await asyncio.sleep(over_s)
    return (cpu_s(pid) - before) / over_s


async def oversized(port: int, key: str, count: int, pid: int) -> tuple[float, dict[int, int]]:
    """``Content-Length: 1 GB``, nothing sent after the headers: a new connection each."""
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    ).encode()
    statuses: dict[int, int] = {}
    queue = iter(range(count))

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return status

    async def worker() -> None:
        for _ in queue:
            status = await one()
            statuses[status] = statuses.get(status, 0) + 1

    await one()
    idle = await idle_cpu_per_s(pid)
    before, started = cpu_s(pid), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    used = cpu_s(pid) - before - idle * (time.monotonic() - started)
    return used / count * 1e6, statuses


async def refused_run(port: int, key: str, pid: int, count: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    wrong = {"Authorization": "Bearer hk_" + "x" * 43}
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    json_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def spread(http: httpx.AsyncClient, i: int) -> Any:  # a new address each: 401
        forwarded = f"198.18.{(i // 250) % 250}.{i % 250 + 1}"
        return http.get("/v1/me", headers={**wrong, "X-Forwarded-For": forwarded})

    def one_address(http: httpx.AsyncClient, i: int) -> Any:  # past the burst: 429
        return http.get("/v1/me", headers={**wrong, "X-Forwarded-For": "203.0.113.9"})

    def too_deep(http: httpx.AsyncClient, i: int) -> Any:
        return http.post("/v1/tasks", content=deep, headers=json_headers)

    def healthz(http: httpx.AsyncClient, i: int) -> Any:  # the floor: no auth, no store
        return http.get("/healthz")

    def me(http: httpx.AsyncClient, i: int) -> Any:  # an accepted request, for comparison
        return http.get("/v1/me", headers=json_headers)

    results: dict[str, float] = {"refused_requests_each": float(count)}
    for name, send, expected in (
        ("reference_healthz", healthz, 200),
        ("reference_valid_key_me", me, 200),
        ("bad_key", spread, 401),
        ("bad_key_over_burst", one_address, 429),
        ("too_deep_json", too_deep, 400),
    ):
        us, statuses = await cpu_per_request(pid, count, send, base)
        label = name if name.startswith("reference") else f"refused_{name}"
        results[f"{label}_cpu_us"] = us
        results[f"{label}_share_{expected}"] = statuses.get(expected, 0) / count
    us, statuses = await oversized(port, key, count, pid)
    results["refused_oversized_body_cpu_us"] = us
    results["refused_oversized_body_share_413"] = statuses.get(413, 0) / count
    return results


# --- (c) decoding large uploads, before and after ------------------------------------------------

OLD_MAX_PIXELS = 40_000_000  # the limit before this change
# name: (width, height, format); a phone's 24 and 48 MP, the largest JPEG the old limit took, a
# flat PNG declaring the old limit in a few kilobytes, and the largest PNG the new limit takes
IMAGES: dict[str, tuple[int, int, str]] = {
    "jpeg_24mp": (5712, 4284, "JPEG"),
    "jpeg_40mp": (7300, 5475, "JPEG"),
    "jpeg_48mp": (8064, 6048, "JPEG"),
    "flat_png_40mp": (7300, 5475, "PNG"),
    "flat_png_16mp": (4096, 4096, "PNG"),
}
QUICK_IMAGES = ("jpeg_24mp", "flat_png_40mp")


def make_image(width: int, height: int, fmt: str) -> bytes:
    """A photo-like JPEG (a textured tile repeated: real entropy, made fast) or a flat PNG."""
    if fmt == "PNG":
        img = Image.new("RGB", (width, height), (90, 140, 200))
    else:
        tile = Image.effect_noise((1024, 768), 40).convert("RGB")
        tile = Image.blend(Image.linear_gradient("L").resize(tile.size).convert("RGB"), tile, 0.3)
        img = Image.new("RGB", (width, height))
        for x in range(0, width, tile.width):
            for y in range(0, height, tile.height):
                img.paste(tile, (x, y))
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def decode_before(data: bytes) -> str:
    """The previous ``decode_upload``: a full decode within 40 MP, re-encoded."""
    img = open_image(data, max_bytes=50_000_000, max_pixels=OLD_MAX_PIXELS).image
    encode(img, "PNG" if img.mode == "RGBA" else "JPEG", 92)
    return f"{img.width}x{img.height}"


def decode_after(data: bytes) -> str:
    result = decode_upload(data, None, max_bytes=50_000_000)
    return f"{result.width}x{result.height}"


def input_before(data: bytes) -> str:
    """The previous ``prepare_input``: a full decode, then the thumbnail."""
    img = open_image(data, max_bytes=50_000_000, max_pixels=OLD_MAX_PIXELS).image
    img.thumbnail((2048, 2048), Image.Resampling.LANCZOS)
    encode(img, "JPEG", 92)
    return f"{img.width}x{img.height}"


def input_after(data: bytes) -> str:
    prepare_input(data, max_side=2048, formats=("JPEG",), data_uri=False, max_bytes=50_000_000)
    return "2048"


DECODERS: dict[str, Callable[[bytes], str]] = {
    "upload_before": decode_before,
    "upload_after": decode_after,
    "input_before": input_before,
    "input_after": input_after,
}


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_decode(path: Path, decoder: str) -> dict[str, Any]:
    """In this (fresh) process: CPU seconds and peak memory growth of one decode."""
    data = path.read_bytes()
    base = peak_rss_mb()
    started = time.process_time()
    try:
        outcome = DECODERS[decoder](data)
    except Exception as exc:  # a refusal is an outcome too (its cost is measured)
        outcome = getattr(exc, "code", type(exc).__name__)
    cpu = time.process_time() - started
    return {"cpu_s": cpu, "peak_mb": peak_rss_mb() - base, "outcome": outcome}


def decode_runs(quick: bool, workdir: Path) -> dict[str, float]:
    results: dict[str, float] = {}
    names = QUICK_IMAGES if quick else tuple(IMAGES)
    cases = [(name, "upload") for name in names]
    cases.append(("jpeg_24mp" if quick else "jpeg_40mp", "input"))
    for name, kind in cases:
        path = workdir / f"{name}.img"
        if not path.exists():
            path.write_bytes(make_image(*IMAGES[name]))
        results[f"decode_{name}_bytes"] = float(path.stat().st_size)
        for when in ("before", "after"):
            cmd = [sys.executable, "-m", "bench.bench_hostile", "--decode", str(path)]
            cmd += ["--decoder", f"{kind}_{when}"]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            label = f"decode_{kind}_{name}_{when}"
            results[f"{label}_cpu_s"] = figures["cpu_s"]
            results[f"{label}_peak_mb"] = figures["peak_mb"]
            print(f"{label}: {figures['outcome']}")
    return results


# --- running --------------------------------------------------------------------------------------


async def run_async(quick: bool, workdir: Path) -> dict[str, float]:
    routes = bombs(BOMB_GIB)
    per_kind = 2 if quick else 6
    refused = 300 if quick else 3000
    key = await create_user(workdir)
    results: dict[str, float] = {}
    with bomb_server(routes) as bomb_port:
        urls = [f"http://127.0.0.1:{bomb_port}{path}" for path in routes for _ in range(per_kind)]
        results["bomb_wire_bytes_max"] = float(max(len(body) for _, body in routes.values()))
        results["bomb_wire_bytes_min"] = float(min(len(body) for _, body in routes.values()))
        with hookline(workdir, f"127.0.0.1:{bomb_port}") as (port, pid):
            base = f"http://127.0.0.1:{port}"
            results.update(await bomb_run(base, key, pid, urls))
            results.update(await refused_run(port, key, pid, refused))
    results.update(await asyncio.to_thread(decode_runs, quick, workdir))
    return results


def run(quick: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="hookline-bench-hostile-") as tmp:
        results = asyncio.run(run_async(quick, Path(tmp)))
    for name, value in results.items():
        goal = GOALS.get(name)
        print(f"{name}: {value:,.2f}" + (f" (goal {goal})" if goal else ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer bombs, requests and images")
    parser.add_argument("--decode", type=Path, help=argparse.SUPPRESS)  # (c), in a child
    parser.add_argument("--decoder", choices=sorted(DECODERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode:
        print(json.dumps(measure_decode(args.decode, args.decoder)))
        return
    run(args.quick)


if __name__ == "__main__":
    main()
