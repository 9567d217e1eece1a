"""The seed's architecture (seed/000_36c1676f5e5569f7.txt) as an asyncio model that really calls
the provider simulator's HTTP API. bench/seed_compare.py runs it beside hookline.

What is modelled, step by step (durations are simulated seconds from the seed's own step table,
slept as ``seconds × time_scale``):

- ``photography`` creates the task (status ``pending``); the database trigger fires
  ``task-processor`` at once, which sets ``processing`` and calls the ``prompt`` function (1 s,
  assumed: the write-up gives no figure).
- ``task-processor`` awaits ``aimodels``, a function with a hard 60 s timeout. Inside it: download
  and process inputs (5–10 s), pick the model (1 s), then ``await callExternalAI``: a real
  ``POST /v1/models/…/predictions`` to the simulator, then a ``GET`` every 5 simulated seconds until
  the job is terminal (a synchronous SDK call does the same under the hood); then watermark (5 s),
  upload (5–10 s) and the database writes (1 s) that mark the task ``completed``.
- At 60 s the platform kills ``aimodels`` wherever it is. Nothing is written: the task stays
  ``processing``. The provider job is not cancelled: it runs on, completes, and is paid for, but
  nobody reads its result. (``task-processor`` dies a second later; it writes nothing either, so
  only ``aimodels``' own 60 s matters.)
- ``taskCleanup``, a cron every 3 minutes (first tick at a random phase), re-submits every task in
  ``pending``/``processing`` not updated for 10 minutes — a fresh ``aimodels`` call with a fresh
  60 s — and gives up (``failed``, refunded) on a task that has used ``max_attempts`` calls (3, the
  same budget as ``HOOKLINE_MAX_ATTEMPTS``; the write-up names no limit).
- A provider failure (none without ``HOOKLINE_SIM_FAILURE_RATE``) fails the task at once, and an
  HTTP error kills the function like a timeout does.
"""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

MODEL = "black-forest-labs/flux-schnell"  # hookline's default Replicate model: the same route
# the simulator's token: fresh per run, given to it by seed_compare (HOOKLINE_SIM_API_TOKEN)
SIM_TOKEN = secrets.token_urlsafe(24)
MIN_POLL_REAL_S = 0.01  # never poll the simulator faster than this, whatever the time scale
DEADLINE_SLACK_REAL_S = 0.25  # real seconds a poll may lag behind the function's deadline
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass(frozen=True, slots=True)
class SeedTimings:
    """The seed's timings in simulated seconds (its step table and its cron)."""

    function_timeout_s: float = 60.0
    prompt_s: float = 1.0
    download_s: tuple[float, float] = (5.0, 10.0)
    select_model_s: float = 1.0
    watermark_s: float = 5.0
    upload_s: tuple[float, float] = (5.0, 10.0)
    db_write_s: float = 1.0
    poll_s: float = 5.0
    cron_every_s: float = 180.0
    stuck_after_s: float = 600.0
    max_attempts: int = 3


@dataclass(slots=True)
class SeedTask:
    """One row of ``task_queue`` plus what the benchmark learns about it. Times are simulated
    seconds since the start of the run."""

    id: str
    created_s: float
    status: str = "pending"
    updated_s: float = 0.0
    attempts: int = 0
    finished_s: float | None = None
    ai_s: float | None = None  # the used generation's own time (the provider's predict_time)
    predictions: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed")


class FunctionDied(Exception):
    """The cloud function ended without writing anything (timeout or an unhandled error)."""


def iso_seconds(value: str) -> float:
    """Epoch seconds of the simulator's ISO-8601 timestamps (``…Z``)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class SeedArchitecture:
    """Runs tasks through the modelled chain of cloud functions against ``sim_url``.

    The run is paced in real time (simulated seconds × ``time_scale``) and every provider call is
    real, but each decision is taken on the simulated timeline: a function is killed when its
    simulated steps plus the generation's own simulated time (``metrics.predict_time``, reported by
    the simulator) pass 60 s. So the milliseconds of real HTTP and event-loop lag, which time
    compression would multiply into simulated seconds, never decide a timeout.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        sim_url: str,
        *,
        time_scale: float,
        image: bytes,
        timings: SeedTimings | None = None,
        seed: int = 0,
        size: int = 256,
    ) -> None:
        self.http = http
        self.sim_url = sim_url.rstrip("/")
        self.scale = time_scale
        self.timings = timings or SeedTimings()
        self.rng = random.Random(seed)
        self.image_uri = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
        self.size = size
        self.tasks: list[SeedTask] = []
        self.http_errors = 0
        self.polls = 0  # status GETs made while awaiting the AI
        self._functions: set[asyncio.Task[None]] = set()
        self._expected = 0
        self._all_terminal = asyncio.Event()
        self._t0 = 0.0

    async def run(self, arrivals_s: Sequence[float]) -> list[SeedTask]:
        """Create one task per arrival (simulated seconds from now) and return when every task is
        completed or failed."""
        self._t0 = asyncio.get_running_loop().time()
        self._expected = len(arrivals_s)
        cron = asyncio.create_task(self._cron())
        try:
            for n, offset in enumerate(arrivals_s):
                await self._until(offset)
                task = SeedTask(id=f"seed-{n:05d}", created_s=offset, updated_s=offset)
                self.tasks.append(task)
                self._spawn(task, offset)  # the database trigger: no delay
            self._check_done()
            await self._all_terminal.wait()
        finally:
            cron.cancel()
            for fn in list(self._functions):
                fn.cancel()
            await asyncio.gather(cron, *self._functions, return_exceptions=True)
        return self.tasks

    async def _until(self, simulated_s: float) -> None:
        """Sleep until the run's simulated clock reads ``simulated_s``."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._t0 + simulated_s * self.scale - loop.time()))

    def _finish(self, task: SeedTask, status: str, at_s: float, ai_s: float | None = None) -> None:
        task.status, task.finished_s, task.ai_s = status, at_s, ai_s
        self._check_done()

    def _check_done(self) -> None:
        if len(self.tasks) == self._expected and all(t.terminal for t in self.tasks):
            self._all_terminal.set()

    # --- the functions ------------------------------------------------------------------------

    def _spawn(self, task: SeedTask, start_s: float) -> None:
        fn = asyncio.create_task(self._task_processor(task, start_s))
        self._functions.add(fn)
        fn.add_done_callback(self._functions.discard)

    async def _task_processor(self, task: SeedTask, start_s: float) -> None:
        """``task-processor`` then ``aimodels``, from simulated time ``start_s``."""
        t = self.timings
        task.status, task.updated_s = "processing", start_s
        task.attempts += 1
        deadline_s = start_s + t.prompt_s + t.function_timeout_s  # aimodels' own 60 s
        ai_start_s = start_s + t.prompt_s + self.rng.uniform(*t.download_s) + t.select_model_s
        post_s = t.watermark_s + self.rng.uniform(*t.upload_s) + t.db_write_s
        await self._until(ai_start_s)
        try:
            prediction = await self._call_external_ai(task, deadline_s)
        except FunctionDied:
            return  # killed: nothing written, the task stays "processing" for the cron
        if prediction["status"] != "succeeded":
            self._finish(task, "failed", ai_start_s + self._predict_s(prediction))
            return
        ai_s = self._predict_s(prediction)
        done_s = ai_start_s + ai_s + post_s
        if done_s > deadline_s:
            return  # killed while awaiting the AI or in watermark/upload: the result is lost
        await self._until(done_s)
        self._finish(task, "completed", done_s, ai_s)

    @staticmethod
    def _predict_s(prediction: dict[str, Any]) -> float:
        metrics = prediction.get("metrics") or {}
        return float(metrics.get("predict_time", 0.0))

    async def _call_external_ai(self, task: SeedTask, deadline_s: float) -> dict[str, Any]:
        """Submit, then poll until the job is terminal: the synchronous await of the seed. Past
        the function's deadline (plus a little real slack for HTTP) the function is dead."""
        body = {
            "input": {
                "prompt": f"portrait {task.id}",
                "image": self.image_uri,
                "width": self.size,
                "height": self.size,
                "num_outputs": 1,
            }
        }
        prediction = await self._request("POST", f"/v1/models/{MODEL}/predictions", body)
        task.predictions.append(prediction["id"])
        interval = max(MIN_POLL_REAL_S, self.timings.poll_s * self.scale)
        loop = asyncio.get_running_loop()
        give_up = self._t0 + deadline_s * self.scale + max(DEADLINE_SLACK_REAL_S, 2 * interval)
        while prediction["status"] not in TERMINAL:
            if loop.time() > give_up:
                raise FunctionDied("timed out awaiting the AI")
            await asyncio.sleep(interval)
            self.polls += 1
            prediction = await self._request("GET", f"/v1/predictions/{prediction['id']}")
        return prediction

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {SIM_TOKEN}"}
        try:
            response = await self.http.request(
                method, self.sim_url + path, json=body, headers=headers
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.http_errors += 1
            raise FunctionDied(repr(exc)) from exc
        result: dict[str, Any] = response.json()
        return result

    # --- the cron -----------------------------------------------------------------------------

    async def _cron(self) -> None:
        """``taskCleanup``: every 3 minutes, re-submit tasks stuck for 10 minutes."""
        t = self.timings
        tick_s = self.rng.uniform(0.0, t.cron_every_s)
        while True:
            await self._until(tick_s)
            for task in self.tasks:
                stuck = task.status in ("pending", "processing")
                if not stuck or tick_s - task.updated_s <= t.stuck_after_s:
                    continue
                if task.attempts >= t.max_attempts:
                    self._finish(task, "failed", tick_s)
                else:
                    task.updated_s = tick_s
                    self._spawn(task, tick_s)
            tick_s += t.cron_every_s
