"""The seed comparison's bookkeeping (bench/seed_compare.py) on a tiny, fast run: real simulator
and ``hookline serve`` processes, the seed's model against the same simulator.

What is proved: every task of both architectures is accounted for (succeeded + failed = N, none
left unfinished); hookline completes every task paying for exactly one generation each, also when
half the webhooks are lost (the reaper reconciles them by polling). How fast is the benchmark's
business: nothing here is timed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.seed_compare import Config, Scenario, compare

pytestmark = pytest.mark.asyncio

N = 12
CONFIG = Config(
    n=N,
    time_scale=1 / 600,  # a simulated minute is 0.1 s: the seed's cron retries end within seconds
    arrival_window_s=60.0,
    scenarios=(
        Scenario("no_loss", 0.0),
        Scenario("webhook_loss_50pct", 0.5, archs=("hookline",)),
    ),
)
BOUND_S = 180.0  # generous: only reached when something hangs


async def test_every_task_is_accounted_for_and_hookline_pays_once_per_result(
    tmp_path: Path,
) -> None:
    figures, delays = await asyncio.wait_for(compare(CONFIG, tmp_path), BOUND_S)

    for arch in ("seed", "hookline"):
        done = figures[f"no_loss.{arch}.succeeded"] + figures[f"no_loss.{arch}.failed"]
        assert done == N, arch
        assert figures[f"no_loss.{arch}.unfinished"] == 0, arch
        assert len(delays[f"no_loss.{arch}"]) == figures[f"no_loss.{arch}.succeeded"], arch

    # the seed pays for every generation its killed functions abandoned
    seed_paid = figures["no_loss.seed.paid_generations"]
    assert figures["no_loss.seed.provider_calls"] >= N
    assert figures["no_loss.seed.wasted_calls"] == seed_paid - figures["no_loss.seed.succeeded"]

    for scenario in ("no_loss", "webhook_loss_50pct"):
        assert figures[f"{scenario}.hookline.succeeded"] == N, scenario
        assert figures[f"{scenario}.hookline.provider_calls"] == N, scenario
        assert figures[f"{scenario}.hookline.wasted_calls"] == 0, scenario
    assert figures["webhook_loss_50pct.hookline.reconciled_by_poll"] > 0
