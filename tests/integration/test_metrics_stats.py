"""The KPIs (pure, on hand-made tasks, then ``GET /v1/stats`` per caller) and ``GET /metrics``
(counters from the change feed, per-app registry, optional token)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.ops.stats import compute_kpis, histogram, percentile, state_intervals, verdict
from statemachine.states import State
from statemachine.task import Attempt, HistoryEntry, Task
from tests.support.factories import make_task
from tests.support.hookline import Hookline, running_hookline

TIMEOUT_S = 30
P, PR, AI, WM = State.PENDING, State.PROCESSING, State.AI_PROCESSING, State.WATERMARKING


# --- the pure computation, on hand-made records -----------------------------------------------


def task(
    n: int,
    state: State,
    steps: list[tuple[State, State, str, float]],
    attempts: int = 1,
    outcomes: tuple[str | None, ...] = ("succeeded",),
) -> Task:
    """A task created at t=0 whose history is ``steps`` (from, to, event, at)."""
    return make_task(
        id=f"t{n}",
        now=0.0,
        state=state,
        version=len(steps) + 1,
        updated_at=steps[-1][3] if steps else 0.0,
        attempts=attempts,
        history=tuple(HistoryEntry(a, b, e, at) for a, b, e, at in steps),
        attempt_log=tuple(
            Attempt(number=i + 1, provider="sim", model="m", outcome=o)
            for i, o in enumerate(outcomes)
        ),
    )


def happy(n: int, ai_s: float) -> Task:
    return task(
        n,
        State.COMPLETED,
        [
            (P, PR, "start", 1.0),
            (PR, AI, "submitted", 2.0),
            (AI, WM, "ai_succeeded", 2.0 + ai_s),
            (WM, State.COMPLETED, "finished", 3.0 + ai_s),
        ],
    )


def retried_after_timeout(n: int) -> Task:
    return task(
        n,
        State.COMPLETED,
        [
            (P, PR, "start", 1.0),
            (PR, AI, "submitted", 2.0),
            (AI, AI, "extend", 50.0),  # still running: the stay goes on
            (AI, PR, "retry", 100.0),
            (PR, AI, "submitted", 110.0),
            (AI, WM, "ai_succeeded", 130.0),
            (WM, State.COMPLETED, "finished", 131.0),
        ],
        attempts=2,
        outcomes=("timeout", "succeeded"),
    )


def failed_after_timeouts(n: int) -> Task:
    return task(
        n,
        State.FAILED,
        [(P, PR, "start", 1.0), (PR, AI, "submitted", 2.0), (AI, State.FAILED, "fail", 700.0)],
        attempts=3,
        outcomes=("timeout", "late_success", "failed"),
    )


def test_kpis_follow_their_documented_definitions() -> None:
    tasks = [
        *[happy(i, ai_s=10.0 * (i + 1)) for i in range(7)],  # AI 10..70 s
        retried_after_timeout(7),
        failed_after_timeouts(8),
        task(9, State.CANCELLED, [(P, State.CANCELLED, "cancel", 5.0)], 0, ()),
        task(10, State.AI_PROCESSING, [(P, PR, "start", 1.0), (PR, AI, "submitted", 2.0)]),
    ]
    kpis = compute_kpis(tasks, 3600)
    assert kpis["tasks"] == 11
    assert (kpis["settled"], kpis["completed"], kpis["failed"]) == (9, 8, 1)
    assert (kpis["cancelled"], kpis["in_flight"]) == (1, 1)
    assert kpis["first_try_success_rate"] == round(7 / 9, 4)  # the cancelled one is left out
    assert kpis["final_success_rate"] == round(8 / 9, 4)
    assert kpis["timeout_rate"] == round(2 / 9, 4)  # late_success counts as a timeout
    assert kpis["retries_per_task"] == round((1 + 2) / 9, 4)
    assert kpis["verdict"] == "redesign"
    # AI latency: the seven happy stays and the retried task's second stay (20 s).
    ai = kpis["ai_latency_s"]
    assert ai["count"] == 8
    assert ai["p50"] == 30.0 and ai["p95"] == 70.0
    assert ai["bands"] == {"under_40s": 0.5, "40_to_60s": 0.375, "over_60s": 0.125}
    assert sum(b["count"] for b in ai["histogram"]) == 8
    assert kpis["latency_s"]["count"] == 8
    assert kpis["state_latency_s"]["ai_processing"]["count"] == 10  # the failed stay included
    assert kpis["thresholds"]["timeout_rate"] == {"acceptable_below": 0.05, "redesign_above": 0.1}


def test_kpis_of_nothing_are_none_not_zero() -> None:
    kpis = compute_kpis([], 86400)
    assert kpis["tasks"] == 0 and kpis["verdict"] is None
    for name in ("first_try_success_rate", "final_success_rate", "timeout_rate"):
        assert kpis[name] is None
    assert kpis["latency_s"] == {"count": 0, "p50": None, "p95": None, "mean": None}


def test_verdict_uses_the_seeds_thresholds() -> None:
    assert verdict(0.0) == "acceptable"
    assert verdict(0.0499) == "acceptable"
    assert verdict(0.05) == "tune"
    assert verdict(0.10) == "tune"
    assert verdict(0.1001) == "redesign"


def test_state_stays_run_through_self_loops() -> None:
    stays = [
        (s.state, s.start, s.end, s.left_by) for s in state_intervals(retried_after_timeout(0))
    ]
    assert stays[2] == (AI, 2.0, 100.0, "retry")  # the extend at 50 s did not end it
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.5) is None
    assert [b["count"] for b in histogram([0.5, 45.0, 500.0])][:2] == [1, 0]


# --- through the server ------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(
    hl: Hookline, **headers: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await hl.client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def scrape_until(hl: Hookline, name: str, labels: dict[str, str], value: float) -> Any:
    """Scrape until a feed-fed sample reaches ``value`` (the watcher runs in the background)."""
    key = (name, tuple(sorted(labels.items())))
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            got = await scrape(hl)
            if got.get(key, 0.0) >= value:
                return got
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_metrics_count_a_tasks_life_from_the_feed(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice", credits=100)
        created = await hl.create_task(key, style="anime")
        await hl.wait_terminal(key, created["id"])
        m = await scrape_until(
            hl, "hookline_transitions_total", {"event": "finished", "to": "completed"}, 1
        )
        assert m[("hookline_tasks", (("state", "completed"),))] == 1
        assert m[("hookline_tasks", (("state", "pending"),))] == 0
        assert m[("hookline_credits_debited_total", ())] == created["cost"]
        assert m[("hookline_credits_refunded_total", ())] == 0
        provider = (("model", created["model"]), ("provider", "sim"))
        assert m[("hookline_provider_latency_seconds_count", provider)] == 1
        for state in ("pending", "processing", "ai_processing", "watermarking"):
            assert m[("hookline_state_duration_seconds_count", (("state", state),))] == 1
        assert m[("hookline_reconciliations_total", ())] == 0

        hl.runtime.outcomes.reconciliations = 3
        m = await scrape(hl)
        assert m[("hookline_reconciliations_total", ())] == 3


@pytest.mark.asyncio
async def test_metrics_count_refunds_and_rejected_webhooks(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, roles="api") as hl:
        key = await hl.create_user("alice", credits=100)
        created = await hl.create_task(key)
        r = await hl.client.post(f"/v1/tasks/{created['id']}/cancel", headers=hl.auth(key))
        assert r.status_code == 200
        for provider in ("sim", "made-up"):
            r = await hl.client.post(
                f"/v1/callbacks/{provider}/{created['id']}?token=forged", content=b"{}"
            )
            assert r.status_code in (401, 403, 404)
        m = await scrape_until(hl, "hookline_credits_refunded_total", {}, created["cost"])
        assert m[("hookline_transitions_total", (("event", "cancel"), ("to", "cancelled")))] == 1
        rejected = {k[1]: v for k, v in m.items() if k[0] == "hookline_webhook_rejected_total"}
        assert rejected[(("code", "bad_token"), ("provider", "sim"))] == 1
        # A provider name from the URL is not a label: unknown names are counted as "other".
        assert [dict(k)["provider"] for k in rejected] == ["sim", "other"]


@pytest.mark.asyncio
async def test_metrics_token_is_required_when_set_and_never_shown(tmp_path: Path) -> None:
    async with running_hookline(tmp_path, metrics_token="s3cret-metrics", roles="api") as hl:
        assert (await hl.client.get("/metrics")).status_code == 401
        r = await hl.client.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_metrics_token"
        r = await hl.client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"})
        assert r.status_code == 200
        assert "s3cret" not in r.text and "hookline_tasks" in r.text


@pytest.mark.asyncio
async def test_two_apps_keep_separate_registries(tmp_path: Path) -> None:
    async with (
        running_hookline(tmp_path / "a", roles="api") as a,
        running_hookline(tmp_path / "b", roles="api") as b,
    ):
        key = await a.create_user("alice")
        await a.create_task(key)
        await scrape_until(
            a, "hookline_transitions_total", {"event": "created", "to": "pending"}, 1
        )
        m = await scrape(b)
        assert (
            m.get(("hookline_transitions_total", (("event", "created"), ("to", "pending")))) is None
        )


@pytest.mark.asyncio
async def test_stats_show_a_user_their_own_and_an_admin_everyones(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        alice = await hl.create_user("alice")
        bob = await hl.create_user("bob")
        admin = await hl.create_user("root", admin=True)
        for key in (alice, alice, bob):
            created = await hl.create_task(key)
            await hl.wait_terminal(key, created["id"])

        mine = (await hl.client.get("/v1/stats", headers=hl.auth(alice))).json()
        assert mine["tasks"] == 2 and mine["scope"] == "own" and mine["window_s"] == 86400
        assert mine["first_try_success_rate"] == 1.0 and mine["final_success_rate"] == 1.0
        assert mine["timeout_rate"] == 0.0 and mine["retries_per_task"] == 0.0
        assert mine["verdict"] == "acceptable"
        assert mine["latency_s"]["p50"] > 0 and mine["ai_latency_s"]["count"] == 2

        everyone = (await hl.client.get("/v1/stats?window_s=60", headers=hl.auth(admin))).json()
        assert everyone["tasks"] == 3 and everyone["scope"] == "all" and everyone["window_s"] == 60

        for bad in ("0", "-5", "abc", "99999999999"):
            r = await hl.client.get(f"/v1/stats?window_s={bad}", headers=hl.auth(alice))
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_window"
        assert (await hl.client.get("/v1/stats")).status_code == 401
