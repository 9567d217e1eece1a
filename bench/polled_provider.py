"""Providers without webhooks as bench peers: ``python -m bench.polled_provider --kind K --port P``.

The faithful fakes of tests/fakes, each in a process of its own, driven the way the real provider
would behave under a latency model:

- ``dashscope`` (tests/fakes/dashscope_fake.py): poll-only. A task is ``RUNNING`` from its submit
  (the fake's per-model queue is opened wide: the seed's load needs more than DashScope's default
  2 tasks at once) until its generation time has passed, then ``SUCCEEDED`` with result URLs the
  fake serves. Nothing is sent to the caller: only a query finds the outcome.
- ``kling`` (tests/fakes/kling_fake.py): a trigger. When the generation time has passed the task
  ``succeed``s and the fake POSTs its unsigned callback to the task's ``callback_url`` (lost with
  probability ``--trigger-loss``); the callback only says "ask me".

Generation times come from a latency spec of the simulator (callbacks/simulator/latency.py:
``seed`` is the seed write-up's mix) × ``--time-scale``, drawn for the n-th submit from
``Random(f"{seed}:{n}:run")`` — the draw the simulator makes for its n-th prediction, so a scenario
here meets the same generation times as the simulator's. ``--latency hold`` never finishes a task
(the poll-quota bench; ``POST /_bench/preload`` then creates running tasks with given ids).

Bench routes beside the fake's own: ``GET /_bench/stats`` (submits, generations completed, status
queries, callbacks, and per job: submitted, completed, whether the trigger was sent, when the
first query came and when a query first answered the final status) and ``GET /_bench/polls``
(the time of every status query, taken when its answer was ready). Times are this machine's wall
clock (``time.time``), the clock hookline's records use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from callbacks.simulator.latency import LatencyModel, parse_latency
from tests.fakes.dashscope_fake import DashScopeFake, DashScopeTask
from tests.fakes.kling_fake import KlingFake

Kind = Literal["dashscope", "kling"]
KINDS: tuple[Kind, ...] = ("dashscope", "kling")
FINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "succeed", "failed"})
PRELOAD_MODEL = "wan2.2-t2i-flash"
MAX_PRELOAD = 1_000_000
# The credentials the fakes accept (they listen on loopback only, for one bench run).
DASHSCOPE_KEY = "sk-bench-dashscope-0123456789"
KLING_ACCESS_KEY = "kling-bench-access-key"
KLING_SECRET_KEY = "kling-bench-secret-key-0123456789abcdef"


@dataclass(slots=True)
class Job:
    """What the driver knows of one provider task (wall-clock seconds)."""

    submitted_at: float
    completed_at: float | None = None
    triggered: bool = False  # the completion's callback was sent (kling, not lost)
    found_at: float | None = None  # the first query answered with the final status
    first_query_at: float | None = None
    queries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "submitted_at": self.submitted_at,
            "completed_at": self.completed_at,
            "triggered": self.triggered,
            "found_at": self.found_at,
            "first_query_at": self.first_query_at,
            "queries": self.queries,
        }


@dataclass(slots=True)
class Driver:
    """Finishes each submitted task after its drawn generation time; records every query."""

    kind: Kind
    latency: LatencyModel | None  # None: hold (never finish)
    time_scale: float
    seed: int
    trigger_loss: float = 0.0
    jobs: dict[str, Job] = field(default_factory=dict)
    poll_times: list[float] = field(default_factory=list)
    triggers_lost: int = 0
    completed: int = 0
    _serial: int = 0
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def submitted(self, job_id: str) -> None:
        self._serial += 1
        self.jobs[job_id] = Job(time.time())
        if self.latency is None:
            return
        rng = random.Random(f"{self.seed}:{self._serial}:run")
        delay = self.latency.sample(rng) * self.time_scale
        lose = rng.random() < self.trigger_loss
        task = asyncio.get_running_loop().create_task(self._finish_later(job_id, delay, lose))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish_later(self, job_id: str, delay_s: float, lose: bool) -> None:
        await asyncio.sleep(delay_s)
        await self.finish(job_id, lose=lose)

    async def finish(self, job_id: str, *, lose: bool) -> None:
        raise NotImplementedError

    def queried(self, job_id: str, status: str | None) -> None:
        now = time.time()
        self.poll_times.append(now)
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.queries += 1
        if job.first_query_at is None:
            job.first_query_at = now
        if status in FINAL and job.found_at is None:
            job.found_at = now

    def stats(self) -> dict[str, Any]:
        return {
            "predictions_created": len(self.jobs),
            "generations_completed": self.completed,
            "polls": len(self.poll_times),
            "in_flight": len(self._pending),
            "triggers_sent": sum(j.triggered for j in self.jobs.values()),
            "triggers_lost": self.triggers_lost,
            "jobs": {job_id: job.to_json() for job_id, job in self.jobs.items()},
        }

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


def _answer(response: Response) -> dict[str, Any]:
    try:
        parsed = json.loads(bytes(response.body))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class DrivenDashScope(DashScopeFake):
    """The DashScope fake, its submits and queries reported to a ``Driver``."""

    driver: Driver

    async def _submit(self, request: Request, *, edit_route: bool) -> Response:
        response = await super()._submit(request, edit_route=edit_route)
        task_id = (_answer(response).get("output") or {}).get("task_id")
        if response.status_code == 200 and isinstance(task_id, str):
            self.driver.submitted(task_id)
        return response

    async def _query(self, request: Request) -> Response:
        response = await super()._query(request)
        status = (_answer(response).get("output") or {}).get("task_status")
        self.driver.queried(request.path_params["task_id"], status)
        return response

    def preload(self, ids: list[str], now: float) -> None:
        """Running tasks with these ids, as if submitted ``now`` (for the quota bench)."""
        for task_id in ids:
            self.tasks[task_id] = DashScopeTask(
                task_id=task_id,
                model=PRELOAD_MODEL,
                body={"model": PRELOAD_MODEL, "input": {"prompt": "preloaded"}},
                base_url="http://preloaded.invalid",
                submitted_at=now,
                status="RUNNING",
                started_at=now,
            )
            self.driver.jobs[task_id] = Job(now)


class DashScopeDriver(Driver):
    fake: DrivenDashScope

    async def finish(self, job_id: str, *, lose: bool) -> None:
        self.jobs[job_id].completed_at = time.time()
        self.fake.complete(job_id)
        self.completed += 1


class DrivenKling(KlingFake):
    """The Kling fake, its submits and queries reported to a ``Driver``."""

    driver: Driver

    async def _submit(self, request: Request) -> Response:
        response = await super()._submit(request)
        task_id = (_answer(response).get("data") or {}).get("task_id")
        if response.status_code == 200 and isinstance(task_id, str):
            self.driver.submitted(task_id)
        return response

    async def _query(self, request: Request) -> Response:
        response = await super()._query(request)
        status = (_answer(response).get("data") or {}).get("task_status")
        self.driver.queried(request.path_params["id"], status)
        return response


class KlingDriver(Driver):
    fake: DrivenKling

    async def finish(self, job_id: str, *, lose: bool) -> None:
        job = self.jobs[job_id]
        job.completed_at = time.time()
        job.triggered = not lose
        self.completed += 1
        if lose:
            self.triggers_lost += 1
        await self.fake.complete(job_id, lost=lose)


def build_app(
    kind: Kind, latency: str, *, time_scale: float, seed: int, trigger_loss: float = 0.0
) -> Starlette:
    """The fake of ``kind`` with its driver and the bench routes (module docstring)."""
    model = None if latency == "hold" else parse_latency(latency)
    fake: DrivenDashScope | DrivenKling
    driver: DashScopeDriver | KlingDriver
    if kind == "dashscope":
        ds = DrivenDashScope(key=DASHSCOPE_KEY, concurrency=10**9)
        driver = ds.driver = DashScopeDriver(kind, model, time_scale, seed, trigger_loss)
        driver.fake = ds
        fake = ds
    else:
        kl = DrivenKling(access_key=KLING_ACCESS_KEY, secret_key=KLING_SECRET_KEY)
        driver = kl.driver = KlingDriver(kind, model, time_scale, seed, trigger_loss)
        driver.fake = kl
        fake = kl

    async def stats(request: Request) -> Response:
        return JSONResponse(driver.stats())

    async def polls(request: Request) -> Response:
        return JSONResponse(driver.poll_times)

    async def preload(request: Request) -> Response:
        if not isinstance(fake, DrivenDashScope):
            return JSONResponse({"error": "preload is for dashscope"}, status_code=404)
        body = await request.json()
        n, prefix = body.get("n"), body.get("prefix")
        if not isinstance(n, int) or not 0 < n <= MAX_PRELOAD or not isinstance(prefix, str):
            return JSONResponse({"error": "need n (1..1e6) and prefix"}, status_code=422)
        fake.preload([f"{prefix}{i:07d}" for i in range(n)], time.time())
        return JSONResponse({"preloaded": n})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if isinstance(fake, DrivenKling):  # its HTTP client sends the callbacks
                async with fake._lifespan(fake.app):
                    yield
            else:
                yield
        finally:
            await driver.close()

    return Starlette(
        routes=[
            Route("/_bench/stats", stats, methods=["GET"]),
            Route("/_bench/polls", polls, methods=["GET"]),
            Route("/_bench/preload", preload, methods=["POST"]),
            Mount("", app=fake.app),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.polled_provider", description=__doc__)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", default="seed", help="a simulator latency spec, or hold")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger-loss", type=float, default=0.0, help="kling: callbacks lost")
    args = p.parse_args(argv)
    app = build_app(
        args.kind,
        args.latency,
        time_scale=args.time_scale,
        seed=args.seed,
        trigger_loss=args.trigger_loss,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
