"""Outbound webhooks across SIGKILL: a real ``hookline serve`` process is killed while it is
delivering (the receiver pulls the trigger from inside the request it is answering) and restarted
on the same SQLite file, again and again. A loopback receiver verifying with the
``standardwebhooks`` library must get every task's terminal event, each under one ``webhook-id``
however many times it arrived, and a message cut off by a kill must arrive again after the
restart under the same id."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import HOST
from tests.support.server import serve_app

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio]

TASKS = 12
KILLS = 3
BOUND_S = 90.0


async def test_terminal_events_survive_kills_during_delivery(
    tmp_path: Path, chaos_cluster: ClusterFactory
) -> None:
    secret: list[str] = []
    ids_by_task: dict[str, set[str]] = defaultdict(set)
    arrivals: dict[str, int] = defaultdict(int)
    cut: list[str] = []  # webhook-ids whose delivery a kill interrupted
    kill_now = asyncio.Event()
    answered = asyncio.Event()

    async def hook(request: Request) -> Response:
        raw = await request.body()
        payload = Webhook(secret[0]).verify(raw, dict(request.headers))  # raises if forged
        webhook_id = request.headers["webhook-id"]
        arrivals[webhook_id] += 1
        if len(cut) < KILLS and webhook_id not in cut:
            cut.append(webhook_id)
            kill_now.set()  # the server dies while this request is open
            await asyncio.sleep(30)  # never answered: the connection dies with the server
        ids_by_task[payload["data"]["id"]].add(webhook_id)
        answered.set()
        return Response(status_code=204)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve_app(receiver) as receiver_url:
        cluster = chaos_cluster(
            tmp_path,
            servers=1,
            sim_env={"HOOKLINE_SIM_LATENCY": "fixed:0.2", "HOOKLINE_LOG_LEVEL": "warning"},
            server_env={
                "HOOKLINE_WEBHOOK_HOSTS": HOST,
                "HOOKLINE_WEBHOOK_RETRY_BASE_S": "0.2",
                "HOOKLINE_WEBHOOK_POLL_S": "0.05",
                "HOOKLINE_WEBHOOK_TIMEOUT_S": "1",
                "HOOKLINE_WEBHOOK_LEASE_S": "3",
            },
        )
        await cluster.start()
        key = cluster.create_user("alice", 10_000)
        auth = {"Authorization": f"Bearer {key}"}
        base = cluster.servers[0].base_url
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            r = await http.post("/v1/webhooks", json={"url": receiver_url + "/hook"}, headers=auth)
            assert r.status_code == 201, r.text
            secret.append(r.json()["secret"])
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), "teal").save(buf, "PNG")
            r = await http.post(
                "/v1/uploads", content=buf.getvalue(), headers={**auth, "Content-Type": "image/png"}
            )
            assert r.status_code == 201, r.text
            upload = r.json()["key"]
            task_ids = []
            for n in range(TASKS):
                r = await http.post(
                    "/v1/tasks",
                    json={"inputs": [{"upload": upload}], "prompt": f"task {n}"},
                    headers={**auth, "Idempotency-Key": f"k{n}"},
                )
                assert r.status_code == 202, r.text
                task_ids.append(r.json()["id"])

        async def killer() -> None:
            for _ in range(KILLS):
                await kill_now.wait()
                kill_now.clear()
                cluster.kill(0)
                await cluster.restart(0)

        killing = asyncio.create_task(killer())
        try:
            async with asyncio.timeout(BOUND_S):
                while (
                    set(ids_by_task) != set(task_ids)
                    or len(cut) < KILLS
                    or (not all(arrivals[i] >= 2 for i in cut))
                ):
                    answered.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(answered.wait(), 0.5)
        except TimeoutError:
            pytest.fail(
                f"got {len(ids_by_task)}/{TASKS} tasks, cut {cut}, arrivals {dict(arrivals)}\n"
                + cluster.logs_tail()
            )
        finally:
            killing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killing

    assert set(ids_by_task) == set(task_ids)
    for task_id, ids in ids_by_task.items():
        assert len(ids) == 1, (task_id, ids)  # one terminal event, one webhook-id
    assert len(cut) == KILLS
    for webhook_id in cut:
        assert arrivals[webhook_id] >= 2  # cut off by a kill, sent again after the restart
