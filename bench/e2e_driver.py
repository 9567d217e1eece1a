"""The driver of ``bench_e2e``, in its own process: ``python -m bench.e2e_driver CONFIG OUT``.

``CONFIG`` is the JSON ``bench_e2e`` writes (hookline's API bases and process ids, the fake's base
and pid, the store file, the blob directory, the API keys, the webhook secret, N, concurrency…);
the figures go to ``OUT`` as JSON. On stdout it speaks a two-line protocol with ``bench_e2e``:
``READY`` once the idle baseline is read (it then waits for a line on stdin before phase A, so a
profiler can attach), ``PHASES_DONE`` after phase B (again waiting for a line, so the profiler
stops before the checks).

1. Set-up: one ``POST /v1/uploads``; a few warm-up tasks through the whole path (another user);
   hookline's idle PSS/RSS and CPU.
2. Phase A: N × ``POST /v1/tasks`` (the upload, a prompt, the model; an ``Idempotency-Key``
   each), ``concurrency`` at once, spread over the API processes → starts/s acked, answers by
   status; then the time until the fake holds all accepted jobs and every accepted task is
   ``ai_processing`` in the store (the SQLite file opened read-only). hookline's PSS/RSS then.
3. Phase B: every held prediction completed at the fake, its full prediction object signed with
   Standard Webhooks (the ``standardwebhooks`` reference library) and posted to the task's
   callback URL, ``concurrency`` at once → completions/s until every task is ``completed``. When
   hookline's in-flight limits hold tasks back in ``pending``, the fake's newly held jobs are
   completed as they appear, until every accepted task is terminal.
   With ``webhooks`` (``bench_e2e --webhooks``): a loopback receiver (bench/e2e_receiver.py, in
   its own process or in this one) is registered as an endpoint of the bench user and of the
   warm-up user before the warm-up (``POST /v1/webhooks``, the default events); after phase B,
   phase C waits until it holds a terminal event for every terminal task (hookline's CPU counted
   apart: the delivery tail).
4. Checks (untimed): the histories (``ai_succeeded`` → ``finished``: callback→completed; webhook
   sent → ``finished``), every output's record, its file under the blob directory (size, magic
   bytes, content type), a sample decoded and compared with the fake's PNG (watermarked), a few
   output URLs fetched through hookline. With webhooks: outbound deliveries/s (first to last
   terminal-event delivery), delivery lag (receive time − the body's ``created_at``, which is the
   ``finished`` transition's time) p50/p99, split where the driver saw each terminal change in
   the feed table and each message in the outbox table (polled every ``POLL_S`` during phases B
   and C) and at the first try's start (the outbox's attempt record); every completed task's
   ``task.completed`` received once under one ``webhook-id`` and verified with
   ``standardwebhooks``; retries and duplicates counted.

CPU is user+sys seconds from ``/proc/PID/stat`` (children included), per phase, for hookline's
processes, the fake and the receiver's process; the driver's own from ``getrusage``. The HTTP
client is a small keep-alive HTTP/1.1 client on asyncio streams (``raw``, the default: it leaves
the CPU to hookline) or ``httpx.AsyncClient`` (``httpx``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import json
import math
import os
import random
import resource
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
from PIL import Image, ImageChops
from standardwebhooks import Webhook

from bench.e2e_receiver import TERMINAL_TYPES, Receiver, RemoteReceiver

REQUEST_TIMEOUT_S = 30.0
POLL_S = 0.02
STRONG_DIFF = 40  # a pixel the watermark changed, not JPEG's re-encoding
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMAGE_MAGIC = {
    "image/jpeg": b"\xff\xd8\xff",
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/webp": b"RIFF",
}
WARM_UP_DELIVERIES_S = 30.0  # the most the warm-up's deliveries may take


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One of hookline's outbox messages as the bench sees it: its state and tries, the first
    try's start (its attempt record), and when the driver first saw it in the table (epoch;
    polled every ``POLL_S``, so up to that much late)."""

    state: str
    tries: int
    tried_at: float | None
    seen_at: float | None


class BenchError(RuntimeError):
    """The benchmark could not go on (a timeout, a refused set-up step): the message says why."""


# --- /proc --------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants (``/proc/PID/task/*/children``)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_s(pids: Iterable[int]) -> float:
    """User+sys CPU seconds of the processes, their live descendants and their reaped children."""
    total = 0.0
    for root in pids:
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                # fields[11:15]: utime, stime, cutime, cstime (stat fields 14-17)
                total += sum(int(v) for v in fields[11:15]) / CLK_TCK
    return total


def memory_kib(pids: Iterable[int]) -> tuple[float, float]:
    """(PSS, RSS) in KiB of the processes and their live descendants (``smaps_rollup``)."""
    pss = rss = 0.0
    for root in pids:
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss += float(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += float(line.split()[1])
    return pss, rss


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (NaN when empty)."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1]


# --- HTTP clients -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 0: no answer (timeout or connection failure)
    body: bytes


class Client(Protocol):
    async def send(
        self, slot: int, origin: str, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Answer: ...

    async def aclose(self) -> None: ...


class RawConnection:
    """One keep-alive HTTP/1.1 connection: a request out, its answer read by Content-Length (or
    chunked). Reconnects when the server has closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> Answer:
        fresh = self.writer is None or self.reader is None or self.reader.at_eof()
        for attempt in range(2):
            if fresh or attempt:
                if attempt:
                    self.reconnects += 1
                reader, writer = await self._connect()
            else:
                assert self.reader is not None and self.writer is not None
                reader, writer = self.reader, self.writer
            try:
                writer.write(data)
                return await self._answer(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                # a kept-alive connection the server closed; the requests carry an idempotency
                # key or a webhook-id, so sending again is safe
                await self.close()
                if attempt:
                    raise
            except BaseException:
                # cancelled or timed out mid-request: its answer may still arrive, and must not
                # be read as the next request's
                self.drop()
                raise
        raise AssertionError("unreachable")

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _answer(self, reader: asyncio.StreamReader) -> Answer:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        start = lower.find(b"\r\ncontent-length:")
        if start >= 0:
            end = lower.index(b"\r\n", start + 2)
            body = await reader.readexactly(int(lower[start + 17 : end]))
        elif b"transfer-encoding: chunked" in lower:
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = b""
        if b"\r\nconnection: close" in lower:
            await self.close()
        return Answer(status, body)


class RawClient:
    """A connection per (slot, origin): ``concurrency`` slots never share one."""

    def __init__(self) -> None:
        self.conns: dict[tuple[int, str], RawConnection] = {}

    async def send(
        self, slot: int, origin: str, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        conn = self.conns.get((slot, origin))
        if conn is None:
            parts = urlsplit(origin)
            assert parts.hostname and parts.port
            conn = self.conns[(slot, origin)] = RawConnection(parts.hostname, parts.port)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {conn.host}:{conn.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "\r\n".join(lines).encode() + body
        try:
            return await asyncio.wait_for(conn.request(data), REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            await conn.close()
            return Answer(0, b"")

    @property
    def reconnects(self) -> int:
        return sum(c.reconnects for c in self.conns.values())

    async def aclose(self) -> None:
        for conn in self.conns.values():
            await conn.close()


class HttpxClient:
    """``httpx.AsyncClient`` with a pool as large as the concurrency."""

    reconnects = 0

    def __init__(self, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False)

    async def send(
        self, slot: int, origin: str, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        try:
            r = await self.http.request(method, origin + target, headers=headers, content=body)
        except httpx.HTTPError:
            return Answer(0, b"")
        return Answer(r.status_code, r.content)

    async def aclose(self) -> None:
        await self.http.aclose()


def make_client(kind: str, concurrency: int) -> RawClient | HttpxClient:
    return HttpxClient(concurrency) if kind == "httpx" else RawClient()


# --- the run ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Meters:
    """CPU seconds of hookline, the fake, the receiver's process and the driver at one moment."""

    hookline: float
    fake: float
    receiver: float
    driver: float
    at: float

    @classmethod
    def read(
        cls, hookline_pids: Sequence[int], fake_pid: int, receiver_pids: Sequence[int]
    ) -> Meters:
        return cls(
            cpu_s(hookline_pids),
            cpu_s([fake_pid]),
            cpu_s(receiver_pids),
            own_cpu_s(),
            time.monotonic(),
        )

    def since(self, before: Meters) -> dict[str, float]:
        return {
            "hookline": self.hookline - before.hookline,
            "fake": self.fake - before.fake,
            "receiver": self.receiver - before.receiver,
            "driver": self.driver - before.driver,
            "wall": self.at - before.at,
        }


@dataclass(slots=True)
class Driver:
    cfg: dict[str, Any]
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)  # task id → webhook leaving (epoch)
    accepted: list[str] = field(default_factory=list)  # ids of the tasks phase A created
    baseline_mem: tuple[float, float] = (math.nan, math.nan)  # idle (PSS, RSS) KiB
    phase_a_cpu: dict[str, float] = field(default_factory=dict)
    webhook: Webhook | None = None
    db: sqlite3.Connection | None = None
    fake_conn: RawConnection | None = None
    fake_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # outbound webhooks: the receiver (here, or its process's control routes), when phase B ended
    receiver: Receiver | RemoteReceiver | None = None
    phase_b_end: float = math.nan  # epoch
    terminal_at_end_of_b: int = 0
    # first seen by watch_store (epoch): a task's terminal feed event; an outbox message
    feed_seen: dict[str, float] = field(default_factory=dict)
    outbox_seen: dict[str, float] = field(default_factory=dict)

    @property
    def api(self) -> list[str]:
        return list(self.cfg["api"])

    @property
    def concurrency(self) -> int:
        return int(self.cfg["concurrency"])

    def meters(self) -> Meters:
        receiver = [self.cfg["receiver_pid"]] if self.cfg.get("receiver_pid") else []
        return Meters.read(self.cfg["hookline_pids"], self.cfg["fake_pid"], receiver)

    def memory(self) -> tuple[float, float]:
        return memory_kib(self.cfg["hookline_pids"])

    # -- the store, read-only --------------------------------------------------------------------

    def store(self) -> sqlite3.Connection:
        if self.db is None:
            self.db = sqlite3.connect(f"file:{self.cfg['db']}?mode=ro", uri=True, timeout=10)
        return self.db

    def states(self, owner: str) -> collections.Counter[str]:
        rows = self.store().execute(
            "SELECT state, count(*) FROM tasks WHERE owner = ? GROUP BY state", (owner,)
        )
        return collections.Counter({state: n for state, n in rows})

    def docs(self, owner: str) -> dict[str, dict[str, Any]]:
        rows = self.store().execute("SELECT id, doc FROM tasks WHERE owner = ?", (owner,))
        return {task_id: orjson.loads(doc) for task_id, doc in rows}

    # -- the fake --------------------------------------------------------------------------------

    async def fake(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the fake's control routes over one kept-alive connection (polled often:
        it must cost the driver little)."""
        if self.fake_conn is None:
            parts = urlsplit(self.cfg["fake"])
            assert parts.hostname and parts.port
            self.fake_conn = RawConnection(parts.hostname, parts.port)
        conn = self.fake_conn
        data = b"" if body is None else orjson.dumps(body)
        head = f"{method} {path} HTTP/1.1\r\nHost: {conn.host}:{conn.port}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        async with self.fake_lock:
            try:
                answer = await asyncio.wait_for(conn.request(head.encode() + data), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                raise BenchError(f"the provider fake did not answer {method} {path}") from exc
        if answer.status != 200:
            raise BenchError(f"the provider fake answered {answer.status} to {method} {path}")
        return orjson.loads(answer.body)

    # -- set-up ----------------------------------------------------------------------------------

    async def upload(self) -> str:
        width, height = self.cfg["upload_size"]
        image = Image.radial_gradient("L").resize((width, height))
        noise = Image.frombytes("L", (width, height), random.Random(3).randbytes(width * height))
        rgb = Image.merge(
            "RGB", (image, Image.blend(image, noise, 0.1), Image.blend(noise, image, 0.8))
        )
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=85)
        async with httpx.AsyncClient(base_url=self.api[0], trust_env=False) as http:
            r = await http.post(
                "/v1/uploads",
                content=buf.getvalue(),
                headers={
                    "Authorization": f"Bearer {self.cfg['key']}",
                    "Content-Type": "image/jpeg",
                },
                timeout=REQUEST_TIMEOUT_S,
            )
        if r.status_code != 201:
            raise BenchError(f"POST /v1/uploads answered {r.status_code}: {r.text[:300]}")
        upload = r.json()
        self.figures.update(
            upload_bytes=upload["bytes"],
            upload_width=upload["width"],
            upload_height=upload["height"],
        )
        key: str = upload["key"]
        return key

    def create_body(self, upload: str, i: int, tag: str) -> bytes:
        return orjson.dumps(
            {
                "inputs": [{"upload": upload}],
                "prompt": f"a lighthouse at dusk, {tag} {i}",
                "model": self.cfg["model"],
            }
        )

    async def warm_up(self, upload: str, warm_upload: str) -> None:
        """A few tasks of another user through the whole path: lazy imports, connection pools."""
        count = int(self.cfg["warmup"])
        if count <= 0:
            return
        client = make_client(self.cfg["client"], self.concurrency)
        try:
            headers = {
                "Authorization": f"Bearer {self.cfg['warm_key']}",
                "Content-Type": "application/json",
            }
            for i in range(count):
                body = self.create_body(warm_upload, i, "warm-up")
                origin = self.api[i % len(self.api)]
                answer = await client.send(0, origin, "POST", "/v1/tasks", headers, body)
                if answer.status != 202:
                    raise BenchError(f"warm-up POST /v1/tasks answered {answer.status}")
            await self.deliver_until_done(self.warm_user, count, client, timeout_s=60)
        finally:
            await client.aclose()

    # -- phase A ---------------------------------------------------------------------------------

    async def phase_a(self, upload: str) -> None:
        n = int(self.cfg["n"])
        client = make_client(self.cfg["client"], self.concurrency)
        statuses: collections.Counter[int] = collections.Counter()
        latencies: list[float] = []
        accepted: list[str] = []
        counter = itertools.count()
        last_ack = math.nan
        run = os.urandom(4).hex()
        auth = f"Bearer {self.cfg['key']}"

        async def worker(slot: int) -> None:
            nonlocal last_ack
            while (i := next(counter)) < n:
                headers = {
                    "Authorization": auth,
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"e2e-{run}-{i}",
                }
                body = self.create_body(upload, i, "task")
                t = time.perf_counter()
                answer = await client.send(
                    slot, self.api[i % len(self.api)], "POST", "/v1/tasks", headers, body
                )
                now = time.perf_counter()
                latencies.append(now - t)
                statuses[answer.status] += 1
                if answer.status == 202:
                    accepted.append(orjson.loads(answer.body)["id"])
                    last_ack = now

        before = self.meters()
        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker(s) for s in range(self.concurrency)))
        finally:
            await client.aclose()
        answered = time.perf_counter()
        after_requests = self.meters()
        self.accepted = accepted
        latencies.sort()
        ack_window = last_ack - started
        self.figures.update(
            n=n,
            accepted=len(accepted),
            refused=n - len(accepted),
            starts_per_s=len(accepted) / ack_window if accepted else 0.0,
            phase_a_requests_s=answered - started,
            create_p50_ms=percentile(latencies, 50) * 1000,
            create_p99_ms=percentile(latencies, 99) * 1000,
            client_reconnects_a=float(getattr(client, "reconnects", 0)),
        )
        for status, count in sorted(statuses.items()):
            self.figures[f"create_status_{status}"] = count
        waited = await self.wait_all_waiting(len(accepted), last_ack)
        at_waiting = self.meters()
        pss, rss = self.memory()
        self.figures.update(
            hookline_pss_waiting_mib=pss / 1024,
            hookline_rss_waiting_mib=rss / 1024,
            waiting_tasks_at_read=waited,
        )
        growth_pss = pss - self.baseline_mem[0]
        growth_rss = rss - self.baseline_mem[1]
        self.figures.update(
            pss_per_waiting_task_kib=growth_pss / waited if waited else math.nan,
            rss_per_waiting_task_kib=growth_rss / waited if waited else math.nan,
        )
        cpu = at_waiting.since(before)
        requests_cpu = after_requests.since(before)
        self.phase_a_cpu = cpu
        self.figures.update(
            hookline_cpu_a_s=cpu["hookline"],
            fake_cpu_a_s=cpu["fake"],
            receiver_cpu_a_s=cpu["receiver"],
            driver_cpu_a_s=cpu["driver"],
            phase_a_s=cpu["wall"],
            driver_cpu_us_per_create=requests_cpu["driver"] / n * 1e6,
            hookline_cores_a=cpu["hookline"] / cpu["wall"],
        )

    async def wait_all_waiting(self, accepted: int, last_ack: float) -> int:
        """Seconds from the last ack until the fake holds every accepted job and every accepted
        task is ai_processing; stops (NaN) when nothing moves for ``stall_s``. The tasks still
        waiting (not terminal, not being worked on) when it stops."""
        stall_s, timeout_s = float(self.cfg["stall_s"]), float(self.cfg["phase_timeout_s"])
        held_at = store_at = math.nan
        last_seen: tuple[Any, ...] = ()
        moved = time.perf_counter()
        deadline = moved + timeout_s
        while True:
            stats = await self.fake("GET", "/_bench/stats")
            states = self.states(self.cfg["user"])
            now = time.perf_counter()
            if math.isnan(held_at) and stats["held"] >= accepted:
                held_at = now
            if math.isnan(store_at) and states["ai_processing"] >= accepted:
                store_at = now
            if not math.isnan(held_at) and not math.isnan(store_at):
                break
            seen = (stats["held"], tuple(sorted(states.items())))
            if seen != last_seen:
                last_seen, moved = seen, now
            if now - moved > stall_s or now > deadline:
                why = "nothing moved for" if now - moved > stall_s else "gave up after"
                self.notes.append(
                    f"phase A: not every task reached ai_processing ({why} "
                    f"{stall_s if now - moved > stall_s else timeout_s:.0f} s): the fake holds "
                    f"{stats['held']} of {accepted} jobs; store states {dict(states)}"
                )
                break
            await asyncio.sleep(POLL_S)
        self.figures.update(
            fake_holds_all_after_last_ack_s=held_at - last_ack,
            store_all_waiting_after_last_ack_s=store_at - last_ack,
            all_waiting_after_last_ack_s=max(held_at, store_at) - last_ack,
            held_at_end_of_a=stats["held"],
        )
        for state, count in states.items():
            self.figures[f"state_at_end_of_a_{state}"] = count
        return sum(states[s] for s in ("pending", "processing", "ai_processing", "watermarking"))

    # -- phase B ---------------------------------------------------------------------------------

    def webhook_request(
        self, prediction: dict[str, Any], k: int
    ) -> tuple[str, str, str, dict[str, str], bytes]:
        """(task id, origin, target, headers, body) of the signed webhook for ``prediction``,
        spread over the API processes."""
        body = orjson.dumps(prediction)
        msg_id = f"msg_{prediction['id']}"
        now = datetime.now(UTC)
        assert self.webhook is not None
        signature = self.webhook.sign(msg_id, now, body.decode())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": signature,
        }
        url = urlsplit(prediction["webhook"])
        task_id = url.path.rsplit("/", 1)[-1]
        return task_id, self.api[k % len(self.api)], f"{url.path}?{url.query}", headers, body

    async def deliver_until_done(
        self,
        owner: str,
        expected: int,
        client: RawClient | HttpxClient,
        *,
        timeout_s: float,
        first: list[tuple[str, str, str, dict[str, str], bytes]] | None = None,
        after: int = -1,
    ) -> dict[str, Any]:
        """Post webhooks for every held prediction (``first``, then any the fake holds later)
        until ``expected`` tasks of ``owner`` are terminal. Answers by status, latencies."""
        queue: asyncio.Queue[tuple[str, str, str, dict[str, str], bytes] | None] = asyncio.Queue()
        for item in first or []:
            queue.put_nowait(item)
        statuses: collections.Counter[int] = collections.Counter()
        latencies: list[float] = []
        done = asyncio.Event()
        sent = itertools.count()

        async def worker(slot: int) -> None:
            while (item := await queue.get()) is not None:
                task_id, origin, target, headers, body = item
                self.sent_at[task_id] = time.time()
                t = time.perf_counter()
                answer = await client.send(slot, origin, "POST", target, headers, body)
                latencies.append(time.perf_counter() - t)
                statuses[answer.status] += 1

        async def feeder() -> None:
            last = after
            while not done.is_set():
                held = await self.fake("GET", f"/_bench/held?after={last}")
                last = held["last"]
                ids = [item["id"] for item in held["items"]]
                if ids:
                    completed = await self.fake("POST", "/_bench/complete", {"ids": ids})
                    for prediction in completed["items"]:
                        queue.put_nowait(self.webhook_request(prediction, next(sent)))
                await asyncio.sleep(POLL_S * 2)

        workers = [asyncio.create_task(worker(s)) for s in range(self.concurrency)]
        feeding = asyncio.create_task(feeder())
        stall_s = float(self.cfg["stall_s"])
        moved = time.perf_counter()
        deadline = moved + timeout_s
        last_seen: tuple[Any, ...] = ()
        try:
            while True:
                states = self.states(owner)
                terminal = states["completed"] + states["failed"] + states["cancelled"]
                now = time.perf_counter()
                if terminal >= expected:
                    break
                seen = tuple(sorted(states.items()))
                if seen != last_seen:
                    last_seen, moved = seen, now
                if now - moved > stall_s or now > deadline:
                    self.notes.append(
                        f"{owner}: {terminal} of {expected} tasks terminal when the bench stopped "
                        f"waiting; store states {dict(states)}"
                    )
                    break
                if feeding.done() and feeding.exception():
                    raise BenchError(f"the webhook feeder failed: {feeding.exception()!r}")
                await asyncio.sleep(POLL_S)
        finally:
            done.set()
            feeding.cancel()
            for _ in workers:
                queue.put_nowait(None)
            # workers finish what they hold; anything left in the queue is dropped
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            await asyncio.wait_for(asyncio.gather(*workers), REQUEST_TIMEOUT_S + 5)
        latencies.sort()
        return {"statuses": statuses, "latencies": latencies, "states": states, "end": now}

    async def phase_b(self) -> None:
        held = await self.fake("GET", "/_bench/held?after=-1")
        ids = [item["id"] for item in held["items"]]
        completed = (
            await self.fake("POST", "/_bench/complete", {"ids": ids}) if ids else {"items": []}
        )
        first = [self.webhook_request(p, k) for k, p in enumerate(completed["items"])]
        self.figures["webhook_body_bytes_mean"] = (
            sum(len(item[4]) for item in first) / len(first) if first else math.nan
        )
        client = make_client(self.cfg["client"], self.concurrency)
        before = self.meters()
        started = time.perf_counter()
        try:
            result = await self.deliver_until_done(
                self.cfg["user"],
                len(self.accepted),
                client,
                timeout_s=float(self.cfg["phase_timeout_s"]),
                first=first,
                after=held["last"],
            )
        finally:
            await client.aclose()
        after = self.meters()
        self.phase_b_end = time.time()
        cpu = after.since(before)
        states = result["states"]
        self.terminal_at_end_of_b = states["completed"] + states["failed"] + states["cancelled"]
        elapsed = result["end"] - started
        latencies = result["latencies"]
        self.figures.update(
            completed=states["completed"],
            failed=states["failed"],
            cancelled=states["cancelled"],
            tasks_not_completed=len(self.accepted) - states["completed"],
            completions_per_s=states["completed"] / elapsed if elapsed > 0 else math.nan,
            phase_b_s=elapsed,
            webhooks_sent=len(latencies),
            webhook_p50_ms=percentile(latencies, 50) * 1000,
            webhook_p99_ms=percentile(latencies, 99) * 1000,
            hookline_cpu_b_s=cpu["hookline"],
            fake_cpu_b_s=cpu["fake"],
            receiver_cpu_b_s=cpu["receiver"],
            driver_cpu_b_s=cpu["driver"],
            driver_cpu_us_per_webhook=cpu["driver"] / max(1, len(latencies)) * 1e6,
            hookline_cores_b=cpu["hookline"] / cpu["wall"],
            client_reconnects_b=float(getattr(client, "reconnects", 0)),
        )
        for status, count in sorted(result["statuses"].items()):
            self.figures[f"webhook_status_{status}"] = count
        tasks = max(1, states["completed"])
        both = self.phase_a_cpu["hookline"] + cpu["hookline"]
        self.figures.update(
            hookline_cpu_ms_per_task=both / tasks * 1000,
            hookline_cpu_a_ms_per_task=self.phase_a_cpu["hookline"] / tasks * 1000,
            hookline_cpu_b_ms_per_task=cpu["hookline"] / tasks * 1000,
        )
        pss, rss = self.memory()
        self.figures.update(hookline_pss_after_mib=pss / 1024, hookline_rss_after_mib=rss / 1024)

    # -- outbound webhooks -----------------------------------------------------------------------

    @property
    def webhooks(self) -> bool:
        return bool(self.cfg.get("webhooks"))

    async def open_receiver(self) -> None:
        """The receiver: started in this process (``receiver: driver``), or its own process's
        control routes."""
        url = str(self.cfg["receiver_url"])
        if self.cfg["receiver"] == "driver":
            receiver = Receiver()
            parts = urlsplit(url)
            assert parts.hostname and parts.port
            await receiver.start(parts.hostname, parts.port)
            self.receiver = receiver
        else:
            self.receiver = RemoteReceiver(url)

    async def register_endpoints(self) -> None:
        """``POST /v1/webhooks`` (the default events) for the bench user and the warm-up user,
        each at its own path of the receiver, which gets their secrets."""
        assert self.receiver is not None
        secrets = {}
        users = ((self.cfg["key"], self.cfg["user"]), (self.cfg["warm_key"], self.warm_user))
        async with httpx.AsyncClient(base_url=self.api[0], trust_env=False) as http:
            for key, user in users:
                path = hook_path(user)
                r = await http.post(
                    "/v1/webhooks",
                    json={"url": self.cfg["receiver_url"] + path},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=REQUEST_TIMEOUT_S,
                )
                if r.status_code != 201:
                    raise BenchError(f"POST /v1/webhooks answered {r.status_code}: {r.text[:300]}")
                secrets[path] = r.json()["secret"]
        await self.receiver.set_secrets(secrets)
        self.figures["webhook_endpoints"] = len(secrets)

    @property
    def warm_user(self) -> str:
        return str(self.cfg.get("warm_user", "warm"))

    async def wait_deliveries(self, user: str, expected: int, timeout_s: float) -> int:
        """Until the receiver holds a terminal event for ``expected`` of ``user``'s tasks; gives
        up when nothing new arrived for ``stall_s`` or after ``timeout_s``. How many it holds."""
        assert self.receiver is not None
        path, stall_s = hook_path(user), float(self.cfg["stall_s"])
        moved = time.perf_counter()
        deadline, last = moved + timeout_s, -1
        while True:
            counts = await self.receiver.counts()
            got = int(counts["paths"].get(path, {}).get("terminal_tasks", 0))
            now = time.perf_counter()
            if got >= expected:
                return got
            if got != last:
                last, moved = got, now
            if now - moved > stall_s or now > deadline:
                self.notes.append(
                    f"{user}: terminal events of {got} of {expected} terminal tasks received "
                    "when the bench stopped waiting for deliveries"
                )
                return got
            await asyncio.sleep(POLL_S)

    async def phase_c(self) -> None:
        """The delivery tail: from the end of phase B until the receiver holds a terminal event
        for every terminal task; hookline's CPU for it, and per task with it."""
        before = self.meters()
        await self.wait_deliveries(
            self.cfg["user"], self.terminal_at_end_of_b, float(self.cfg["phase_timeout_s"])
        )
        cpu = self.meters().since(before)
        tasks = max(1, int(self.figures.get("completed", 0)))
        total = (
            self.figures["hookline_cpu_a_s"] + self.figures["hookline_cpu_b_s"] + cpu["hookline"]
        )
        self.figures.update(
            phase_c_s=cpu["wall"],
            hookline_cpu_c_s=cpu["hookline"],
            receiver_cpu_c_s=cpu["receiver"],
            driver_cpu_c_s=cpu["driver"],
            hookline_cpu_c_ms_per_task=cpu["hookline"] / tasks * 1000,
            hookline_cpu_ms_per_task=total / tasks * 1000,
        )

    async def watch_store(self) -> None:
        """Until cancelled: when each terminal change first shows in the feed table (committed)
        and each new outbox message in the outbox table, every ``POLL_S``."""
        terminal = tuple(t.removeprefix("task.") for t in sorted(TERMINAL_TYPES))
        feed_sql = (
            "SELECT seq, task_id FROM feed_events WHERE seq > ?"
            f" AND dest IN ({', '.join('?' * len(terminal))}) ORDER BY seq"
        )
        outbox_sql = "SELECT rowid, id FROM outbox WHERE rowid > ? ORDER BY rowid"
        last_seq = last_row = 0
        while True:
            try:
                events = self.store().execute(feed_sql, (last_seq, *terminal)).fetchall()
                messages = self.store().execute(outbox_sql, (last_row,)).fetchall()
            except sqlite3.Error as exc:
                self.notes.append(f"the feed and outbox could not be watched: {exc}")
                return
            now = time.time()
            for _, task_id in events:
                self.feed_seen.setdefault(task_id, now)
            for _, msg_id in messages:
                self.outbox_seen.setdefault(msg_id, now)
            last_seq = events[-1][0] if events else last_seq
            last_row = messages[-1][0] if messages else last_row
            await asyncio.sleep(POLL_S)

    def outbox_rows(self, owner: str) -> dict[str, OutboxRow]:
        """The owner's messages in hookline's outbox, by id."""
        try:
            rows = self.store().execute(
                "SELECT o.id, o.state, o.attempts, a.at FROM outbox o"
                " LEFT JOIN outbox_attempts a ON a.message_id = o.id AND a.number = 1"
                " WHERE o.owner = ?",
                (owner,),
            )
        except sqlite3.Error as exc:
            self.notes.append(f"the outbox could not be read: {exc}")
            return {}
        return {
            msg_id: OutboxRow(state, tries, at, self.outbox_seen.get(msg_id))
            for msg_id, state, tries, at in rows.fetchall()
        }

    async def check_deliveries(self, docs: dict[str, dict[str, Any]]) -> None:
        assert self.receiver is not None
        items = await self.receiver.items()
        mine = hook_path(self.cfg["user"])
        figures, notes = delivery_figures(
            [r for r in items if r["path"] == mine],
            docs,
            self.accepted,
            self.outbox_rows(self.cfg["user"]),
            self.feed_seen,
            self.phase_b_end,
        )
        self.figures.update(figures)
        self.notes += notes
        warm = hook_path(self.warm_user)
        self.figures.update(
            deliveries_warm_up=sum(r["path"] == warm for r in items),
            deliveries_elsewhere=sum(r["path"] not in (mine, warm) for r in items),
        )

    async def close(self) -> None:
        if self.receiver is not None:
            await self.receiver.close()

    # -- checks ----------------------------------------------------------------------------------

    async def check(self) -> None:
        docs = self.docs(self.cfg["user"])
        blob_dir = Path(self.cfg["blob_dir"])
        callback, sent_to_done, create_to_waiting = [], [], []
        stored = sizes = 0
        bad: collections.Counter[str] = collections.Counter()
        completed_ids = []
        for task_id in self.accepted:
            doc = docs.get(task_id)
            if doc is None or doc["state"] != "completed":
                continue
            completed_ids.append(task_id)
            at = {h["event"]: h["at"] for h in doc["history"]}
            if "ai_succeeded" in at and "finished" in at:
                callback.append((at["finished"] - at["ai_succeeded"]) * 1000)
            if task_id in self.sent_at and "finished" in at:
                sent_to_done.append((at["finished"] - self.sent_at[task_id]) * 1000)
            if "submitted" in at:
                create_to_waiting.append((at["submitted"] - doc["created_at"]) * 1000)
            outputs = doc["outputs"]
            if len(outputs) != 1:
                bad["output_count"] += 1
                continue
            out = outputs[0]
            path = blob_dir / out["key"]
            if not path.is_file():
                bad["file_missing"] += 1
                continue
            head = path.open("rb").read(16)
            size = path.stat().st_size
            magic = IMAGE_MAGIC.get(out["content_type"])
            if size == 0 or magic is None or not head.startswith(magic):
                bad["content_type_mismatch"] += 1
                continue
            if (out["width"], out["height"]) != (256, 256):
                bad["size_mismatch"] += 1
                continue
            stored += 1
            sizes += size
        for values in (callback, sent_to_done, create_to_waiting):
            values.sort()
        self.figures.update(
            callback_to_completed_p50_ms=percentile(callback, 50),
            callback_to_completed_p99_ms=percentile(callback, 99),
            callback_to_completed_max_ms=callback[-1] if callback else math.nan,
            webhook_sent_to_completed_p50_ms=percentile(sent_to_done, 50),
            webhook_sent_to_completed_p99_ms=percentile(sent_to_done, 99),
            created_to_ai_processing_p50_ms=percentile(create_to_waiting, 50),
            created_to_ai_processing_p99_ms=percentile(create_to_waiting, 99),
            outputs_stored=stored,
            outputs_not_stored=len(self.accepted) - stored,
            output_file_bytes_mean=sizes / stored if stored else math.nan,
        )
        for reason, count in bad.items():
            self.figures[f"output_bad_{reason}"] = count
        stats = await self.fake("GET", "/_bench/stats")
        self.figures.update(
            fake_created=stats["created"],
            fake_output_fetches=stats["output_fetches"],
            fake_polls=stats["gets"],
            fake_cancels=stats["canceled"],
            fake_refused_auth=stats["refused_auth"],
            fake_refused_body=stats["refused_body"],
            fake_data_uri_inputs=stats["data_uri_inputs"],
            fake_url_inputs=stats["url_inputs"],
            fake_input_fetches=stats["input_fetches"],
            fake_input_fetch_failures=stats["input_fetch_failures"],
            output_png_bytes=stats["png_bytes"],
        )
        await self.check_watermarks(docs, completed_ids, blob_dir)
        if self.webhooks:
            await self.check_deliveries(docs)

    async def check_watermarks(
        self, docs: dict[str, dict[str, Any]], ids: list[str], blob_dir: Path
    ) -> None:
        """A sample of outputs differs strongly from the fake's PNG where the watermark goes
        (and not where it does not), and is served by hookline."""
        sample = ids[:: max(1, len(ids) // max(1, int(self.cfg["verify_sample"])))][
            : int(self.cfg["verify_sample"])
        ]
        async with httpx.AsyncClient(base_url=self.cfg["fake"], trust_env=False) as http:
            png = (await http.get("/_bench/png")).content
        source = Image.open(io.BytesIO(png)).convert("RGB")
        marked = 0
        for task_id in sample:
            out = docs[task_id]["outputs"][0]
            image = Image.open(blob_dir / out["key"]).convert("RGB")
            if image.size != source.size:
                continue
            # re-encoding changes every pixel a little; the mark changes a few a lot
            diff = ImageChops.difference(source, image).convert("L")
            mark, other = watermark_boxes(image.size, self.cfg["watermark_position"])
            inside = sum(diff.crop(mark).histogram()[STRONG_DIFF:])
            outside = sum(diff.crop(other).histogram()[STRONG_DIFF:])
            marked += inside >= 50 and inside > 5 * outside + 10
        self.figures.update(watermark_checked=len(sample), watermark_found=marked)
        served = 0
        headers = {"Authorization": f"Bearer {self.cfg['key']}"}
        async with httpx.AsyncClient(base_url=self.api[0], trust_env=False) as http:
            for task_id in sample[:3]:
                task = (await http.get(f"/v1/tasks/{task_id}", headers=headers)).json()
                r = await http.get(task["outputs"][0]["url"])
                served += r.status_code == 200 and r.headers["content-type"].startswith("image/")
        self.figures.update(outputs_served_checked=min(3, len(sample)), outputs_served=served)

    # -- all of it -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self.close()

    async def _run(self) -> None:
        upload = await self.upload()
        self.webhook = Webhook(self.cfg["secret"])
        pss0, rss0 = self.memory()
        self.figures.update(hookline_pss_start_mib=pss0 / 1024, hookline_rss_start_mib=rss0 / 1024)
        if self.webhooks:
            await self.open_receiver()
            await self.register_endpoints()
        await self.warm_up(upload, await self.warm_upload())
        if self.webhooks and int(self.cfg["warmup"]) > 0:
            await self.wait_deliveries(
                self.warm_user, int(self.cfg["warmup"]), WARM_UP_DELIVERIES_S
            )
        # the rate-limit bucket refills; another process's cache of the endpoints expires
        await asyncio.sleep(float(self.cfg["settle_s"]))
        self.baseline_mem = self.memory()
        self.figures.update(
            hookline_pss_baseline_mib=self.baseline_mem[0] / 1024,
            hookline_rss_baseline_mib=self.baseline_mem[1] / 1024,
        )
        handshake("READY")
        await self.phase_a(upload)
        watching = asyncio.create_task(self.watch_store()) if self.webhooks else None
        try:
            await self.phase_b()
            if self.webhooks:
                await self.phase_c()
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        handshake("PHASES_DONE")
        await self.check()

    async def warm_upload(self) -> str:
        """The warm-up user's own upload (a user sees only its own uploads)."""
        key = self.cfg["key"]
        self.cfg["key"] = self.cfg["warm_key"]
        try:
            return await self.upload()
        finally:
            self.cfg["key"] = key


def hook_path(user: str) -> str:
    """The receiver's path for ``user``'s endpoint."""
    return f"/hooks/{user}"


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def delivery_figures(
    received: Sequence[dict[str, Any]],
    docs: dict[str, dict[str, Any]],
    accepted: Sequence[str],
    outbox: dict[str, OutboxRow],
    feed_seen: dict[str, float],
    phase_b_end: float,
) -> tuple[dict[str, float], list[str]]:
    """What the receiver got at the bench user's endpoint (its records in arrival order), against
    the tasks in the store, their terminal feed events and hookline's outbox (when the driver
    first saw each): the figures, and notes on anything wrong."""
    times = collections.Counter(r["webhook_id"] for r in received)
    first: dict[str, dict[str, Any]] = {}
    for r in received:
        first.setdefault(r["webhook_id"], r)
    terminal = [r for r in first.values() if r["type"] in TERMINAL_TYPES]
    completed = [t for t in accepted if docs.get(t, {}).get("state") == "completed"]
    ids_of: dict[str, set[str]] = {}  # task → the webhook-ids its task.completed came under
    for r in terminal:
        if r["type"] == "task.completed":
            ids_of.setdefault(r["task_id"], set()).add(r["webhook_id"])
    done = set(completed)
    once = sum(
        t in done and len(ids) == 1 and times[next(iter(ids))] == 1 for t, ids in ids_of.items()
    )
    known = set(accepted)
    lag, committed, fed, claimed, queued, sent = [], [], [], [], [], []
    not_event_time = wrong_state = 0
    for r in terminal:
        created = epoch(r["created_at"])
        lag.append((r["at"] - created) * 1000)
        doc = docs.get(r["task_id"], {})
        state = r["type"].removeprefix("task.")
        ends = [h["at"] for h in doc.get("history", []) if h["to"] == state]
        not_event_time += not ends or abs(ends[-1] - created) > 0.001
        wrong_state += r["state"] != state
        row = outbox.get(r["webhook_id"])
        if row is not None and row.tried_at is not None:
            queued.append((row.tried_at - created) * 1000)
            sent.append((r["at"] - row.tried_at) * 1000)
            if row.seen_at is not None:
                fed.append((row.seen_at - created) * 1000)
                claimed.append((row.tried_at - row.seen_at) * 1000)
        if r["task_id"] in feed_seen:
            committed.append((feed_seen[r["task_id"]] - created) * 1000)
    for values in (lag, committed, fed, claimed, queued, sent):
        values.sort()
    at = sorted(r["at"] for r in terminal)
    span = at[-1] - at[0] if len(at) > 1 else math.nan
    refused = collections.Counter(r["verified"] for r in received if r["verified"] != "ok")
    outbox_states = collections.Counter(row.state for row in outbox.values())
    figures: dict[str, float] = {
        "deliveries_received": len(received),
        "deliveries_duplicates": len(received) - len(first),
        "deliveries_terminal": len(terminal),
        "deliveries_other_events": len(first) - len(terminal),
        "deliveries_per_s": (len(at) - 1) / span if span > 0 else math.nan,
        "delivery_lag_p50_ms": percentile(lag, 50),
        "delivery_lag_p99_ms": percentile(lag, 99),
        "delivery_lag_max_ms": lag[-1] if lag else math.nan,
        "delivery_queue_p50_ms": percentile(queued, 50),
        "delivery_queue_p99_ms": percentile(queued, 99),
        "delivery_to_feed_p50_ms": percentile(committed, 50),
        "delivery_to_feed_p99_ms": percentile(committed, 99),
        "delivery_to_outbox_p50_ms": percentile(fed, 50),
        "delivery_to_outbox_p99_ms": percentile(fed, 99),
        "delivery_outbox_to_try_p50_ms": percentile(claimed, 50),
        "delivery_outbox_to_try_p99_ms": percentile(claimed, 99),
        "delivery_send_p50_ms": percentile(sent, 50),
        "delivery_send_p99_ms": percentile(sent, 99),
        "last_delivery_after_phase_b_s": at[-1] - phase_b_end if at else math.nan,
        "deliveries_after_phase_b": sum(t > phase_b_end for t in at),
        "deliveries_completed_exactly_once": once,
        "deliveries_completed_missing": sum(t not in ids_of for t in completed),
        "deliveries_completed_extra_ids": sum(len(ids) - 1 for ids in ids_of.values()),
        "deliveries_not_verified": sum(refused.values()),
        "deliveries_unknown_task": sum(r["task_id"] not in known for r in first.values()),
        "deliveries_state_not_type": wrong_state,
        "deliveries_created_at_not_transition": not_event_time,
        "delivery_body_bytes_mean": (
            sum(r["body_bytes"] for r in received) / len(received) if received else math.nan
        ),
        "outbox_messages": len(outbox),
        "outbox_delivered": outbox_states["delivered"],
        "outbox_pending": outbox_states["pending"],
        "outbox_failed": outbox_states["failed"],
        "outbox_retried": sum(row.tries > 1 for row in outbox.values()),
    }
    notes = [f"deliveries refused by standardwebhooks: {dict(refused)}"] if refused else []
    if once != len(completed):
        notes.append(
            f"task.completed received exactly once for {once} of {len(completed)} completed tasks"
        )
    return figures, notes


def watermark_boxes(size: tuple[int, int], position: str) -> tuple[tuple[int, int, int, int], ...]:
    """The box where the watermark goes, and one where it does not."""
    w, h = size
    boxes = {
        "bottom-right": (w * 6 // 10, h * 3 // 4, w, h),
        "bottom-left": (0, h * 3 // 4, w * 4 // 10, h),
        "top-right": (w * 6 // 10, 0, w, h // 4),
        "top-left": (0, 0, w * 4 // 10, h // 4),
        "center": (w * 3 // 10, h * 3 // 8, w * 7 // 10, h * 5 // 8),
    }
    opposite = {
        "bottom-right": "top-left",
        "bottom-left": "top-right",
        "top-right": "bottom-left",
        "top-left": "bottom-right",
        "center": "top-left",
    }
    return boxes[position], boxes[opposite[position]]


def handshake(word: str) -> None:
    """Tell bench_e2e where the run is, and wait for its go-ahead (a line on stdin)."""
    print(word, flush=True)
    if not sys.stdin.readline():
        raise BenchError("bench_e2e went away")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m bench.e2e_driver CONFIG.json OUT.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(args[0]).read_text())
    driver = Driver(cfg)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    error = None
    try:
        runner(driver.run())
    except BenchError as exc:
        error = str(exc)
    out = {"figures": driver.figures, "notes": driver.notes, "error": error}
    Path(args[1]).write_text(json.dumps(out))
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
