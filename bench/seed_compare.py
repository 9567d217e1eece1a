"""The seed's architecture and hookline, side by side: ``python -m bench.seed_compare [--quick]``.

Both run against one provider simulator process with the seed's latency mix
(``HOOKLINE_SIM_LATENCY=seed``: 60 % in 10–40 s, 25 % in 40–60 s, 15 % in 60–120 s), time-compressed
by ``time_scale`` (1/120: a simulated minute is half a real second), 1,000 tasks each
(``--quick``: 100) arriving as a Poisson stream over a simulated hour (``--quick``: 10 minutes) —
first the seed (bench/seed_arch.py, an asyncio model that really calls the simulator), then
hookline (a real ``hookline serve`` process with its Replicate adapter pointed at the simulator,
its timers scaled the same way). Then the same again with the simulator losing 5 % of webhooks.

Then hookline alone with the providers the seed's users have that send no signed webhook:

- **poll only**: the real DashScope adapter (callbacks/dashscope.py) against its fake
  (tests/fakes/dashscope_fake.py): no callback at all, the outcome is found only by the reaper's
  polls on the poll schedule (``HOOKLINE_POLL_FIRST_S``, ``_POLL_INTERVAL_S``,
  ``_POLL_MAX_INTERVAL_S``, scaled like every other timer that waits on the AI);
- **trigger**: the real Kling adapter against its fake: an unsigned callback that only says "ask
  me", confirmed by a query (the scheduled polls run too, as they do for every trigger provider).

Why the real adapters and their fakes, not new simulator modes: the fakes already follow those
providers' contracts (DashScope's task states and query route, Kling's JWT, task object and
unsigned callback) and the adapters are what production runs, so nothing new has to be trusted;
bench/polled_provider.py only serves a fake in its own process and finishes each task after the
same seeded draw from the seed's latency mix the simulator makes. The seed model is not run again
there: it awaits its provider by polling, whatever the provider offers, so its figures are those
of the webhook scenarios. The providers' published quotas are real-time rates: they are scaled by
``1 / time_scale`` like the load, and DashScope's 2 tasks at once is lifted (``concurrency`` 0: the
process's cap, as for Replicate); bench/bench_polling.py holds a poll quota to account. Time runs
half as compressed there (× 1/60; ``--quick`` 1/120): a polled task costs hookline more CPU than
a webhook task (its polls, the trigger's confirming query), and at the webhook scenarios' 33 tasks
a second one process falls behind, which would show as queueing in the delays, not as the
provider's way of telling. The figures gain hookline's CPU per task (``/proc``), which other work
on the machine barely moves.

Figures per architecture: first-try and final success rate, delay beyond the AI's own time (mean,
p50, p95, in real-world seconds: compressed waits are scaled back, hookline's real work is not),
provider calls wasted (generations the provider completed, i.e. billed, minus results used) and
status polls per task. Every task must be accounted for (succeeded + failed = N): that is
asserted; speed never is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
from PIL import Image

from bench import polled_provider
from bench.seed_arch import SIM_TOKEN, SeedArchitecture, SeedTask, iso_seconds
from callbacks import dashscope
from service.http.auth import hash_key, new_api_key
from statemachine import clock
from statemachine.sqlite_store import SqliteStore
from statemachine.states import State
from statemachine.task import Task

ROOT = Path(__file__).resolve().parent.parent
HOOKLINE = str(Path(sys.executable).parent / "hookline")
USER = "seedbench"
NON_TERMINAL = ("pending", "processing", "ai_processing", "watermarking")
ARCHS = ("seed", "hookline")
# hookline's default poll schedule (service/settings.py: poll_first_s, poll_interval_s,
# poll_max_interval_s), scaled like every timer that waits on the AI
FIRST_POLL_S, POLL_INTERVAL_S, POLL_MAX_INTERVAL_S = 20.0, 5.0, 60.0


ProviderKind = Literal["replicate", "dashscope", "kling"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """``webhook_loss``: the share of webhooks (Kling: of callbacks) the provider never sends."""

    name: str
    webhook_loss: float
    archs: tuple[str, ...] = ARCHS
    provider: ProviderKind = "replicate"  # replicate: the simulator; else a polled fake
    # this scenario's time compression is the config's × ``slower`` (bench/README.md: a polled
    # provider costs hookline more CPU per task than one process gives at the compressed rate)
    slower: float = 1.0

    def config(self, cfg: Config) -> Config:
        """``cfg`` with this scenario's time compression."""
        if self.slower == 1.0:
            return cfg
        return dataclasses.replace(cfg, time_scale=cfg.time_scale * self.slower)


@dataclass(frozen=True, slots=True)
class Config:
    """One comparison: N tasks per architecture, simulated durations × ``time_scale``."""

    n: int
    time_scale: float
    arrival_window_s: float  # simulated seconds over which the N tasks arrive
    scenarios: tuple[Scenario, ...] = (
        Scenario("no_loss", 0.0),
        Scenario("webhook_loss_5pct", 0.05),
        Scenario("poll_only", 0.0, archs=("hookline",), provider="dashscope", slower=2.0),
        Scenario("trigger", 0.0, archs=("hookline",), provider="kling", slower=2.0),
    )
    seed: int = 8
    image_side: int = 256  # outputs asked of the provider, the same for both architectures

    def scaled(self, simulated_s: float) -> float:
        return simulated_s * self.time_scale


# Compression shrinks waits, not work: 1,000 tasks in a simulated hour arrive in 30 real seconds
# (about 33 a second), a load the one-process hookline and the seed model's own polling carry on
# a small machine that nothing else is using.
FULL = Config(n=1000, time_scale=1 / 120, arrival_window_s=3600.0)
QUICK = Config(n=100, time_scale=1 / 240, arrival_window_s=600.0)


Status = Literal["succeeded", "failed", "unfinished"]


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    first_try: bool = False
    delay_s: float | None = None  # real-world seconds beyond the AI's own time (succeeded)
    # a polled task: the real seconds by which its first scheduled poll came late, and the delay
    # with that much of the scaled-back poll wait taken as real instead (see polled_outcome)
    lateness_s: float | None = None
    delay_lateness_real_s: float | None = None


@dataclass(slots=True)
class ArchRun:
    outcomes: list[Outcome]
    sim: dict[str, int]  # the simulator's counters during this run
    extra: dict[str, float] = field(default_factory=dict)

    def figures(self, n: int) -> dict[str, float]:
        count = {s: sum(o.status == s for o in self.outcomes) for s in get_args(Status)}
        succeeded = count["succeeded"]
        delays = sorted(o.delay_s for o in self.outcomes if o.delay_s is not None)
        late = sorted(o.lateness_s for o in self.outcomes if o.lateness_s is not None)
        if late:
            self.extra["poll_lateness_p50_ms"] = percentile(late, 50) * 1000
            self.extra["poll_lateness_p95_ms"] = percentile(late, 95) * 1000
            fixed = sorted(
                o.delay_lateness_real_s
                for o in self.outcomes
                if o.delay_lateness_real_s is not None
            )
            self.extra["delay_mean_lateness_real_s"] = statistics.fmean(fixed)
            self.extra["delay_p95_lateness_real_s"] = percentile(fixed, 95)
        return {
            "tasks": float(n),
            "succeeded": float(succeeded),
            "failed": float(count["failed"]),
            "unfinished": float(count["unfinished"]),
            "first_try_success_rate": sum(o.first_try for o in self.outcomes) / n,
            "final_success_rate": succeeded / n,
            "delay_mean_s": statistics.fmean(delays) if delays else float("nan"),
            "delay_p50_s": percentile(delays, 50),
            "delay_p95_s": percentile(delays, 95),
            "delay_max_s": delays[-1] if delays else float("nan"),
            "provider_calls": float(self.sim["predictions_created"]),
            "paid_generations": float(self.sim["generations_completed"]),
            "wasted_calls": float(self.sim["generations_completed"] - succeeded),
            **self.extra,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def arrivals(cfg: Config) -> list[float]:
    """Poisson arrivals (simulated seconds from the start), the same for both architectures."""
    rng = random.Random(cfg.seed)
    rate = cfg.n / cfg.arrival_window_s
    offsets, t = [], 0.0
    for _ in range(cfg.n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    return buf.getvalue()


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], cwd: Path, health: str) -> Iterator[int]:
    """Start ``cmd``; yield its pid once ``health`` answers 200; stop it (SIGINT, then SIGKILL)."""
    with (cwd / f"{Path(cmd[0]).name}-{free_port()}.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(health, timeout=1.0).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[:3]} did not start (exit {proc.poll()}); see {cwd}")
                time.sleep(0.05)
            yield proc.pid
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def simulator(workdir: Path, cfg: Config, loss: float) -> Iterator[str]:
    """The provider simulator as its own process (no access log); its base URL."""
    port = free_port()
    env = base_env()
    env.update(
        HOOKLINE_SIM_LATENCY="seed",
        HOOKLINE_SIM_TIME_SCALE=repr(cfg.time_scale),
        HOOKLINE_SIM_WEBHOOK_LOSS=repr(loss),
        HOOKLINE_SIM_SEED=str(cfg.seed),
        HOOKLINE_SIM_API_TOKEN=SIM_TOKEN,
        # hookline's port is picked later, per run: any port of this machine's loopback, for
        # webhooks and for inputs given as hookline's signed file URLs
        HOOKLINE_SIM_WEBHOOK_HOSTS="127.0.0.1",
        HOOKLINE_INPUT_HOSTS="127.0.0.1",
    )
    cmd = [sys.executable, "-m", "bench.seed_compare", "--serve-simulator", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, env, workdir, f"{url}/v1/_sim/stats"):
        yield url


@contextlib.contextmanager
def polled_fake(workdir: Path, cfg: Config, scenario: Scenario) -> Iterator[str]:
    """The scenario's provider fake with its driver (bench/polled_provider.py) as its own process,
    drawing the simulator's generation times; its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.polled_provider", "--kind", scenario.provider,
           "--port", str(port), "--latency", "seed", "--time-scale", repr(cfg.time_scale),
           "--seed", str(cfg.seed), "--trigger-loss", repr(scenario.webhook_loss)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with process(cmd, base_env(), workdir, f"{url}/_bench/stats"):
        yield url


def provider_env(kind: ProviderKind, cfg: Config, url: str) -> dict[str, str]:
    """hookline's provider settings for ``kind`` at ``url``. The polled ones get the default poll
    schedule (first poll 20 s, then 5 s doubling up to 60 s, jittered) scaled by ``time_scale``;
    DashScope's published quota (2 submits/s, 10 polls/s) is a real-time rate, scaled the same
    way, and its 2 tasks at once is lifted to the process's cap."""
    env = {"HOOKLINE_PROVIDER": kind, "HOOKLINE_OUTPUT_HOSTS": url.removeprefix("http://")}
    if kind == "replicate":
        env.update(HOOKLINE_REPLICATE_API_TOKEN=SIM_TOKEN, HOOKLINE_REPLICATE_BASE_URL=f"{url}/v1")
        return env
    env.update(
        HOOKLINE_POLL_FIRST_S=repr(cfg.scaled(FIRST_POLL_S)),
        HOOKLINE_POLL_INTERVAL_S=repr(cfg.scaled(POLL_INTERVAL_S)),
        HOOKLINE_POLL_MAX_INTERVAL_S=repr(cfg.scaled(POLL_MAX_INTERVAL_S)),
    )
    if kind == "dashscope":
        quota = dashscope.QUOTA
        scaled = {
            "submits_per_s": quota.submits_per_s / cfg.time_scale,
            "polls_per_s": quota.polls_per_s / cfg.time_scale,
            "concurrency": 0,
        }
        env.update(
            HOOKLINE_DASHSCOPE_API_KEY=polled_provider.DASHSCOPE_KEY,
            HOOKLINE_DASHSCOPE_BASE_URL=url,
            HOOKLINE_PROVIDER_QUOTAS=json.dumps({"dashscope": scaled}),
        )
    else:
        env.update(
            HOOKLINE_KLING_ACCESS_KEY=polled_provider.KLING_ACCESS_KEY,
            HOOKLINE_KLING_SECRET_KEY=polled_provider.KLING_SECRET_KEY,
            HOOKLINE_KLING_BASE_URL=url,
        )
    return env


def hookline_env(
    workdir: Path, port: int, cfg: Config, provider_url: str, kind: ProviderKind = "replicate"
) -> dict[str, str]:
    """``hookline serve`` on the scenario's provider, every timer that waits on the AI scaled by
    ``time_scale``. Lease and handoff bound real work, which is not compressed: they keep their
    defaults (60 s, 10 s)."""
    env = base_env()
    env.update(provider_env(kind, cfg, provider_url))
    env.update(
        HOOKLINE_STORE_URL=f"sqlite:///{workdir / 'hookline.db'}",
        HOOKLINE_BLOB_URL=f"file://{workdir / 'blobs'}",
        HOOKLINE_VAR_DIR=str(workdir / "var"),
        HOOKLINE_HOST="127.0.0.1",
        HOOKLINE_PORT=str(port),
        HOOKLINE_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HOOKLINE_AI_DEADLINE_S=repr(cfg.scaled(600.0)),
        HOOKLINE_AI_HARD_CAP_S=repr(cfg.scaled(1800.0)),
        HOOKLINE_REAPER_INTERVAL_S=repr(cfg.scaled(5.0)),
        HOOKLINE_RETRY_BACKOFF_S=repr(cfg.scaled(2.0)),
        HOOKLINE_PROVIDER_CONCURRENCY=str(cfg.n + 100),  # the seed has no cap either
        HOOKLINE_RATE_LIMIT_PER_S="0",
        HOOKLINE_LOG_LEVEL="warning",
    )
    return env


async def sim_stats(
    http: httpx.AsyncClient, url: str, *, settle_s: float, kind: ProviderKind = "replicate"
) -> dict[str, Any]:
    """The provider's counters once no job is running (abandoned jobs run on): the simulator's,
    or a polled fake's (which add ``polls`` and, per job, ``jobs``)."""
    path = "/v1/_sim/stats" if kind == "replicate" else "/_bench/stats"
    deadline = time.monotonic() + settle_s
    while True:
        stats: dict[str, Any] = (await http.get(url + path)).json()
        if stats["in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used: unlike its delays, barely moved by other
    work on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    """The counters' growth (per-job details are left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}


# --- the seed ------------------------------------------------------------------------------------


def seed_outcome(task: SeedTask) -> Outcome:
    """The seed's timeline is simulated: its delay is in real-world seconds already."""
    if not task.terminal:
        return Outcome("unfinished")
    if task.status != "completed" or task.finished_s is None or task.ai_s is None:
        return Outcome("failed")
    return Outcome("succeeded", task.attempts == 1, task.finished_s - task.created_s - task.ai_s)


async def run_seed(cfg: Config, sim_url: str) -> ArchRun:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
        before = await sim_stats(http, sim_url, settle_s=0)
        model = SeedArchitecture(
            http, sim_url, time_scale=cfg.time_scale, image=small_jpeg(), seed=cfg.seed,
            size=cfg.image_side,
        )  # fmt: skip
        tasks = await model.run(arrivals(cfg))
        after = await sim_stats(http, sim_url, settle_s=cfg.scaled(150.0) + 10)
    outcomes = [seed_outcome(t) for t in tasks]
    extra = {
        "attempts_per_task": statistics.fmean(t.attempts for t in tasks),
        "http_errors": float(model.http_errors),
        "polls_per_task": model.polls / cfg.n,
    }
    return ArchRun(outcomes, delta(after, before), extra)


# --- hookline ------------------------------------------------------------------------------------


async def create_user(db: Path) -> str:
    store = SqliteStore(db)
    await store.open()
    try:
        key = new_api_key()
        await store.create_user(
            USER, 10**12, is_admin=False, key_hash=hash_key(key), now=clock.now()
        )
    finally:
        await store.close()
    return key


async def submit_all(client: httpx.AsyncClient, cfg: Config, key: str) -> list[str]:
    """POST one task per arrival, on time; the ids of the accepted ones."""
    auth = {"Authorization": f"Bearer {key}"}
    r = await client.post(
        "/v1/uploads", content=small_jpeg(), headers={**auth, "Content-Type": "image/jpeg"}
    )
    r.raise_for_status()
    body = {
        "inputs": [{"upload": r.json()["key"]}],
        "params": {"width": cfg.image_side, "height": cfg.image_side},
    }
    loop = asyncio.get_running_loop()
    start = loop.time()
    posts: list[asyncio.Task[httpx.Response]] = []
    for n, offset in enumerate(arrivals(cfg)):
        await asyncio.sleep(max(0.0, start + cfg.scaled(offset) - loop.time()))
        one = {**body, "prompt": f"portrait hl-{n:05d}"}
        posts.append(asyncio.create_task(client.post("/v1/tasks", json=one, headers=auth)))
    return [r.json()["id"] for r in await asyncio.gather(*posts) if r.status_code == 202]


async def wait_settled(client: httpx.AsyncClient, key: str, bound_s: float) -> None:
    """Until no task is in a non-terminal state (or the bound passes: then some are missing)."""
    auth = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        busy = False
        for state in NON_TERMINAL:
            r = await client.get("/v1/tasks", params={"state": state, "limit": 1}, headers=auth)
            busy = busy or bool(r.json()["items"])
        if not busy:
            return
        await asyncio.sleep(0.1)


async def read_tasks(db: Path, ids: list[str]) -> list[Task]:
    store = SqliteStore(db)
    await store.open()
    try:
        found = [await store.get_task(i) for i in ids]
    finally:
        await store.close()
    return [t for t in found if t is not None]


def hookline_outcome(task: Task, prediction: dict[str, Any], cfg: Config) -> Outcome:
    """hookline's delay is real work (submit, webhook, watermark), not compressed, and is taken
    as it is — except a wait for the reaper after a lost webhook, which is scaled back. A task
    that needed a second attempt is scaled back whole (pessimistic; none without faults)."""
    at = {h.event: h.at for h in task.history}  # the last of each event: the used attempt
    ai_wall = iso_seconds(prediction["completed_at"]) - iso_seconds(prediction["created_at"])
    delay = at["finished"] - task.created_at - ai_wall
    if task.attempts > 1:
        return Outcome("succeeded", False, delay / cfg.time_scale)
    waited = 0.0
    if reconciled(task, cfg):
        waited = max(0.0, at["ai_succeeded"] - iso_seconds(prediction["completed_at"]))
    return Outcome("succeeded", True, delay - waited + waited / cfg.time_scale)


def reconciled(task: Task, cfg: Config) -> bool:
    """Moved on by the reaper's poll, not a webhook: the reaper cannot act before the deadline."""
    at = {h.event: h.at for h in task.history}
    if "ai_succeeded" not in at or "submitted" not in at:
        return False
    return at["ai_succeeded"] - at["submitted"] >= 0.999 * cfg.scaled(600.0)


async def hookline_outcomes(
    tasks: list[Task], cfg: Config, http: httpx.AsyncClient, sim_url: str
) -> list[Outcome]:
    outcomes = []
    auth = {"Authorization": f"Bearer {SIM_TOKEN}"}
    for task in tasks:
        if not task.terminal:
            outcomes.append(Outcome("unfinished"))
            continue
        if task.state is not State.COMPLETED or task.provider_job_id is None:
            outcomes.append(Outcome("failed"))
            continue
        r = await http.get(f"{sim_url}/v1/predictions/{task.provider_job_id}", headers=auth)
        outcomes.append(hookline_outcome(task, r.json(), cfg))
    return outcomes


def polled_outcome(task: Task, job: dict[str, Any], cfg: Config) -> Outcome:
    """A polled provider's task: its delay is real work, except the wait from the job's end to
    the query that found it when that query was a scheduled poll (no trigger was sent): that wait
    is the compressed poll schedule, scaled back.

    That wait also holds how late the poll came after its scheduled time — the reaper's pass
    interval (compressed too) and real milliseconds (the pass, the claim, the HTTP poll, a busy
    machine) that scaling back multiplies by ``1 / time_scale``: so ``delay_s`` is an upper
    bound. The first poll is the one unjittered point of the schedule (submit + first poll), so
    its lateness is measured per task; ``delay_lateness_real_s`` takes that much of the wait as
    real seconds instead — a lower estimate (it also counts the reaper interval as real)."""
    at = {h.event: h.at for h in task.history}
    ai_wall = job["completed_at"] - job["submitted_at"]
    delay = at["finished"] - task.created_at - ai_wall
    if task.attempts > 1:
        return Outcome("succeeded", False, delay / cfg.time_scale)
    if job["triggered"] or job["found_at"] is None:
        return Outcome("succeeded", True, delay)
    waited = max(0.0, job["found_at"] - job["completed_at"])
    upper = delay - waited + waited / cfg.time_scale
    first = job["first_query_at"]
    if first is None or first > job["found_at"] + 1e-9:
        return Outcome("succeeded", True, upper)
    lateness = max(0.0, first - (at["submitted"] + cfg.scaled(FIRST_POLL_S)))
    real = min(lateness, waited)
    lower = upper - real / cfg.time_scale + real
    return Outcome("succeeded", True, upper, lateness, lower)


def polled_outcomes(tasks: list[Task], cfg: Config, jobs: dict[str, Any]) -> list[Outcome]:
    outcomes = []
    for task in tasks:
        job = jobs.get(task.provider_job_id or "")
        if not task.terminal:
            outcomes.append(Outcome("unfinished"))
        elif task.state is not State.COMPLETED or job is None or job["completed_at"] is None:
            outcomes.append(Outcome("failed"))
        else:
            outcomes.append(polled_outcome(task, job, cfg))
    return outcomes


def found_by_poll(tasks: list[Task], jobs: dict[str, Any]) -> int:
    """Completed tasks of a polled provider whose outcome no trigger announced: a scheduled poll
    found it."""
    used = (jobs.get(t.provider_job_id or "") for t in tasks if t.state is State.COMPLETED)
    return sum(1 for job in used if job is not None and not job["triggered"])


async def run_hookline(
    cfg: Config, scenario: Scenario, provider_url: str, workdir: Path
) -> ArchRun:
    kind = scenario.provider
    port, db = free_port(), workdir / "hookline.db"
    key = await create_user(db)
    env = hookline_env(workdir, port, cfg, provider_url, kind)
    base = f"http://127.0.0.1:{port}"
    bound_s = cfg.scaled(cfg.arrival_window_s + 3 * 1800.0) + 60
    async with httpx.AsyncClient(timeout=30.0) as http:
        before = await sim_stats(http, provider_url, settle_s=0, kind=kind)
        with process([HOOKLINE, "serve"], env, workdir, f"{base}/healthz") as pid:
            cpu_before = cpu_s(pid)
            async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
                ids = await submit_all(client, cfg, key)
                await wait_settled(client, key, bound_s)
            cpu = cpu_s(pid) - cpu_before
            tasks = await read_tasks(db, ids)
        settle_s = cfg.scaled(150.0) + 10
        after = await sim_stats(http, provider_url, settle_s=settle_s, kind=kind)
        extra = {
            "attempts_per_task": statistics.fmean(t.attempts for t in tasks) if tasks else 0.0,
            "refused_at_post": float(cfg.n - len(ids)),
            "cpu_ms_per_task": cpu / cfg.n * 1000,
        }
        if kind == "replicate":
            outcomes = await hookline_outcomes(tasks, cfg, http, provider_url)
            extra["reconciled_by_poll"] = float(sum(reconciled(t, cfg) for t in tasks))
        else:
            outcomes = polled_outcomes(tasks, cfg, after["jobs"])
            extra["found_by_scheduled_poll"] = float(found_by_poll(tasks, after["jobs"]))
            extra["polls_per_task"] = (after["polls"] - before["polls"]) / cfg.n
    # a task refused at POST (or lost from the store) failed as far as its user knows
    outcomes += [Outcome("failed")] * (cfg.n - len(tasks))
    return ArchRun(outcomes, delta(after, before), extra)


# --- the comparison ------------------------------------------------------------------------------


def check_accounting(name: str, arch: str, figures: dict[str, float]) -> None:
    """Every task is accounted for: succeeded + failed = N (asserted, never a speed)."""
    total = figures["succeeded"] + figures["failed"]
    assert total == figures["tasks"], f"{name}/{arch}: {total:g} of {figures['tasks']:g} accounted"


def provider(
    workdir: Path, cfg: Config, scenario: Scenario
) -> contextlib.AbstractContextManager[str]:
    """The scenario's provider process: the simulator (webhooks), or a polled fake."""
    if scenario.provider == "replicate":
        return simulator(workdir, cfg, scenario.webhook_loss)
    if "seed" in scenario.archs:
        raise ValueError(f"{scenario.name}: the seed model speaks only the simulator's contract")
    return polled_fake(workdir, cfg, scenario)


async def compare(cfg: Config, workdir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every scenario, both architectures: flat figures and each run's delays (for the plot)."""
    figures: dict[str, float] = {}
    delays: dict[str, list[float]] = {}
    for scenario in cfg.scenarios:
        scenario_dir = workdir / scenario.name
        scenario_dir.mkdir(parents=True)
        mine_cfg = scenario.config(cfg)
        with provider(scenario_dir, mine_cfg, scenario) as provider_url:
            for arch in scenario.archs:
                if arch == "seed":
                    run = await run_seed(mine_cfg, provider_url)
                else:
                    run = await run_hookline(mine_cfg, scenario, provider_url, scenario_dir)
                mine = run.figures(cfg.n)
                check_accounting(scenario.name, arch, mine)
                figures.update({f"{scenario.name}.{arch}.{k}": v for k, v in mine.items()})
                delays[f"{scenario.name}.{arch}"] = [
                    o.delay_s for o in run.outcomes if o.delay_s is not None
                ]
        # real work is not compressed, so a busy machine shows in the delays: say how busy
        figures[f"config.load_1m.{scenario.name}"] = os.getloadavg()[0]
        figures[f"config.time_scale.{scenario.name}"] = mine_cfg.time_scale
    return figures, delays


def simulated(cfg: Config, name: str) -> bool:
    """Whether scenario ``name`` ran on the simulator (the plot shows those: seed vs hookline)."""
    return any(s.name == name and s.provider == "replicate" for s in cfg.scenarios)


def run(quick: bool) -> dict[str, float]:
    """The full comparison (``quick``: 100 tasks, time × 1/240); writes the delay plot."""
    cfg = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="hookline-seed-") as tmp:
        figures, delays = asyncio.run(compare(cfg, Path(tmp)))
    try:
        from bench import plots

        shown = {k: v for k, v in delays.items() if simulated(cfg, k.split(".")[0])}
        plots.delay_distribution(shown, plots.DELAY_PNG, time_scale=cfg.time_scale, tasks=cfg.n)
    except ImportError as exc:  # matplotlib is the optional `bench` extra
        print(f"note: no plot ({exc})", file=sys.stderr)
    figures["config.tasks_per_architecture"] = float(cfg.n)
    figures["config.time_scale"] = cfg.time_scale
    return figures


# --- the report ----------------------------------------------------------------------------------

ROWS: tuple[tuple[str, str, str], ...] = (
    # (metric, how it reads, the seed write-up's own estimate)
    ("first_try_success_rate", "first-try success", "60 %"),
    ("final_success_rate", "final success", "85 %"),
    ("delay_mean_s", "delay beyond the AI, mean (s)", "~120 s"),
    ("delay_p50_s", "delay beyond the AI, p50 (s)", ""),
    ("delay_p95_s", "delay beyond the AI, p95 (s)", ""),
    ("delay_max_s", "delay beyond the AI, max (s)", ""),
    ("attempts_per_task", "provider attempts per task", ""),
    ("cpu_ms_per_task", "hookline CPU per task (ms)", ""),
    ("provider_calls", "provider calls made", ""),
    ("paid_generations", "generations paid for", ""),
    ("wasted_calls", "paid, result thrown away", ""),
    ("reconciled_by_poll", "lost webhook reconciled by a poll", ""),
    ("found_by_scheduled_poll", "outcome found by a scheduled poll", ""),
    ("polls_per_task", "status polls per task", ""),
    ("poll_lateness_p50_ms", "first poll's lateness, p50 (real ms)", ""),
    ("poll_lateness_p95_ms", "first poll's lateness, p95 (real ms)", ""),
    ("delay_mean_lateness_real_s", "delay, mean, lateness taken as real (s)", ""),
    ("delay_p95_lateness_real_s", "delay, p95, lateness taken as real (s)", ""),
)

# The scenarios in the order they are told, and what each one is.
SCENARIO_ORDER = ("no_loss", "webhook_loss_5pct", "poll_only", "trigger")
SCENARIO_NOTES = {
    "poll_only": "hookline on the DashScope adapter and fake: no callback at all, the outcome "
    "is found by the reaper's polls on the schedule (first at 20 s, then 5 s doubling up to 60 s, "
    "±50 % jitter). The seed is not run again: it polls whatever the provider offers, so its "
    "figures are those above.",
    "trigger": "hookline on the Kling adapter and fake: an unsigned callback that only says "
    '"ask me", confirmed by a query; the scheduled polls run too. The seed is not run again.',
}


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric.endswith("_rate"):
        return f"{value * 100:.1f} %"
    if metric.endswith("_s"):
        return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def scenario_line(figures: dict[str, float], scenario: str, scale: float) -> str:
    """The scenario's own compression when it differs, and how busy the machine was."""
    parts = []
    own = figures.get(f"config.time_scale.{scenario}", scale)
    if not math.isclose(own, scale):
        parts.append(f"time compressed × {own:.4g} (1 real s = {1 / own:.0f} simulated s)")
    load = figures.get(f"config.load_1m.{scenario}")
    if load is not None:
        parts.append(f"machine load average (1 min) at its end {load:.2f}")
    text = "; ".join(parts)
    return f"_{text[:1].upper()}{text[1:]}._" if text else ""


def markdown(figures: dict[str, float], goals: dict[str, Any]) -> str:
    """The RESULTS.md section: one table per scenario, the seed beside hookline and its goals.
    ``goals`` maps a metric name to an object with ``describe()`` and ``met(value)``."""
    n = figures.get("config.tasks_per_architecture", float("nan"))
    scale = figures.get("config.time_scale", float("nan"))
    out = [
        f"{n:,.0f} tasks per architecture, Poisson arrivals, the seed's latency mix, time "
        f"compressed × {scale:.4g} (1 real s = {1 / scale:.0f} simulated s); delays are "
        "converted back to real-world seconds. Goals apply to hookline. "
        "Model and assumptions: bench/README.md.",
        "",
    ]
    scenarios = sorted({k.split(".")[0] for k in figures if not k.startswith("config.")})
    known = {name: n for n, name in enumerate(SCENARIO_ORDER)}
    for scenario in sorted(scenarios, key=lambda s: (known.get(s, len(known)), s)):
        out += [f"**{scenario.replace('_', ' ')}**", ""]
        if scenario in SCENARIO_NOTES:
            out += [SCENARIO_NOTES[scenario], ""]
        out += [scenario_line(figures, scenario, scale), ""]
        out.append("| | seed write-up's estimate | seed (model) | hookline | hookline goal | met |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for metric, label, estimate in ROWS:
            seed = figures.get(f"{scenario}.seed.{metric}")
            hook = figures.get(f"{scenario}.hookline.{metric}")
            if seed is None and hook is None:
                continue
            goal = goals.get(f"{scenario}.hookline.{metric}")
            target = goal.describe() if goal else ""
            mark = (
                ("✅ met" if goal.met(hook) else "❌ missed") if goal and hook is not None else ""
            )
            row = [label, estimate, fmt(metric, seed), fmt(metric, hook), target, mark]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def serve_simulator(port: int) -> None:
    """The simulator from HOOKLINE_SIM_* settings, without uvicorn's access log (at thousands of
    polls a second, logging would cost the simulator more than answering)."""
    import uvicorn

    from callbacks.simulator import create_simulator_app
    from service.providers import fetch_input_through, sim_config, sim_input_fetcher
    from service.settings import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    fetch_input = fetch_input_through(sim_input_fetcher(settings))
    app = create_simulator_app(sim_config(settings), fetch_input=fetch_input)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seed_compare", description=__doc__)
    p.add_argument("--quick", action="store_true", help="100 tasks, time × 1/240")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--serve-simulator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_simulator:
        serve_simulator(args.port)
        return 0
    figures = run(args.quick)
    print(json.dumps(figures, indent=2))
    from bench import run as bench_run

    goals = bench_run.GOALS["seed_compare"]
    print(markdown(figures, goals))
    if not args.no_results:
        command = "python -m bench.seed_compare" + (" --quick" if args.quick else "")
        bench_run.write_sections({"seed_compare": bench_run.seed_section(figures, command)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
